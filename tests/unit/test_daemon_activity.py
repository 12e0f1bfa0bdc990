"""Readings of the machine: user idle signals, other programs' CPU (measured on a real
CPU-burning process), the node's memory and network counters."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections import namedtuple

import psutil
import pytest

from p2ptrain.daemon.activity import (CpuMeter, OthersCpuIdle, ProcessTree, TerminalIdle, TransferMeter,
                                      directory_bytes, parse_ioreg_idle, parse_logind_idle, proportional_memory,
                                      probe_idle_signal)

User = namedtuple("User", "name terminal host started pid")
BURN = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def test_terminal_idle_is_the_newest_access_of_the_users_ttys_and_input_devices(tmp_path):
    # Prepare: a fake /dev with two ttys of this user and an input device
    dev = tmp_path / "dev"
    (dev / "pts").mkdir(parents=True)
    (dev / "input").mkdir()
    now = 1_000_000.0
    for name, atime in (("pts/0", now - 600), ("tty1", now - 90), ("input/event3", now - 3000)):
        (dev / name).touch()
        os.utime(dev / name, (atime, atime))
    import pwd
    me = pwd.getpwuid(os.getuid()).pw_name
    users = [User(me, "pts/0", "", 0, 1), User(me, "tty1", "", 0, 2), User("someone-else", "pts/9", "", 0, 3)]

    signal = TerminalIdle(dev=dev, users=lambda: users, clock=lambda: now)

    assert signal.read() == pytest.approx(90.0)
    os.utime(dev / "input" / "event3", (now - 5, now - 5))  # the mouse moved
    assert signal.read() == pytest.approx(5.0)


def test_terminal_idle_is_unavailable_without_terminals(tmp_path):
    with pytest.raises(OSError):
        TerminalIdle(dev=tmp_path, users=lambda: [])


def test_logind_idle_hint_parsing():
    both_idle = "IdleHint=yes\nIdleSinceHintMonotonic=100000000\n\nIdleHint=yes\nIdleSinceHintMonotonic=250000000\n"
    one_active = "IdleHint=yes\nIdleSinceHintMonotonic=100000000\n\nIdleHint=no\nIdleSinceHintMonotonic=0\n"
    assert parse_logind_idle(both_idle, monotonic_now=400.0) == pytest.approx(150.0)
    assert parse_logind_idle(one_active, monotonic_now=400.0) == 0.0
    assert parse_logind_idle("", monotonic_now=400.0) is None


def test_macos_hid_idle_parsing():
    sample = '    | |   "HIDIdleTime" = 12500000000\n    | |   "HIDKeyboardModifierMappingPairs" = ()\n'
    assert parse_ioreg_idle(sample) == pytest.approx(12.5)
    assert parse_ioreg_idle("nothing here") is None


def test_this_machine_gets_some_idle_signal():
    signal = probe_idle_signal(CpuMeter(ProcessTree(os.getpid())))
    assert signal.name
    signal.read()  # must not raise, whatever the platform offers


def start_stranger_burner() -> psutil.Process:
    """A CPU burner that is not our descendant (double fork: its parent exits at once)."""
    shell = subprocess.run(["sh", "-c", f"{sys.executable} -c '{BURN}' >/dev/null 2>&1 & echo $!"],
                           capture_output=True, text=True, check=True)
    return psutil.Process(int(shell.stdout.strip()))


def test_other_programs_cpu_counts_a_real_burner_but_not_our_own_children():
    # Prepare: a meter for this process tree, with a short window so the test is quick
    tree = ProcessTree(os.getpid())
    meter = CpuMeter(tree, window_s=2.0)
    one_core = 100.0 / meter.ncpu
    meter.sample()

    # Execute: our own child burns CPU (counted as ours), then a stranger process does
    ours = subprocess.Popen([sys.executable, "-c", BURN])
    time.sleep(1.0)
    before, child_before = tree.cpu_seconds(), sum(psutil.Process(ours.pid).cpu_times()[:2])
    time.sleep(3.0)
    ours_seconds = tree.cpu_seconds() - before
    child_seconds = sum(psutil.Process(ours.pid).cpu_times()[:2]) - child_before
    ours.kill()
    ours.wait()
    meter.sample()
    stranger = start_stranger_burner()
    try:
        assert stranger.pid not in {p.pid for p in tree.processes()}
        meter.sample()
        time.sleep(2.5)
        with_stranger = meter.sample()
    finally:
        stranger.kill()
        stranger.wait(10)

    # Assert: our child's CPU is in our tree's total; the stranger's core shows up as other
    # programs' CPU (other engineers' load on a shared machine can only add to it)
    assert child_seconds > 0.2 and ours_seconds >= 0.9 * child_seconds
    assert with_stranger >= 0.7 * one_core


def test_others_cpu_fallback_counts_idle_time_from_the_last_busy_moment():
    class Meter:
        latest_pct = None
    meter = Meter()
    now = [100.0]
    signal = OthersCpuIdle(meter, clock=lambda: now[0])
    assert signal.read() is None
    meter.latest_pct = 50.0
    assert signal.read() == 0.0
    meter.latest_pct = 2.0
    now[0] = 160.0
    assert signal.read() == pytest.approx(60.0)


def test_memory_counts_shared_pages_once(tmp_path):
    me = psutil.Process()
    pss = proportional_memory([me])
    assert 0 < pss <= me.memory_info().rss * 1.05


def test_directory_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1" * 1000)
    (tmp_path / "y").write_bytes(b"2" * 234)
    assert directory_bytes(tmp_path) == 1234


def test_transfer_counts_persist_per_day_and_sum_over_the_period(tmp_path):
    days = iter([dt.date(2026, 12, 1), dt.date(2026, 12, 2), dt.date(2026, 12, 3)])
    today = {"d": next(days)}
    meter = TransferMeter(ProcessTree(os.getpid()), tmp_path / "xfer.json", today=lambda: today["d"])
    meter.days = {"2026-11-30": 5e6, "2026-12-01": 2e6}
    meter.save()

    again = TransferMeter(ProcessTree(os.getpid()), tmp_path / "xfer.json", today=lambda: today["d"])
    today["d"] = next(days)
    assert again.megabytes(1) == 0.0
    assert again.megabytes(2) == pytest.approx(2.0)
    assert again.megabytes(3) == pytest.approx(7.0)
