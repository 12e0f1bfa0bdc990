"""Computing preferences and the run mode → the set of reasons the node is suspended.

A pure function of what was measured (`Readings`), so every preference is tested with a
fake clock and fake readings. The reasons are BOINC's words where BOINC has one
(lib/str_util.cpp `suspend_reason_string`), shown joined: `on batteries, user active`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2ptrain.daemon.prefs import Preferences
from p2ptrain.errors import UserError
from p2ptrain.home import write_private

logger = logging.getLogger(__name__)

ON_BATTERIES = "on batteries"
BATTERY_LOW = "battery low"
USER_ACTIVE = "user active"
USER_REQUEST = "user request"
TIME_OF_DAY = "time of day"
CPU_BUSY = "CPU is busy"
MEMORY = "waiting for memory"
DISK = "need disk space - check preferences"
NETWORK_QUOTA = "network transfer limit exceeded"

MODES = ("always", "auto", "never")


@dataclass
class Battery:
    percent: float
    plugged: bool


@dataclass
class Readings:
    """One look at the machine. None means "could not be measured": that preference is not
    applied (a desktop without a battery is never 'on batteries')."""

    now: _dt.datetime  # local time
    idle_s: float | None = None  # seconds since the user's last input
    others_cpu_pct: float | None = None  # other programs' CPU, % of all cores, averaged
    battery: Battery | None = None
    memory_frac: float | None = None  # the node's resident memory / the machine's RAM
    home_used_gb: float | None = None
    disk_free_gb: float | None = None
    xfer_mb: float | None = None  # moved in the last daily_xfer_period_days


@dataclass
class RunMode:
    """BOINC's run modes: always (ignore the preferences), auto (obey them), never (suspended).
    A temporary mode (`--for`) returns to `then` at `until` (a time.time())."""

    mode: str = "auto"
    until: float | None = None
    then: str = "auto"

    def current(self, now: float) -> str:
        if self.until is not None and now >= self.until:
            return self.then
        return self.mode

    def settle(self, now: float) -> "RunMode":
        """The mode with an expired temporary mode replaced by the permanent one."""
        if self.until is not None and now >= self.until:
            return RunMode(self.then)
        return self

    def describe(self, now: float) -> str:
        mode = self.current(now)
        if self.until is not None and now < self.until:
            return f"{mode} for {format_duration(self.until - now)}, then {self.then}"
        return mode

    @classmethod
    def load(cls, path: Path) -> "RunMode":
        try:
            raw = json.loads(path.read_text())
            mode = cls(str(raw["mode"]), None if raw.get("until") is None else float(raw["until"]),
                       str(raw.get("then", "auto")))
            if mode.mode in MODES and mode.then in MODES:
                return mode
            logger.warning("%s: unknown run mode %r; using auto", path, raw)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s: unreadable run mode (%s); using auto", path, e)
        return cls()

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self)))


def set_mode(previous: RunMode, mode: str, for_s: float | None, now: float) -> RunMode:
    """`daemon mode MODE [--for D]`: a temporary mode comes back to the permanent one."""
    if mode not in MODES:
        raise UserError(f"run mode must be one of {', '.join(MODES)}, not {mode!r}")
    if for_s is None:
        return RunMode(mode)
    return RunMode(mode, now + for_s, previous.settle(now).mode if previous.until is None else previous.then)


def user_active(prefs: Preferences, readings: Readings) -> bool:
    """In use: input within idle_time_to_run minutes. Unknown idle time counts as idle."""
    return readings.idle_s is not None and readings.idle_s < 60 * prefs.idle_time_to_run


def outside_hours(start: float, end: float, hour: float) -> bool:
    """BOINC's TIME_SPAN::suspended: equal hours, or 0-24, allow any time; start > end spans
    midnight."""
    if start == end or (start == 0 and end == 24):
        return False
    if start == 24 and end == 0:
        return True
    if start < end:
        return hour < start or hour >= end
    return end <= hour < start


def suspend_reasons(prefs: Preferences, mode: RunMode, readings: Readings, now: float | None = None) -> set[str]:
    """Every reason the node should not compute now (empty: it may)."""
    current = mode.current(time.time() if now is None else now)
    if current == "always":
        return set()
    if current == "never":
        return {USER_REQUEST}
    reasons = set()
    active = user_active(prefs, readings)
    if readings.battery is not None and not readings.battery.plugged:
        if not prefs.run_on_batteries:
            reasons.add(ON_BATTERIES)
        elif readings.battery.percent < prefs.battery_charge_min_pct:
            reasons.add(BATTERY_LOW)
    if not prefs.run_if_user_active and active:
        reasons.add(USER_ACTIVE)
    if (prefs.suspend_cpu_usage > 0 and readings.others_cpu_pct is not None
            and readings.others_cpu_pct > prefs.suspend_cpu_usage):
        reasons.add(CPU_BUSY)
    hour = readings.now.hour + readings.now.minute / 60 + readings.now.second / 3600
    if outside_hours(*prefs.day_hours(readings.now.weekday()), hour):
        reasons.add(TIME_OF_DAY)
    limit = prefs.ram_max_used_busy_frac if active else prefs.ram_max_used_idle_frac
    if readings.memory_frac is not None and readings.memory_frac > limit:
        reasons.add(MEMORY)
    if ((prefs.disk_max_used_gb > 0 and readings.home_used_gb is not None
         and readings.home_used_gb > prefs.disk_max_used_gb)
            or (readings.disk_free_gb is not None and readings.disk_free_gb < prefs.disk_min_free_gb)):
        reasons.add(DISK)
    if prefs.daily_xfer_limit_mb > 0 and readings.xfer_mb is not None and readings.xfer_mb >= prefs.daily_xfer_limit_mb:
        reasons.add(NETWORK_QUOTA)
    return reasons


def describe(reasons) -> str:
    """`suspended — on batteries, user active`, or `running`."""
    return "suspended — " + ", ".join(sorted(reasons)) if reasons else "running"


def parse_duration(text: str) -> float:
    """'2h', '30m', '90s', '1d', '1h30m' → seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for ch in text.strip().lower():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise UserError(f"--for {text!r}: use a duration like 2h, 30m, 90s, 1d or 1h30m")
    if number:
        raise UserError(f"--for {text!r}: give a unit (d, h, m or s), e.g. {number}h")
    if total <= 0:
        raise UserError(f"--for {text!r}: must be longer than 0")
    return total


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
