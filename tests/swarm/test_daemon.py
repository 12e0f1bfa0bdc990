"""The daemon as a volunteer runs it: real `p2ptrain daemon …` processes against a real
loopback swarm (a second peer is a foreground `p2ptrain join`).

The daemons detach (they are not this process's children), so this module makes the test
process a child subreaper: a detached daemon is re-parented to it, and its real exit
status can be read with waitpid.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from p2ptrain.daemon.prefs import Preferences
from tests.swarm.conftest import swarm_config
from tests.unit.conftest import write_topic_docs

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
PR_SET_CHILD_SUBREAPER = 36
# a shared 2-core machine: other programs' CPU must not suspend the test daemons, nor free disk,
# and at nice 19 a daemon would barely run next to other engineers' tests (nice is tested in unit/)
QUIET_PREFS = {"suspend_cpu_usage": 0, "disk_min_free_gb": 0, "ram_max_used_busy_frac": 1,
               "ram_max_used_idle_frac": 1, "low_priority": False}


# ------------------------------------------------------------------ helpers

def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2ptrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=timeout)


def status(home: Path) -> dict:
    done = cli("status", "--json", "--home", home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(what: str, predicate, timeout: float = 180, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def family(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def reap(pid: int, timeout: float = 150) -> int:
    """The exit code of a (re-parented) daemon."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status_ = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status_)
        time.sleep(0.2)
    pytest.fail(f"pid {pid} did not exit within {timeout} s")


