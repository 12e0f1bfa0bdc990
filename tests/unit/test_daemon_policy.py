"""Every computing preference and run mode → suspend reasons, with a fake clock and fake
readings (battery, idle time, other programs' CPU, hour of day, memory, disk, network)."""

from __future__ import annotations

import datetime as dt

import pytest

from p2ptrain.daemon.policy import (BATTERY_LOW, CPU_BUSY, DISK, MEMORY, NETWORK_QUOTA, ON_BATTERIES, TIME_OF_DAY,
                                    USER_ACTIVE, USER_REQUEST, Battery, Readings, RunMode, describe, format_duration,
                                    outside_hours, parse_duration, set_mode, suspend_reasons)
from p2ptrain.daemon.prefs import Preferences
from p2ptrain.errors import UserError

WEDNESDAY_NOON = dt.datetime(2026, 12, 2, 12, 0, 0)  # a Wednesday
NOW = 1_000_000.0  # the fake time.time() of every test
AUTO = RunMode()


def prefs(**changes) -> Preferences:
    return Preferences.from_dict(changes)


def readings(**values) -> Readings:
    return Readings(now=values.pop("now", WEDNESDAY_NOON), **values)


def reasons(p: Preferences, r: Readings, mode: RunMode = AUTO) -> set[str]:
    return suspend_reasons(p, mode, r, now=NOW)


def test_nothing_measured_and_default_prefs_means_run():
    assert reasons(prefs(), readings()) == set()
    assert describe(set()) == "running"


# ------------------------------------------------------------- batteries

@pytest.mark.parametrize("battery, p, expected", [
    (Battery(80, plugged=False), prefs(), {ON_BATTERIES}),  # run_on_batteries defaults to false
    (Battery(80, plugged=True), prefs(), set()),
    (Battery(80, plugged=False), prefs(run_on_batteries=True), {BATTERY_LOW}),  # below the default 90 %
    (Battery(95, plugged=False), prefs(run_on_batteries=True), set()),
    (Battery(40, plugged=False), prefs(run_on_batteries=True, battery_charge_min_pct=30), set()),
    (Battery(20, plugged=False), prefs(run_on_batteries=True, battery_charge_min_pct=30), {BATTERY_LOW}),
    (Battery(20, plugged=True), prefs(run_on_batteries=True, battery_charge_min_pct=30), set()),  # charging
])
def test_batteries(battery, p, expected):
    assert reasons(p, readings(battery=battery)) == expected


# ------------------------------------------------------------- user activity

@pytest.mark.parametrize("idle_s, p, expected", [
    (5.0, prefs(), set()),  # run_if_user_active defaults to true
    (5.0, prefs(run_if_user_active=False), {USER_ACTIVE}),
    (179.0, prefs(run_if_user_active=False), {USER_ACTIVE}),  # idle_time_to_run defaults to 3 minutes
    (181.0, prefs(run_if_user_active=False), set()),
    (181.0, prefs(run_if_user_active=False, idle_time_to_run=10), {USER_ACTIVE}),
    (601.0, prefs(run_if_user_active=False, idle_time_to_run=10), set()),
    (None, prefs(run_if_user_active=False), set()),  # no signal at all: nobody is seen using it
])
def test_user_activity(idle_s, p, expected):
    assert reasons(p, readings(idle_s=idle_s)) == expected


# ------------------------------------------------------------- other programs' CPU

@pytest.mark.parametrize("others, p, expected", [
    (24.0, prefs(), set()),  # suspend_cpu_usage defaults to 25 %
    (26.0, prefs(), {CPU_BUSY}),
    (90.0, prefs(suspend_cpu_usage=95), set()),
    (99.0, prefs(suspend_cpu_usage=0), set()),  # 0: never suspend for CPU
    (None, prefs(), set()),
])
def test_other_programs_cpu(others, p, expected):
    assert reasons(p, readings(others_cpu_pct=others)) == expected


# ------------------------------------------------------------- time of day

@pytest.mark.parametrize("hour, minute, p, expected", [
    (12, 0, prefs(start_hour=9, end_hour=17), set()),
    (8, 59, prefs(start_hour=9, end_hour=17), {TIME_OF_DAY}),
    (17, 0, prefs(start_hour=9, end_hour=17), {TIME_OF_DAY}),  # the end hour itself is outside
    (23, 0, prefs(start_hour=22, end_hour=6), set()),  # spans midnight
    (3, 0, prefs(start_hour=22, end_hour=6), set()),
    (12, 0, prefs(start_hour=22, end_hour=6), {TIME_OF_DAY}),
    (22, 15, prefs(start_hour=22.5, end_hour=6), {TIME_OF_DAY}),
    (12, 0, prefs(start_hour=5, end_hour=5), set()),  # equal hours: any time
    (12, 0, prefs(start_hour=0, end_hour=24), set()),
])
def test_time_of_day(hour, minute, p, expected):
    now = WEDNESDAY_NOON.replace(hour=hour, minute=minute)
    assert reasons(p, readings(now=now)) == expected


