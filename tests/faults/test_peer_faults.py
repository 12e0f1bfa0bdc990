"""Peers that die or misbehave at the worst moments, on real loopback peers: the honest
survivors keep training, end the faulty round the same way, agree again, and lose nothing."""

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

from p2ptrain.errors import SwarmError
from p2ptrain.swarm.dht import start_dht
from tests.faults import tally
from tests.swarm.conftest import in_parallel, swarm_config

pytestmark = [pytest.mark.faults, pytest.mark.swarm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SHARED = ("stem", "L0.M0")
MAX_ROUNDS_TO_FAIL = 4


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def peers_that_lost_state(nodes, rounds_expected: int) -> int:
    """Honest peers whose agreed state is gone: non-finite globals, fewer rounds than run, or
    no loadable checkpoint of their last round."""
    lost = 0
    for node in nodes:
        node.session.store.wait()
        finite = all(torch.isfinite(p).all() for s in node.slots.values() for p in s.outer.global_params)
        checkpoint = node.session.store.load_latest()
        if not finite or len(node.history) < rounds_expected or checkpoint is None \
                or checkpoint.round != node.round:
            lost += 1
    return lost


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            return False
        if text in line:
            return True
    return False


@pytest.mark.parametrize("mode,line", [("after_matchmaking", "MATCHED"), ("while_sending", "SENDING")])
def test_a_peer_sigkilled_mid_round_leaves_survivors_that_agree_and_keep_training(swarm, tmp_path, fault, mode,
                                                                                  line):
    # Prepare: survivors a and b here, and a peer in its own process that stops at `line`
    config = swarm_config(f"kill-{mode}", levels=(1,), averaging_timeout=15.0, round_seconds=6.0)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    victim = subprocess.Popen(
        [sys.executable, str(REPO / "tests/faults/faulty_peer.py"), mode, str(tmp_path / "victim"),
         str(config_file), "0", a.maddrs[0]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    rounds = 0
    try:
        assert _wait_for_line(victim, "JOINED", 180), "the faulty peer did not join"
        deadline = time.monotonic() + 60
        while len(a.node.fetch_peers()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = threading.Event()

        def kill_at_the_line():
            if _wait_for_line(victim, line, 400):
                os.killpg(victim.pid, signal.SIGKILL)
                killed.set()

        killer = threading.Thread(target=kill_at_the_line, daemon=True)
        killer.start()

        # Execute: rounds until the one in which the victim dies, then two more
        for _ in range(MAX_ROUNDS_TO_FAIL):
            in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
            rounds += 1
            killer.join(5)
            if killed.is_set():
                break
        in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))
        rounds += 2
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    # Assert: the victim died at the line; both survivors ran every round, agree on every
    # shared module, and their last round averaged together without the dead peer
    assert killed.is_set(), f"the faulty peer never reached {line} in a group with both survivors"
    lost = peers_that_lost_state([a.node, b.node], rounds)
    tally.lost(fault, lost)
    assert lost == 0
    assert len(a.node.history) == len(b.node.history) == rounds
    assert a.node.round == b.node.round
    for module_id in SHARED:
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) < 1e-3, module_id
    last = a.node.history[-1].modules
    assert all(sorted(last[m].group) == sorted([a.node.peer_id, b.node.peer_id]) for m in SHARED)


def test_too_few_peers_cost_a_bounded_wait_and_training_continues(swarm, fault):
    # Prepare: two holders; b leaves for good after one round together (its record lingers)
    config = swarm_config("too-few", levels=(1,), round_seconds=6.0)
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    b.close()
    swarm.nodes.remove(b)

    # Execute: a trains on alone
    a.node.run(max_rounds=3)

    # Assert: every round completed, each module averaged alone; a waited at most its
    # matchmaking bound (3 windows) plus the averaging timeout per round, never forever
    lost = peers_that_lost_state([a.node], 4)
    tally.lost(fault, lost)
    assert lost == 0
    later = a.node.history[1:]
    assert len(later) == 3
    assert all(r.modules[m].alone for r in later for m in SHARED)
    bound = 3 * config.averaging.matchmaking_time + config.averaging.averaging_timeout
    assert all(r.seconds_outer < bound for r in later)
    assert later[-1].loss < a.node.history[0].loss


def test_a_bootstrap_peer_with_the_wrong_peer_id_is_a_clean_error(swarm, fault):
    # Prepare: a real peer's address, with the peer id of another (now gone) node
    config = swarm_config("wrong-id", levels=(1,))
    a = swarm.open(config, "0")
    other = start_dht([])
    wrong_id = other.peer_id.to_base58()
    other.shutdown()
    address = a.maddrs[0].rsplit("/p2p/", 1)[0] + "/p2p/" + wrong_id

    # Execute / Assert: joining through it fails with a message, in bounded time; a is unharmed
    with pytest.raises(SwarmError, match="initial peers answered"):
        start_dht([address], attempts=2, backoff_s=0.5)
    a.node.run(max_rounds=1)
    lost = peers_that_lost_state([a.node], 1)
    tally.lost(fault, lost)
    assert lost == 0


def test_version_skew_is_a_clean_error_naming_both_versions(swarm, fault, monkeypatch):
    # Prepare: a run published by a p2ptrain that speaks the next protocol
    import p2ptrain.swarm.records as records
    config = swarm_config("skew", levels=(1,))
    monkeypatch.setattr(records, "PROTOCOL_VERSION", records.PROTOCOL_VERSION + 1)
    monkeypatch.setattr(records, "__version__", "9.9.9")
    a = swarm.open(config, "0")
    monkeypatch.undo()

    # Execute / Assert: a joiner of today's protocol is told both versions, and nothing starts
    with pytest.raises(SwarmError, match=r"speaks protocol \d+ \(p2ptrain 9\.9\.9\).*this p2ptrain .* speaks "
                                         r"protocol \d+"):
        swarm.open(config, "0", initial_peers=a.maddrs)
    intact = all(torch.isfinite(p).all() for s in a.node.slots.values() for p in s.outer.global_params)
    tally.lost(fault, 0 if intact else 1)
    assert intact
