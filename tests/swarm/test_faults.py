"""Staying in sync when things go wrong: a late joiner downloads the current state, and a
peer killed mid all-reduce leaves the survivors to detect the partial average and re-sync."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.swarm.conftest import in_parallel, swarm_config

MAX_ROUNDS_TO_KILL = 4

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


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
    assert max_difference(c.node.slots["stem"].outer.global_params, b.node.slots["stem"].outer.global_params) < 1e-4


def test_a_peer_killed_mid_all_reduce_leaves_survivors_that_resync_and_agree_again(swarm, tmp_path):
    # Prepare: survivors a and b in this process and a peer v that stalls mid all-reduce in
    # a group of all three; one path, so every module is shared by all three
    config = swarm_config("killed-peer", levels=(1,), averaging_timeout=15.0)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    victim = subprocess.Popen(
        [sys.executable, str(REPO / "tests/swarm/stalling_peer.py"), str(tmp_path / "victim"), str(config_file),
         "0", a.maddrs[0]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert _wait_for_line(victim, "JOINED", 120), "the stalling peer did not join"
        deadline = time.monotonic() + 60
        while len(a.node.fetch_peers()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = threading.Event()

        def kill_when_reducing():
            if _wait_for_line(victim, "REDUCING", 200):
                os.killpg(victim.pid, signal.SIGKILL)
                killed.set()

        killer = threading.Thread(target=kill_when_reducing, daemon=True)
        killer.start()

        # Execute: rounds until the one during which the victim dies (normally the first: on
        # a loaded machine the victim may miss a group), then one more
        for _ in range(MAX_ROUNDS_TO_KILL):
            in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
            killer.join(5)
            if killed.is_set():
                break
        in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    # Assert: the round the victim died in left a module inconsistent (hivemind returned
    # normally), and the survivors noticed it — right away through the fingerprints of the
    # average, or at the next round through the global-state fingerprints in `gather`
    # (the victim prints REDUCING only as a reducer in a group with both survivors; their
    # all-reduce then returns with its slice missing, or fails and they step alone)
    assert killed.is_set(), "the victim never became a reducer in a group with both survivors"
    (killed_a, next_a), (killed_b, next_b) = a.node.history[-2:], b.node.history[-2:]
    shared = ("stem", "L0.M0")
    noticed = [m for m in shared for r in (killed_a, killed_b, next_a, next_b)
               if r.modules[m].partial or r.modules[m].resynced_from]
    assert noticed, "no survivor noticed the partial all-reduce"
    # the next round is consistent again: no partial average, and the same parameters
    assert not any(r.modules[m].partial for r in (next_a, next_b) for m in shared)
    for module_id in shared:
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) < 1e-4, module_id
    assert a.node.round == b.node.round == a.node.history[-1].round


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            return False
        if text in line:
            return True
    return False