class Join:
    """A foreground `p2ptrain join --json` peer whose events are read in the background."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "p2ptrain.cli", "join", "--json", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env=env(), start_new_session=True)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def rounds(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "round"]

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            _, err = self.process.communicate()
        self._reader.join(5)
        return self.process.returncode, err


@pytest.fixture
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def run_files(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(swarm_config("daemon-test", steps_per_round=3, round_seconds=6.0).to_toml())
    data = write_topic_docs(tmp_path / "data", docs_per_topic=30)
    return config, data


def quiet_home(path: Path, **prefs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    Preferences.from_dict({**QUIET_PREFS, **prefs}).save(path / "prefs.toml")
    return path


class Daemons:
    """Every daemon home a test used: stopped (SIGKILL as a last resort) at the end."""

    def __init__(self):
        self.homes: list[Path] = []

    def start(self, home: Path, *args) -> int:
        self.homes.append(home)
        done = cli("daemon", "start", "--json", "--home", home, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["pid"]

    def cleanup(self):
        for home in self.homes:
            try:
                info = json.loads((home / "daemon" / "daemon.pid").read_text())
                procs = family(info["pid"])
            except (OSError, ValueError, psutil.NoSuchProcess):
                continue
            for p in alive(procs):
                p.kill()
            psutil.wait_procs(procs, timeout=10)
            try:
                os.waitpid(info["pid"], os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture
def daemons(subreaper):
    d = Daemons()
    try:
        yield d
    finally:
        d.cleanup()


def node_args(config: Path, data: Path, *extra) -> list:
    return ["--run-config", config, "--data", data, "--host-maddrs", LOOPBACK, "--device", "cpu", *extra]


# ------------------------------------------------------------------ tests

def test_daemon_lifecycle_with_a_second_peer(tmp_path, run_files, daemons):
    """start → status (running, rounds advance, averaging with the other peer) → mode never
    (suspended: no inner steps while the other peer keeps averaging) → mode auto (trains
    again) → SIGTERM → exit 0, a checkpoint on disk, no p2pd left."""
    config, data = run_files
    other = Join("--home", tmp_path / "b", "--new-swarm", *node_args(config, data, "--path", "1,0"))
    try:
        joined = wait_for("the other peer to join", lambda: next((e for e in other.events
                                                                 if e.get("event") == "joined"), None))
        home = quiet_home(tmp_path / "a")

        # --- start: returns at once with the pid; the daemon trains and averages with the other peer
        pid = daemons.start(home, "--initial-peers", joined["maddrs"][0], "--metrics-port", 0,
                            *node_args(config, data, "--path", "0,0"))
        first = status(home)
        assert first["kind"] == "daemon" and first["pid"] == pid and first["state"] in ("starting", "running")
        averaged = wait_for("rounds averaged with the other peer", lambda: (
            lambda s: s if s["node"] and s["node"]["rounds_done"] >= 2
            and s["node"]["last_round"].get("stem", {}).get("peers") == 2 else None)(status(home)), timeout=300)
        assert averaged["state"] == "running" and averaged["suspended"] == []
        assert averaged["node"]["path"] == "0,0" and averaged["node"]["round"] >= 2
        # the dashboard and Prometheus metrics, as with `join --metrics-port`
        assert averaged["dashboard"].startswith("http://127.0.0.1:")
        with urllib.request.urlopen(averaged["dashboard"] + "metrics", timeout=30) as reply:
            assert "p2ptrain_" in reply.read().decode()

        # --- mode never: suspended; no inner step while the other peer keeps averaging
        done = cli("daemon", "mode", "never", "--home", home)
        assert done.returncode == 0, done.stderr
        assert "suspended — user request" in done.stdout
        sitting = wait_for("the driver to sit out", lambda: (
            lambda s: s if s["node"]["state"] == "suspended" else None)(status(home)), timeout=120)
        assert sitting["state"] == "suspended" and sitting["suspended"] == ["user request"]
        # on a CPU, leave_apps_in_memory = false has nothing to free
        assert sitting["node"]["device"] == "cpu" and sitting["node"]["offloaded"] is False
        tokens_then, other_rounds_then = sitting["node"]["tokens"], len(other.rounds())
        wait_for("three more rounds of the other peer", lambda: len(other.rounds()) >= other_rounds_then + 3,
                 timeout=120)
        still = status(home)
        listing = cli("peers", "--json", "--initial-peers", joined["maddrs"][0], "--run-id", "daemon-test",
                      "--host-maddrs", LOOPBACK, timeout=120)
        assert still["node"]["tokens"] == tokens_then and still["node"]["state"] == "suspended"
        assert other.rounds()[-1]["peers_per_module"]["stem"] == 1  # a suspended node is not waited for
        assert listing.returncode == 0, listing.stderr
        suspended = {p["path"]: p["suspended"] for p in json.loads(listing.stdout)["peers"]}
        assert suspended == {"0,0": ["user request"], "1,0": []}
        # each record carries its home's ledger: the daemon's is what its status reads from disk
        since = {p["path"]: p["since_install"] for p in json.loads(listing.stdout)["peers"]}
        mine = still["contributed"]
        assert since["0,0"] == {"tokens": mine["tokens"], "rounds": mine["rounds"],
                                "rounds_averaged": mine["rounds_averaged"], "hours": pytest.approx(mine["hours"])}
        assert since["0,0"]["rounds"] >= 2 and since["0,0"]["rounds_averaged"] >= 1
        assert since["1,0"]["rounds_averaged"] >= 1

        # --- mode auto: trains again
        done = cli("daemon", "mode", "auto", "--home", home)
        assert done.returncode == 0 and "now running" in done.stdout
        resumed = wait_for("inner steps after the resume", lambda: (
            lambda s: s if s["node"]["tokens"] > tokens_then else None)(status(home)), timeout=120)
        assert resumed["state"] == "running"

        # --- SIGTERM: exit 0 with a checkpoint on disk and no p2pd left
        procs = family(pid)
        assert any(p.name() == "p2pd" for p in procs)
        os.kill(pid, signal.SIGTERM)
        code = reap(pid)
        psutil.wait_procs(procs, timeout=10)
    finally:
        other_code, other_err = other.stop()

    assert code == 0
    assert not alive(procs)
    assert sorted((home / "runs" / "daemon-test" / "checkpoints" / "path-0-0").glob("round-*"))
    assert not list((home / "runs" / "daemon-test" / "checkpoints" / "path-0-0").glob(".tmp-*"))
    after = status(home)
    assert after["state"] == "stopped" and after["last_exit"]["code"] == 0
    assert other_code == 0, other_err[-2000:]
    log = (home / "logs" / "daemon.log").read_text()
    assert "run mode: never" in log and "suspended — user request" in log and "daemon exits with code 0" in log


def test_stale_pid_second_start_sigkill_and_resume(tmp_path, run_files, daemons):
    """A stale pid file is replaced; a second start is refused; after a SIGKILL no p2pd
    outlives the daemon by 10 s, and the next start resumes from the checkpoint."""
    config, data = run_files
    home = quiet_home(tmp_path / "a")
    # a pid file left behind whose pid now belongs to an unrelated live process
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        (home / "daemon").mkdir()
        (home / "daemon" / "daemon.pid").write_text(json.dumps({"pid": stranger.pid, "create_time": 1.0}))
        before = status(home)
        args = ["--new-swarm", *node_args(config, data, "--path", "0,0")]

        # --- start over a stale pid file; a second start is refused
        pid = daemons.start(home, *args)
        second = cli("daemon", "start", "--home", home, *args)
        assert stranger.poll() is None  # the stranger was left alone
    finally:
        stranger.kill()
        stranger.wait()
    assert before["state"] == "stopped"
    assert before["stale_pid_file"] == f"pid {stranger.pid} is now another process (sleep)"
    assert second.returncode == 2
    assert f"error: a p2ptrain node is already running in this home (daemon, pid {pid})" in second.stderr

    # --- SIGKILL after a checkpoint: no orphan within 10 s
    trained = wait_for("two checkpointed rounds", lambda: (
        lambda s: s if s["node"] and s["node"]["rounds_done"] >= 2 and s["checkpoint"] else None)(status(home)),
        timeout=300)
    steps_at_checkpoint = json.loads((Path(trained["checkpoint"]["dir"]) / "manifest.json").read_text())["meta"]["step"]
    procs = family(pid)
    names = sorted(p.name() for p in procs)
    assert "p2pd" in names
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    _, left = psutil.wait_procs(procs, timeout=10)
    left = alive(left)
    assert not left, f"still running 10 s after the SIGKILL: {[p.name() for p in left]}"
    killed = status(home)
    assert killed["state"] == "stopped" and killed["stale_pid_file"] == f"pid {pid} is gone"
    last_round = killed["checkpoint"]["round"]
    assert last_round >= trained["checkpoint"]["round"]

    # --- the next start resumes from that checkpoint
    pid2 = daemons.start(home, *args)
    resumed = wait_for("the restarted node", lambda: (lambda s: s if s["node"] else None)(status(home)), timeout=180)
    # the model, optimizer and data order come back: the inner step count goes on from the checkpoint's
    # (a lone node restarted with --new-swarm starts a new swarm, whose round numbers start again)
    assert resumed["restored_round"] == last_round
    assert resumed["inner_steps"] >= steps_at_checkpoint > 0
    done = cli("daemon", "stop", "--home", home)
    assert done.returncode == 0, done.stderr
    assert reap(pid2) == 0
    log = (home / "logs" / "daemon.log").read_text()
    assert f"removed a stale pid file" in log or f"pid {stranger.pid} is now another process" in log
    assert f"the previous daemon did not exit cleanly (pid {pid} is gone)" in log
    assert f"(resumed from the round {last_round} checkpoint)" in log


@pytest.mark.alone  # reads other programs' CPU: not a neighbouring test's (tests/conftest.py)
@pytest.mark.timeout(1800)  # waits for a quiet moment on a shared machine
def test_suspends_while_a_real_program_burns_cpu_and_resumes_when_it_ends(tmp_path, run_files, daemons):
    """Needs a moment when other programs leave the machine some headroom: every program
    counts, so on a machine that others keep saturated the burner cannot be told apart
    (and a suspended node rightly stays suspended); the test waits up to 15 minutes for one."""
    config, data = run_files
    ncpu = psutil.cpu_count()
    home = quiet_home(tmp_path / "a")  # suspend_cpu_usage = 0 while it starts: the machine is shared
    pid = daemons.start(home, "--new-swarm", *node_args(config, data, "--path", "0,0"))
    wait_for("a first round", lambda: (lambda s: s if s["node"] and s["node"]["rounds_done"] >= 1 else None)(
        status(home)), timeout=300)
    # other engineers' work counts as other programs too: wait for a moment with headroom, then ask
    # the running daemon (no restart) to suspend when other programs use more than 60 % of the machine
    wait_for("a quiet machine", lambda: (status(home)["readings"] or {}).get("others_cpu_pct", 100) < 40,
             timeout=900)
    done = cli("prefs", "set", "suspend_cpu_usage", "60", "--home", home)
    assert done.returncode == 0 and "the running daemon applied it" in done.stdout, done.stderr
    wait_for("running under the new preference", lambda: status(home)["state"] == "running", timeout=600)

    # Execute: burners on every core, not started by the daemon (so not its own CPU)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(ncpu)]
    try:
        busy = wait_for("the CPU suspension", lambda: (
            lambda s: s if "CPU is busy" in s["suspended"] else None)(status(home)), timeout=120)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    resumed = wait_for("the resume", lambda: (
        lambda s: s if "CPU is busy" not in s["suspended"] else None)(status(home)), timeout=600)

    # Assert
    assert busy["state"] == "suspended" and busy["readings"]["others_cpu_pct"] > 60
    assert resumed["state"] in ("running", "suspended")  # (another program may have taken over)
    done = cli("daemon", "stop", "--home", home)
    assert done.returncode == 0, done.stderr
    assert reap(pid) == 0
    log = (home / "logs" / "daemon.log").read_text()
    assert "suspended — CPU is busy" in log and "resumed" in log


def test_foreground_join_answers_status_and_stop(tmp_path, run_files):
    config, data = run_files
    home = tmp_path / "j"
    node = Join("--home", home, "--new-swarm", *node_args(config, data, "--path", "1,0"))
    try:
        wait_for("a round", lambda: node.rounds(), timeout=300)
        seen = status(home)
        refused = cli("daemon", "start", "--new-swarm", "--home", home, *node_args(config, data))
        mode = cli("daemon", "mode", "never", "--home", home)
        stopped = cli("daemon", "stop", "--home", home)
        code, err = node.stop()
    finally:
        node.stop()

    assert seen["kind"] == "join" and seen["state"] == "running" and seen["node"]["path"] == "1,0"
    assert refused.returncode == 2 and "already running in this home (join, pid" in refused.stderr
    assert mode.returncode == 2 and "foreground `join`" in mode.stderr
    assert stopped.returncode == 0 and "stopped (pid" in stopped.stdout
    assert code == 0, err[-2000:]
    assert node.events[-1]["event"] == "left"
    assert status(home)["state"] == "stopped"