def test_a_weekday_window_overrides_the_daily_hours():
    p = prefs(start_hour=9, end_hour=17, wed_hours="20-23", sat_hours="0-24")
    wednesday_noon, wednesday_night = WEDNESDAY_NOON, WEDNESDAY_NOON.replace(hour=21)
    thursday_noon = WEDNESDAY_NOON + dt.timedelta(days=1)
    saturday_3am = (WEDNESDAY_NOON + dt.timedelta(days=3)).replace(hour=3)
    assert reasons(p, readings(now=wednesday_noon)) == {TIME_OF_DAY}
    assert reasons(p, readings(now=wednesday_night)) == set()
    assert reasons(p, readings(now=thursday_noon)) == set()
    assert reasons(p, readings(now=saturday_3am)) == set()


def test_outside_hours_matches_boinc():
    assert outside_hours(24, 0, 12) is True  # 24-0: never
    assert outside_hours(0, 0, 12) is False


# ------------------------------------------------------------- memory

@pytest.mark.parametrize("frac, idle_s, p, expected", [
    (0.4, 1e6, prefs(), set()),
    (0.6, 1e6, prefs(), set()),  # idle: ram_max_used_idle_frac 0.9 applies
    (0.6, 10.0, prefs(), {MEMORY}),  # in use: ram_max_used_busy_frac 0.5 applies
    (0.95, 1e6, prefs(), {MEMORY}),
    (0.6, 10.0, prefs(ram_max_used_busy_frac=0.7), set()),
])
def test_memory(frac, idle_s, p, expected):
    assert reasons(p, readings(memory_frac=frac, idle_s=idle_s)) == expected


# ------------------------------------------------------------- disk and network

@pytest.mark.parametrize("used, free, p, expected", [
    (5.0, 100.0, prefs(), set()),
    (11.0, 100.0, prefs(), {DISK}),  # disk_max_used_gb defaults to 10
    (11.0, 100.0, prefs(disk_max_used_gb=0), set()),  # 0: no limit
    (1.0, 0.5, prefs(), {DISK}),  # disk_min_free_gb defaults to 1
    (1.0, 0.5, prefs(disk_min_free_gb=0.25), set()),
])
def test_disk(used, free, p, expected):
    assert reasons(p, readings(home_used_gb=used, disk_free_gb=free)) == expected


@pytest.mark.parametrize("moved, p, expected", [
    (900.0, prefs(), set()),  # no limit by default
    (900.0, prefs(daily_xfer_limit_mb=1000), set()),
    (1000.0, prefs(daily_xfer_limit_mb=1000), {NETWORK_QUOTA}),
    (None, prefs(daily_xfer_limit_mb=1000), set()),  # not measurable here
])
def test_daily_transfer_limit(moved, p, expected):
    assert reasons(p, readings(xfer_mb=moved)) == expected


def test_reasons_are_a_set_shown_like_boinc():
    r = readings(battery=Battery(50, plugged=False), idle_s=1.0, others_cpu_pct=80.0)
    got = reasons(prefs(run_if_user_active=False), r)
    assert got == {ON_BATTERIES, USER_ACTIVE, CPU_BUSY}
    assert describe(got) == "suspended — CPU is busy, on batteries, user active"


# ------------------------------------------------------------- run modes

def test_modes_always_and_never_override_the_preferences():
    busy = readings(battery=Battery(50, plugged=False), others_cpu_pct=99.0)
    assert reasons(prefs(), busy, RunMode("always")) == set()
    assert reasons(prefs(), readings(), RunMode("never")) == {USER_REQUEST}
    assert reasons(prefs(), busy, RunMode("auto")) == {ON_BATTERIES, CPU_BUSY}


def test_a_temporary_mode_ends_and_returns_to_the_permanent_one():
    # Prepare: permanently auto; then "never for 2h" at NOW
    mode = set_mode(RunMode("auto"), "never", 7200, now=NOW)

    # Assert: suspended for two hours, then back to auto
    assert suspend_reasons(prefs(), mode, readings(), now=NOW + 7199) == {USER_REQUEST}
    assert suspend_reasons(prefs(), mode, readings(), now=NOW + 7200) == set()
    assert mode.describe(NOW + 3600) == "never for 1h00m, then auto"
    assert mode.settle(NOW + 7200) == RunMode("auto")
    # a new temporary mode during a temporary one still returns to the permanent mode
    again = set_mode(mode, "always", 60, now=NOW + 10)
    assert again.then == "auto" and again.current(NOW + 20) == "always" and again.current(NOW + 80) == "auto"
    # a permanent mode replaces everything
    assert set_mode(mode, "never", None, now=NOW) == RunMode("never")


def test_mode_file_round_trip(tmp_path):
    mode = RunMode("never", NOW + 60, "always")
    mode.save(tmp_path / "mode.json")
    assert RunMode.load(tmp_path / "mode.json") == mode
    (tmp_path / "bad.json").write_text('{"mode": "sometimes"}')
    assert RunMode.load(tmp_path / "bad.json") == RunMode()


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("30m", 1800), ("90s", 90), ("1d", 86400),
                                           ("1h30m", 5400), ("0.5h", 1800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2", "2x", "", "0h", "h"])
def test_bad_durations(text):
    with pytest.raises(UserError):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3700, 90000)] == ["5s", "1m05s", "1h01m", "1d1h"]
