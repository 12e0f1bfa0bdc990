"""Faults of a volunteer's own machine under a running `p2ptrain join` (a real process, as a
user runs it, on 127.0.0.1): SIGTERM while it averages, and a disk that fills up. The node
must leave or keep training cleanly and never lose its last good checkpoint; its peers
keep training."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from p2ptrain.daemon.control import NotRunning, request
from p2ptrain.home import checkpoint_dir, places
from p2ptrain.train.checkpoint import CheckpointStore
from tests.faults import tally
from tests.swarm.conftest import swarm_config

pytestmark = [pytest.mark.faults, pytest.mark.swarm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
EXIT_BOUND_S = 90.0  # a SIGTERMed node finishes (or abandons) its round and exits well within this


class JoinProcess:
    """`p2ptrain join --json` in its own process group; stdout events and stderr lines are read
    by threads, so neither pipe can fill up and block the node."""

    def __init__(self, home: Path, *args: str):
        self.home = home
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p2ptrain.cli", "join", "--home", str(home), "--host-maddrs", LOOPBACK,
             "--no-identity", "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO, env=env, start_new_session=True)
        self.events: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put(None)  # stdout closed: the process is gone

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)

    def next_event(self, kind: str, timeout: float) -> dict:
        """The next stdout event of `kind` (earlier events of other kinds are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no {kind!r} event within {timeout} s:\n{''.join(self.stderr)[-3000:]}")
            if event is None:
                pytest.fail(f"p2ptrain join exited (code {self.process.wait()}) before a {kind!r} event:\n"
                            f"{''.join(self.stderr)[-3000:]}")
            if event.get("event") == kind:
                return event

    def state(self) -> str | None:
        """The node's phase from its control socket (training, averaging, ...), or None."""
        try:
            answer = request(places(self.home).runtime, {"cmd": "status"}, timeout=2.0)
        except (NotRunning, OSError, ValueError):
            return None
        node = (answer.get("status") or {}).get("node") or {}
        return node.get("state")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for reader in self._readers:
            reader.join(10)


def uncaught_tracebacks(stderr: list[str]) -> list[str]:
    """Tracebacks in a node's stderr other than those hivemind's own logger prints with an
    error it handled (e.g. "Averaging step failed: could not find a group", logged with its
    stack by the averager's process): those are log lines, not crashes."""
    return [line for previous, line in zip([""] + stderr, stderr)
            if line.startswith("Traceback") and "[hivemind." not in previous]


def test_sigterm_while_a_join_node_averages_exits_cleanly_with_its_last_checkpoint(swarm, tmp_path, fault):
    # Prepare: peer a in this process and `p2ptrain join` b on the same (only) path, so b
    # averages every module with a every round
    config = swarm_config("sigterm", levels=(1,), averaging_timeout=15.0, round_seconds=6.0)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    a = swarm.open(config, "0")
    b = JoinProcess(tmp_path / "b", "--initial-peers", a.maddrs[0], "--run-config", str(config_file), "--path", "0")
    stop_a = threading.Event()
    a_rounds: list[int] = []
    a_errors: list[BaseException] = []

    def a_trains():
        try:
            while not stop_a.is_set():
                a.node.run(max_rounds=1)
                a_rounds.append(a.node.round)
        except BaseException as e:  # surfaced below
            a_errors.append(e)

    trainer = threading.Thread(target=a_trains, daemon=True)
    try:
        b.next_event("joined", 180)
        trainer.start()

        # Execute: SIGTERM b as soon as its control socket says it is averaging (watched
        # closely over a few rounds: the outer phase is a second or two of each round)
        deadline = time.monotonic() + 120
        while b.state() != "averaging":
            assert time.monotonic() < deadline, "b was never seen averaging"
            assert b.process.poll() is None, "".join(b.stderr)[-3000:]
            time.sleep(0.05)
        b.process.send_signal(signal.SIGTERM)
        code = b.wait(EXIT_BOUND_S)
        rounds_at_exit = len(a_rounds)
        # a trains on without b: two more rounds
        deadline = time.monotonic() + 180
        while len(a_rounds) < rounds_at_exit + 2 and not a_errors and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_a.set()
        a.node.stop_requested.set()  # abandons the round in progress; its last checkpoint stays
        trainer.join(180)
    finally:
        stop_a.set()
        a.node.stop_requested.set()
        b.kill()
    left = b.next_event("left", 10)

    # Assert: b exited 0 within the bound, without a traceback, having finished the round
    # it was averaging in; its newest checkpoint is that round's, and it verifies and loads;
    # a kept training (two more rounds), finite and checkpointed
    store = CheckpointStore(checkpoint_dir(tmp_path / "b", config.run.id, (0,)))
    checkpoint = store.load_latest()
    a.node.session.store.wait()
    a_checkpoint = a.node.session.store.load_latest()
    lost = int(checkpoint is None or checkpoint.round != left["round"]) + int(
        a_checkpoint is None or a_checkpoint.round != a.node.round
        or not all(torch.isfinite(p).all() for s in a.node.slots.values() for p in s.outer.global_params))
    tally.lost(fault, lost)
    assert lost == 0
    assert code == 0, "".join(b.stderr)[-3000:]
    assert not uncaught_tracebacks(b.stderr), "".join(b.stderr)[-3000:]
    assert left["round"] >= 1
    assert all(torch.isfinite(t).all() for group in checkpoint.groups.values() for t in group.values()
               if t.is_floating_point())
    assert not list(store.root.glob(".tmp-*"))
    assert not a_errors and not trainer.is_alive()
    assert len(a_rounds) >= rounds_at_exit + 2


# ---------------------------------------------------------------------------- disk full

class FullDisk:
    """Fills the disk under a directory, and frees it again.

    As root with mount permission: a small tmpfs mounted on the directory, then filled to
    the last block by a filler file (writes fail with ENOSPC: a real full disk). Where
    mounting is not allowed (an unprivileged container): the node process's own file-size
    limit (RLIMIT_FSIZE) drops to 0, so every write that grows a file fails (EFBIG) — the
    same failure of every write, with another error text."""

    def __init__(self, directory: Path, size_mb: int = 64):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
            capture_output=True).returncode == 0
        self.kind = "tmpfs" if mounted else "rlimit"
        self.error_text = "no space left on device" if mounted else "File too large"
        self._filler = directory / "filler"
        self._pid: int | None = None

    def fill(self, pid: int) -> None:
        if self.kind == "rlimit":
            self._pid = pid
            _, hard = psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE)
            psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE, (0, hard))
            return
        with open(self._filler, "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):
                block = b"\0" * chunk
                try:
                    while True:
                        f.write(block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e

    def free(self) -> None:
        if self.kind == "rlimit":
            if self._pid is not None:
                with contextlib.suppress(psutil.Error):
                    _, hard = psutil.Process(self._pid).rlimit(psutil.RLIMIT_FSIZE)
                    psutil.Process(self._pid).rlimit(psutil.RLIMIT_FSIZE, (hard, hard))
            return
        self._filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.directory)], capture_output=True)


