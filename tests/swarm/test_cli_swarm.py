"""`p2ptrain join`, `peers` and `make demo` as a user runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.swarm.conftest import swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def p2ptrain(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "p2ptrain.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"p2ptrain did not exit within {timeout} s:\n{err[-2000:]}")
    return process.returncode, out, err


def test_unreachable_bootstrap_peers_give_a_clear_error_and_exit_code(tmp_path, swarm):
    # Prepare: the address of a peer that has since left
    gone = swarm.open(swarm_config("gone"), "0,0")
    address = gone.maddrs[0]
    swarm.close()

    # Execute
    code, out, err = finish(p2ptrain("join", "--home", str(tmp_path), "--initial-peers", address,
                                     "--host-maddrs", LOOPBACK, "--no-identity"))

    # Assert: one clear line, exit code 6 (SwarmError), no traceback, no separate swarm started
    assert code == 6
    assert "error: none of the 1 initial peers answered after 4 attempts" in err
    assert "Traceback" not in err
    assert "joined" not in out


@pytest.mark.parametrize("args, message", [
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1"], "lacks the peer id"),
    (["--initial-peers", "not-an-address"], "is not a valid multiaddr"),
    (["--bootstrap-file", "EMPTY"], "no initial peers"),
])
def test_bad_or_missing_initial_peers_are_refused_before_anything_starts(tmp_path, args, message):
    empty = tmp_path / "peers.txt"
    empty.write_text("# nobody yet\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    code, _, err = finish(p2ptrain("join", "--home", str(tmp_path), "--host-maddrs", LOOPBACK, *args), 120)
    assert code == 6
    assert message in err and "Traceback" not in err


def test_join_trains_lists_itself_in_peers_and_leaves_cleanly_on_ctrl_c(tmp_path):
    # Prepare
    config_file = tmp_path / "run.toml"
    config_file.write_text(swarm_config("cli-join", steps_per_round=20).to_toml())
    node = p2ptrain("join", "--home", str(tmp_path / "a"), "--new-swarm", "--run-config", str(config_file),
                    "--host-maddrs", LOOPBACK, "--path", "1,0", "--json")
    try:
        joined = json.loads(node.stdout.readline())
        assert joined["event"] == "joined" and joined["created_run"] and joined["path"] == "1,0"
        assert json.loads(node.stdout.readline())["event"] == "round"

        # Execute: a node operator looks at the swarm, then the volunteer presses Ctrl-C
        code, out, err = finish(p2ptrain("peers", "--initial-peers", joined["maddrs"][0], "--run-id", "cli-join",
                                         "--host-maddrs", LOOPBACK, "--json"), 120)
        assert code == 0, err
        listing = json.loads(out)
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        daemons = [p for p in tree if p.name() == "p2pd"]
        sockets = {c.laddr for p in tree for c in p.net_connections(kind="unix") if c.laddr.startswith("/tmp/")}
        node.send_signal(signal.SIGINT)
        code, out, err = finish(node, 120)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)

    # Assert
    assert listing["run_found"] and [p["path"] for p in listing["peers"]] == ["1,0"]
    assert listing["coverage"]["L1.M0"] == 1 and listing["coverage"]["L0.M0"] == 0
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["event"] == "left"
    assert "Traceback" not in err
    assert daemons and not any(d.is_running() and d.status() != psutil.STATUS_ZOMBIE for d in daemons)
    # the DHT's and every averager's connections to p2pd were sockets in /tmp: none is left there
    assert len(sockets) >= 3 and not [s for s in sockets if os.path.exists(s)]
    assert list((tmp_path / "a/runs/cli-join/checkpoints/path-1-0").glob("round-*"))


def test_make_demo_runs_a_four_peer_swarm_to_an_evaluation(tmp_path):
    # Execute: the demo as `make demo` runs it, with fewer rounds
    process = subprocess.Popen([sys.executable, "-m", "p2ptrain.demo", "--rounds", "2", "--steps-per-round", "10",
                                "--home", str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, start_new_session=True)
    code, out, err = finish(process, 400)

    # Assert: the four peers averaged the shared stem across paths and the mixture improved
    # on the init (how many met in each round depends on the machine's load, so any group counts)
    assert code == 0, err[-3000:]
    assert "all 4 peers are in" in out
    assert any(f"stem:{n}" in out for n in (2, 3, 4))
    summary = [line for line in out.splitlines() if line.startswith("mixture loss")][0]
    trained, init = (float(x) for x in summary.replace("(init", "").replace(")", "").split()[2:4])
    assert trained < init


def test_with_overlap_the_last_rounds_averaging_is_reported_when_it_lands_at_stop(tmp_path):
    # Prepare: a lone node with overlapped averaging (each round's average lands one round late)
    config_file = tmp_path / "run.toml"
    config_file.write_text(swarm_config("cli-overlap", overlap=True).to_toml())

    # Execute: two rounds, then the node stops on its own
    code, out, err = finish(p2ptrain("join", "--home", str(tmp_path / "a"), "--new-swarm", "--run-config",
                                     str(config_file), "--host-maddrs", LOOPBACK, "--path", "0,0",
                                     "--max-rounds", "2", "--json"))

    # Assert: the round events carry the averaging that landed during them (none in the first,
    # the first trained round's in the second); the second trained round's comes last, as a
    # `landed` event, before `left` (round numbers are the swarm schedule's: a slow start skips some)
    assert code == 0, err
    events = [json.loads(line) for line in out.strip().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-3:] == ["round", "landed", "left"] and kinds.count("round") == 2, kinds
    first, second = [e for e in events if e["event"] == "round"]
    landed, left = events[-2:]
    assert first["round"] == 0 and first["peers_per_module"] == {}
    assert 0 < second["round"] < landed["round"] and second["peers_per_module"] == {"stem": 1, "L0.M0": 1, "L1.M0": 1}
    assert landed["round"] == left["round"]
    assert landed["peers_per_module"] == {"stem": 1, "L0.M0": 1, "L1.M0": 1}
    assert "Traceback" not in err
