"""The daemon's lifecycle pieces on their own: the pid file and instance lock, the log
rotation, the lifeline (children die with the node), pacing, and the policy tick."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from p2ptrain.daemon import service
from p2ptrain.daemon.pacing import Pacer, threads_for
from p2ptrain.daemon.policy import CPU_BUSY, ON_BATTERIES, USER_REQUEST, Battery, Readings
from p2ptrain.daemon.prefs import Preferences
from p2ptrain.home import places

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------- instance lock

def test_a_second_node_in_the_same_home_is_refused(tmp_path):
    here = places(tmp_path)
    first = service.InstanceLock(here, "daemon").acquire()
    try:
        with pytest.raises(service.AlreadyRunning) as caught:
            service.InstanceLock(here, "join").acquire()
        holder = service.running_node(here)
    finally:
        first.release()

    assert f"already running in this home (daemon, pid {os.getpid()})" in str(caught.value)
    assert holder is not None and holder.pid == os.getpid() and holder.kind == "daemon"
    assert not here.pid_file.exists() and service.running_node(here) is None


def test_a_stale_pid_file_naming_another_live_process_is_replaced(tmp_path):
    # Prepare: a pid file left by a killed daemon whose pid now belongs to an unrelated process
    here = places(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        here.pid_file.parent.mkdir(parents=True)
        here.pid_file.write_text(json.dumps({"pid": other.pid, "create_time": time.time() - 3600,
                                             "kind": "daemon"}))

        # Execute
        status = service.offline_status(here)
        lock = service.InstanceLock(here, "daemon").acquire()
        written = json.loads(here.pid_file.read_text())
        lock.release()
    finally:
        other.kill()
        other.wait()

    # Assert: detected as stale (the pid exists but is not ours), and taken over
    assert service.running_node(here) is None
    assert status["state"] == "stopped"
    assert status["stale_pid_file"] == f"pid {other.pid} is now another process (sleep)"
    assert lock.replaced == f"pid {other.pid} is now another process (sleep)"
    assert written["pid"] == os.getpid() and written["kind"] == "daemon"


def test_a_pid_file_of_a_dead_process_is_stale(tmp_path):
    here = places(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    here.pid_file.parent.mkdir(parents=True)
    here.pid_file.write_text(str(gone.pid))
    assert service.running_node(here) is None
    assert service.stale_reason(service.read_pid_file(here.pid_file)) == f"pid {gone.pid} is gone"


# ------------------------------------------------------------- logs

def test_the_log_rotates_and_stays_bounded(tmp_path, monkeypatch):
    here = places(tmp_path)
    monkeypatch.setattr(service, "LOG_MAX_BYTES", 20_000)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        service.setup_daemon_logging(here, to_stderr=False)
        log = logging.getLogger("p2ptrain.test")
        for i in range(2000):
            log.info("line %05d %s", i, "x" * 60)
    finally:
        for h in list(root.handlers):
            h.close()
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])

    files = sorted(here.logs.glob("daemon.log*"))
    assert [f.name for f in files] == ["daemon.log", "daemon.log.1", "daemon.log.2", "daemon.log.3"]
    assert all(f.stat().st_size <= 20_000 for f in files)
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files)
    assert "line 01999" in (here.logs / "daemon.log").read_text()
    assert oct(here.log_file.stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------- lifeline

LIFELINE_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, subprocess, sys, threading, time
    mp.set_start_method("fork", force=True)
    from p2ptrain.daemon import lifeline
    lifeline.install()

    def sleeper():
        time.sleep(600)

    forked = mp.Process(target=sleeper, daemon=True)
    forked.start()
    # a fork from another thread gets the watchdog instead of the parent-death signal
    from_thread = []
    t = threading.Thread(target=lambda: from_thread.append(mp.Process(target=sleeper, daemon=True)))
    t.start(); t.join()
    from_thread[0].start()
    # p2pd's launcher: exec'd with the parent-death signal set
    from hivemind.p2p.p2p_daemon import P2P
    argv = P2P._make_process_args("/bin/sleep", x=None)
    argv = [a for a in argv if a != "-x"] + ["600"]
    launched = subprocess.Popen(argv)
    print(forked.pid, from_thread[0].pid, launched.pid, flush=True)
    time.sleep(600)
""")


def test_children_die_with_a_sigkilled_parent(tmp_path):
    # Prepare: a parent with the lifeline and three kinds of children
    script = tmp_path / "parent.py"
    script.write_text(LIFELINE_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    pids = [int(p) for p in parent.stdout.readline().split()]
    children = [psutil.Process(p) for p in pids]
    for _ in range(100):  # the launcher execs sleep in a moment
        launched_name = children[2].name()
        if launched_name != "python" and not launched_name.startswith("python"):
            break
        time.sleep(0.05)

    # Execute
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)

    # Assert: every child went within the time limit; the launched one had become `sleep`
    for p in alive:
        p.kill()
    assert len(pids) == 3 and not alive
    assert launched_name == "sleep"