def test_a_full_disk_under_a_running_node_keeps_it_training_and_its_last_good_checkpoint(tmp_path, fault):
    # Prepare: a lone `p2ptrain join` (a new swarm) whose home is on a disk we can fill
    config = swarm_config("disk-full", levels=(1,), round_seconds=5.0)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    home = tmp_path / "home"
    disk = FullDisk(home)
    node = None
    try:
        node = JoinProcess(home, "--new-swarm", "--run-config", str(config_file), "--path", "0")
        node.next_event("joined", 180)
        store = CheckpointStore(checkpoint_dir(home, config.run.id, (0,)))
        node.next_event("round", 120)
        deadline = time.monotonic() + 60
        while store.load_latest() is None:  # the round's checkpoint is written in the background
            assert time.monotonic() < deadline, "no checkpoint was written before the disk filled"
            time.sleep(0.2)

        # Execute: the disk fills up under the running node for two rounds, then frees up
        disk.fill(node.process.pid)
        good = store.load_latest().round
        full_rounds = [node.next_event("round", 120)["round"] for _ in range(2)]
        failing = max(full_rounds)
        deadline = time.monotonic() + 60
        while not any(f"could not write the round {failing} checkpoint" in line for line in node.stderr):
            assert time.monotonic() < deadline, "".join(node.stderr)[-3000:]
            time.sleep(0.2)
        during = store.load_latest()
        disk.free()
        after = node.next_event("round", 120)["round"]
        deadline = time.monotonic() + 60
        while store.load_latest().round < after:
            assert time.monotonic() < deadline, "no checkpoint was written once the disk had space again"
            time.sleep(0.2)
        node.process.send_signal(signal.SIGINT)
        code = node.wait(EXIT_BOUND_S)
        left = node.next_event("left", 10)
    finally:
        if node is not None:
            node.kill()
        final = CheckpointStore(checkpoint_dir(home, config.run.id, (0,))).load_latest()
        disk.close()

    # Assert: while the disk was full the node kept training (rounds went on) and said so in
    # one line per failed write, naming the cause and the checkpoint that stays; the last good
    # checkpoint stayed loadable throughout; once there was space it checkpointed again, and it
    # left cleanly with its last round on disk
    errors = [line for line in node.stderr if "could not write the round" in line]
    assert errors and all(disk.error_text in line and "checkpoint stays" in line for line in errors), errors
    assert not uncaught_tracebacks(node.stderr), "".join(node.stderr)[-3000:]
    assert full_rounds[0] < full_rounds[1]
    lost = int(during is None or during.round < good or final is None or final.round != left["round"])
    tally.lost(fault, lost)
    assert lost == 0
    assert after > failing
    assert code == 0, "".join(node.stderr)[-3000:]


