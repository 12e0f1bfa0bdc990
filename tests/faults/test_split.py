"""A network split into two halves that train apart for rounds, then heal (their DHTs
bridged on loopback): the strict majority of a module's holders decides, the minority
re-syncs from it and reports it, and every module converges to one state again."""

from __future__ import annotations

import functools

import pytest

from tests.faults import tally
from tests.faults.test_peer_faults import max_difference, peers_that_lost_state
from tests.swarm.conftest import in_parallel, swarm_config

# timed against the round: alone under pytest-xdist (tests/conftest.py)
pytestmark = [pytest.mark.faults, pytest.mark.swarm, pytest.mark.alone, pytest.mark.timeout(420)]


async def _bridge(_dht, node, peer_id: str, maddrs: list[str]) -> None:
    """Connect this DHT node to a peer of the other half and put it in the routing table."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr
    peer = PeerID.from_base58(peer_id)
    await node.p2p._client.connect(peer, [Multiaddr(m.split("/p2p/")[0]) for m in maddrs])
    await node.protocol.call_ping(peer)


def test_a_half_that_trained_apart_is_detected_and_resynced_to_the_majority_within_two_rounds(swarm, fault):
    # Prepare: two halves of one run (the same config and round schedule) train apart on
    # separate DHTs: a1 and a2 together, b alone
    config = swarm_config("split-halves", levels=(1,), round_seconds=6.0)
    a1 = swarm.open(config, "0")
    a2 = swarm.open(config, "0", initial_peers=a1.maddrs)
    b = swarm.open(config, "0")  # a new DHT: the other half
    b.node.schedule = a1.node.schedule  # the same run, so the same clock
    in_parallel(*[lambda n=n: n.node.run(max_rounds=2) for n in (a1, a2, b)])
    assert max_difference(a1.node.slots["L0.M0"].outer.global_params,
                          b.node.slots["L0.M0"].outer.global_params) > 1e-3  # two lineages

    # Execute: bridge the halves' DHTs, then train two more rounds together
    for x, y in ((b, a1), (a1, b)):
        x.dht.run_coroutine(functools.partial(_bridge, peer_id=y.node.peer_id, maddrs=y.maddrs))
    in_parallel(*[lambda n=n: n.node.run(max_rounds=2) for n in (a1, a2, b)])

    # Assert: b, the minority, re-synced from the majority and says so (its half's rounds are
    # replaced, not silently: `resynced` in its round report); the majority did not move to
    # b's lineage; all three agree at the end; nobody lost state
    lost = peers_that_lost_state([a1.node, a2.node, b.node], 4)
    tally.lost(fault, lost)
    assert lost == 0
    resynced = [r.modules[m].resynced_from for r in b.node.history[-2:] for m in ("stem", "L0.M0")]
    assert any(resynced) and set(filter(None, resynced)) <= {a1.node.peer_id, a2.node.peer_id}
    assert not any(r.modules[m].resynced_from for n in (a1, a2) for r in n.node.history for m in r.modules)
    for module_id in ("stem", "L0.M0"):
        for other in (a2, b):
            assert max_difference(a1.node.slots[module_id].outer.global_params,
                                  other.node.slots[module_id].outer.global_params) < 1e-3, module_id