# ------------------------------------------------------------- pacing

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def wait(self, seconds):
        self.t += seconds
        return False


def test_duty_cycle_pauses_in_proportion_to_the_work():
    clock = FakeClock()
    prefs = Preferences.from_dict({"cpu_usage_limit": 25})
    threads = []
    pacer = Pacer(lambda: prefs, threading.Event(), clock=clock, base_threads=8, set_threads=threads.append,
                  wait=clock.wait)
    pacer.round_started()

    clock.t += 3.0  # three seconds of inner steps
    paused = pacer.after_steps()

    assert paused == pytest.approx(9.0)  # 25 %: work 3 s, rest 9 s
    assert threads == [8]


def test_no_pause_at_100_percent_and_threads_follow_max_ncpus_pct():
    clock = FakeClock()
    current = {"prefs": Preferences.defaults()}
    threads = []
    pacer = Pacer(lambda: current["prefs"], threading.Event(), clock=clock, base_threads=8, set_threads=threads.append,
                  wait=clock.wait)
    clock.t += 3.0
    assert pacer.after_steps() == 0.0
    current["prefs"] = Preferences.from_dict({"max_ncpus_pct": 50})
    pacer.after_steps()
    current["prefs"] = Preferences.from_dict({"max_ncpus_pct": 10})
    pacer.after_steps()
    assert threads == [8, 4, 1]
    assert threads_for(100, 2) == 2 and threads_for(49, 2) == 1 and threads_for(1, 64) == 1


def test_network_rate_limit_waits_until_the_round_average_is_under_it():
    clock = FakeClock()
    prefs = Preferences.from_dict({"max_bytes_sec_up": 1000, "max_bytes_sec_down": 4000})
    pacer = Pacer(lambda: prefs, threading.Event(), clock=clock, base_threads=1, set_threads=lambda n: None,
                  wait=clock.wait)
    pacer.round_started(bytes_total=50_000)
    clock.t += 10.0

    paused = pacer.after_round(bytes_total=50_000 + 40_000)  # 20 kB each way in 10 s

    assert paused == pytest.approx(10.0)  # 20 kB at the stricter 1 kB/s needs 20 s in all
    assert pacer.after_round(bytes_total=90_000) == 0.0  # nothing moved since


def test_a_stop_ends_a_pause_at_once():
    stop = threading.Event()
    prefs = Preferences.from_dict({"cpu_usage_limit": 1})
    pacer = Pacer(lambda: prefs, stop, base_threads=1, set_threads=lambda n: None)
    pacer.busy_since -= 5.0  # 5 s of work → a 495 s pause
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    pacer.after_steps()
    assert time.monotonic() - t0 < 5.0


# ------------------------------------------------------------- the policy tick

class FakeMonitor:
    def __init__(self, readings: Readings):
        self.readings = readings
        self.idle_signal = type("Signal", (), {"name": "fake"})()
        self.refreshed = 0

    def read(self) -> Readings:
        return self.readings

    def refresh_slow(self):
        self.refreshed += 1

    def close(self):
        pass


class FakeNode:
    def __init__(self):
        from p2ptrain.swarm.suspension import Suspension
        self.suspension = Suspension()
        self.stop_requested = threading.Event()
        self.session = SimpleNamespace(inner=SimpleNamespace(step_count=7))

    def status(self) -> dict:
        return {"round": 0}