# ---------------------------------------------------------------------------- DHT process killed

def test_a_node_whose_dht_process_is_killed_stops_with_a_clear_error_and_its_last_checkpoint(tmp_path, fault):
    # Prepare: a lone `p2ptrain join` that has trained a round and checkpointed it
    config = swarm_config("dht-killed", levels=(1,), round_seconds=5.0)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    home = tmp_path / "home"
    node = JoinProcess(home, "--new-swarm", "--run-config", str(config_file), "--path", "0")
    store = CheckpointStore(checkpoint_dir(home, config.run.id, (0,)))
    try:
        node.next_event("joined", 180)
        node.next_event("round", 120)
        deadline = time.monotonic() + 60
        while store.load_latest() is None:  # the round's checkpoint is written in the background
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        helpers = psutil.Process(node.process.pid).children(recursive=True)
        # the DHT is the node's first child process (started before the module averagers)
        dht = min((p for p in helpers if p.ppid() == node.process.pid and "python" in p.name().lower()),
                  key=lambda p: p.create_time())

        # Execute: the DHT process dies the way the out-of-memory killer ends it
        dht.send_signal(signal.SIGKILL)
        code = node.wait(EXIT_BOUND_S)
        left_behind = []
        if code is not None:  # torch's shared-memory manager leaves a moment after its last client
            _, alive = psutil.wait_procs([p for p in helpers if p.pid != dht.pid], timeout=10)
            left_behind = [(p.pid, p.name()) for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        node.kill()
    final = store.load_latest()

    # Assert: the node stopped within the bound with the swarm error's exit code and one line
    # naming the cause, no traceback; its last checkpoint is whole; none of its other helper
    # processes (averagers, p2pd, torch's shared-memory manager) outlived it by more than 10 s
    lost = int(final is None or not all(torch.isfinite(t).all() for group in final.groups.values()
                                        for t in group.values() if t.is_floating_point()))
    tally.lost(fault, lost)
    assert lost == 0
    assert code == 6, "".join(node.stderr)[-3000:]
    assert any(line.startswith("error: ") and "DHT process" in line and "has exited" in line
               for line in node.stderr), "".join(node.stderr)[-3000:]
    assert not uncaught_tracebacks(node.stderr), "".join(node.stderr)[-3000:]
    assert not left_behind, left_behind
