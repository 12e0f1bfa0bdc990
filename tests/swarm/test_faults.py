"""Staying in sync when things go wrong: a late joiner downloads the current state. (A peer
killed mid all-reduce is in the fault-injection suite, tests/faults/test_peer_faults.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.swarm.conftest import in_parallel, max_difference, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def test_a_late_joiner_downloads_the_current_state_and_then_averages_with_the_swarm(swarm):
    # Prepare: two peers train two rounds together
    config = swarm_config("late-joiner")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))

    # Execute: a third peer joins path 1,0 (shares the stem with both, L1.M0 with a)
    c = swarm.open(config, "1,0", initial_peers=a.maddrs)

    # Assert: it caught up to round 2 with exactly the state its peers hold
    assert c.node.round == a.node.round
    assert set(c.caught_up) == {"stem", "L1.M0"}
    assert torch.equal(torch.cat([p.flatten() for p in c.node.slots["L1.M0"].outer.global_params]),
                       torch.cat([p.flatten() for p in a.node.slots["L1.M0"].outer.global_params]))
    # (a and b hold the stem up to fp16 wire error; c holds exactly the copy of one of them)
    assert min(max_difference(c.node.slots["stem"].outer.global_params, peer.node.slots["stem"].outer.global_params)
               for peer in (a, b)) == 0
    # ... and its next round is averaged with the others
    in_parallel(*[lambda n=n: n.run(max_rounds=1) for n in (a.node, b.node, c.node)])
    assert sorted(c.node.history[-1].modules["stem"].group) == sorted(n.node.peer_id for n in (a, b, c))
    # (fp16 wire rounding of the averaged update, the bound every agreement test uses)
    assert max_difference(c.node.slots["stem"].outer.global_params, b.node.slots["stem"].outer.global_params) < 1e-3