def test_the_policy_tick_applies_prefs_mode_and_readings_and_keeps_good_prefs_on_a_bad_edit(tmp_path):
    # Prepare: a daemon whose monitor reads "on batteries, other programs busy"
    here = places(tmp_path)
    readings = Readings(now=dt.datetime(2026, 12, 2, 12), others_cpu_pct=50.0, battery=Battery(70, False))
    monitor = FakeMonitor(readings)
    daemon = service.Daemon(here, monitor_factory=lambda d: monitor)
    node = FakeNode()
    daemon.start_policy()
    try:
        daemon.attach(type("Opened", (), {"node": node, "restored_round": None, "caught_up": {}})())

        # Execute / Assert: the defaults
        assert daemon.evaluate() == {ON_BATTERIES, CPU_BUSY}
        assert node.suspension.reasons() == {ON_BATTERIES, CPU_BUSY}
        assert node.suspension.leave_in_memory is False  # the GPU is freed while suspended

        # the user allows batteries and more CPU: applied at the next tick, no restart
        Preferences.from_dict({"run_on_batteries": True, "battery_charge_min_pct": 50,
                               "suspend_cpu_usage": 60, "leave_apps_in_memory": True}).save(here.prefs_file)
        os.utime(here.prefs_file, (time.time() + 5, time.time() + 5))
        assert daemon.evaluate() == set() and node.suspension.reasons() == set()
        assert node.suspension.leave_in_memory is True

        # a bad hand edit: the last good preferences stay, and the status says why
        here.prefs_file.write_text("suspend_cpu_usage = 'x'\n")
        os.utime(here.prefs_file, (time.time() + 10, time.time() + 10))
        assert daemon.evaluate() == set()
        assert "suspend_cpu_usage = 'x' is not allowed" in daemon.status()["prefs_error"]

        # run modes over the control handler
        never = daemon.handle({"cmd": "mode", "mode": "never", "for_s": 3600})
        assert never["ok"] and never["suspended"] == [USER_REQUEST]
        assert node.suspension.reasons() == {USER_REQUEST}
        assert json.loads((here.state / "mode.json").read_text())["mode"] == "never"
        bad = daemon.handle({"cmd": "mode", "mode": "sometimes"})
        assert not bad["ok"] and "run mode must be one of" in bad["error"]
        daemon.handle({"cmd": "mode", "mode": "auto"})
        assert node.suspension.reasons() == set()

        # stop: the node is asked to stop at its next safe point
        assert daemon.handle({"cmd": "stop"})["ok"] and node.stop_requested.is_set()
        assert daemon.status()["state"] == "stopping" and daemon.status()["inner_steps"] == 7
    finally:
        daemon.close()


# ------------------------------------------------------------- priority

def test_low_priority_is_nice_19_and_idle_io_inherited_by_children():
    script = textwrap.dedent("""
        import subprocess, psutil
        from p2ptrain.daemon.service import lower_priority
        print(",".join(lower_priority()))
        child = subprocess.Popen(["sleep", "5"])
        p = psutil.Process(child.pid)
        print(p.nice(), int(p.ionice().ioclass))
        child.kill()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    applied, child = done.stdout.splitlines()
    assert applied == "nice 19,idle IO"
    assert child == f"19 {int(psutil.IOPRIO_CLASS_IDLE)}"


# ------------------------------------------------------------- daemon logs

def test_daemon_logs_shows_the_tail_and_follows_across_a_rotation(tmp_path):
    here = places(tmp_path)
    here.logs.mkdir(parents=True)
    here.log_file.write_text("".join(f"old line {i}\n" for i in range(10)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    tail = subprocess.run([sys.executable, "-m", "p2ptrain.cli", "daemon", "logs", "-n", "3", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)
    follow = subprocess.Popen([sys.executable, "-m", "p2ptrain.cli", "daemon", "logs", "-f", "-n", "0", "--home",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.strip() for line in follow.stdout), daemon=True)
    reader.start()
    try:
        time.sleep(3.0)  # it is now at the end of the file
        with open(here.log_file, "a") as f:
            f.write("appended\n")
        time.sleep(1.5)
        os.rename(here.log_file, here.logs / "daemon.log.1")  # what the rotating handler does
        here.log_file.write_text("after rotation\n")
        deadline = time.monotonic() + 30
        while "after rotation" not in lines and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        follow.kill()
        follow.wait()
    assert tail.returncode == 0 and tail.stdout.splitlines() == ["old line 7", "old line 8", "old line 9"]
    assert lines == ["appended", "after rotation"]


# ------------------------------------------------------------- status text

@pytest.mark.parametrize("device, offloaded, leave, line", [
    ("cuda:0", True, False, "  memory: model and optimizer state moved to RAM, GPU memory freed"),
    ("cuda:0", False, True, "  memory: model kept on cuda:0 (leave_apps_in_memory = true)"),
    ("cuda:0", False, False, "  memory: model still on cuda:0 until the node reaches a safe point"),
    ("cpu", False, False, "  memory: training on cpu: nothing to free while suspended"),
])
def test_status_of_a_suspended_daemon_says_where_its_model_is(device, offloaded, leave, line):
    from p2ptrain.cli_daemon import format_status
    node = {"run_id": "r", "path": "0,0", "modules": ["stem"], "round": 3, "loss": 4.2, "tokens_per_s": 10.0,
            "rounds_done": 3, "tokens": 768, "reachability": "public", "last_round": {}, "device": device,
            "offloaded": offloaded}
    status = {"state": "suspended", "suspended": ["user request"], "kind": "daemon", "pid": 1, "uptime_s": 60.0,
              "node": node, "leave_apps_in_memory": leave,
              "contributed": {"tokens": 5000, "rounds": 9, "rounds_averaged": 7, "hours": 0.5}}

    lines = format_status(status).splitlines()

    assert lines[0] == "p2ptrain daemon: suspended — user request"
    assert line in lines
    assert "  contributed since install: 5,000 tokens, 9 rounds (7 averaged with peers), 0.5 h" in lines
    assert not any(l.startswith("  memory:") for l in format_status(dict(status, state="running")).splitlines())
