"""Computing preferences: BOINC's names and meanings where they fit, in a TOML file.

`prefs.toml` holds only the keys a user changed; every other key has its default. A file
with an unknown key or a bad value is refused with one line that names it; a running
daemon then keeps its last good preferences and logs why (see Preferences.load).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from p2ptrain.errors import ConfigError
from p2ptrain.home import private_dir, write_private

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order


@dataclass(frozen=True)
class Pref:
    name: str
    default: Any
    unit: str
    meaning: str
    parse: Callable[[Any], Any]  # raises ValueError with what is allowed


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ValueError("must be true or false")


def _number(lo: float, hi: float, integer: bool = False) -> Callable[[Any], float]:
    def parse(value: Any):
        if isinstance(value, bool):
            raise ValueError(f"must be a number in {lo:g} … {hi:g}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number in {lo:g} … {hi:g}") from None
        if not math.isfinite(number) or not lo <= number <= hi:
            raise ValueError(f"must be a number in {lo:g} … {hi:g}")
        if integer:
            if number != int(number):
                raise ValueError(f"must be a whole number in {lo:g} … {hi:g}")
            return int(number)
        return number
    return parse


_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")  # the key of a line that is not valid TOML
_HOUR = r"(\d{1,2})(?::(\d{2}))?"
_SPAN = re.compile(rf"^\s*{_HOUR}\s*-\s*{_HOUR}\s*$")


def parse_hours(value: Any) -> tuple[float, float] | None:
    """'9-17', '22:30-6' → (start, end) in hours; '' → None (no override)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    match = _SPAN.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("must be 'H[:MM]-H[:MM]' (e.g. '9-17' or '22:30-6'), or '' for none")
    h1, m1, h2, m2 = (int(g) if g else 0 for g in match.groups())
    start, end = h1 + m1 / 60, h2 + m2 / 60
    if not (0 <= start <= 24 and 0 <= end <= 24 and m1 < 60 and m2 < 60):
        raise ValueError("hours must be in 0 … 24 and minutes in 0 … 59")
    return start, end


def _hours_text(value: Any) -> str:
    parse_hours(value)
    return value.strip() if isinstance(value, str) else ""


PREFS: tuple[Pref, ...] = (
    Pref("run_if_user_active", True, "bool",
         "Compute while the computer is in use. false: suspend ('user active') until nobody has used "
         "it for idle_time_to_run minutes", _bool),
    Pref("idle_time_to_run", 3.0, "minutes",
         "With run_if_user_active = false: minutes without keyboard/mouse input before computing starts",
         _number(0, 1440)),
    Pref("suspend_cpu_usage", 25.0, "% of all CPUs",
         "Suspend ('CPU is busy') while other programs use more than this share of the machine's CPU "
         "(10 s average); 0 = never", _number(0, 100)),
    Pref("run_on_batteries", False, "bool", "Compute while the computer runs on batteries", _bool),
    Pref("battery_charge_min_pct", 90.0, "%",
         "On batteries (with run_on_batteries = true): suspend ('battery low') below this charge",
         _number(0, 100)),
    Pref("max_ncpus_pct", 100.0, "% of CPUs",
         "Share of the CPU cores the inner steps use (of torch's threads: one per core, or $OMP_NUM_THREADS)",
         _number(1, 100)),
    Pref("cpu_usage_limit", 100.0, "% of time",
         "Duty cycle: compute this share of the time and pause the rest (keeps a laptop cool)", _number(1, 100)),
    Pref("ram_max_used_busy_frac", 0.5, "fraction of RAM",
         "While the computer is in use: suspend ('waiting for memory') when the node uses more of the RAM",
         _number(0.01, 1)),
    Pref("ram_max_used_idle_frac", 0.9, "fraction of RAM", "The same while the computer is idle",
         _number(0.01, 1)),
    Pref("start_hour", 0.0, "hour", "Compute only from this hour of the day (local time)…", _number(0, 24)),
    Pref("end_hour", 0.0, "hour",
         "…to this one; equal hours mean any time, start > end spans midnight ('time of day')", _number(0, 24)),
    *(Pref(f"{day}_hours", "", "'H-H'", f"Hours for {name} instead of start_hour/end_hour, e.g. '9-17'",
           _hours_text)
      for day, name in zip(WEEKDAYS, ("Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays",
                                      "Saturdays", "Sundays"))),
    Pref("disk_max_used_gb", 10.0, "GB",
         "Suspend ('need disk space - check preferences') when the home (checkpoints, run state, logs) "
         "uses more; 0 = no limit", _number(0, 1e6)),
    Pref("disk_min_free_gb", 1.0, "GB",
         "Suspend ('need disk space - check preferences') when the home's disk has less free space",
         _number(0, 1e6)),
    Pref("max_bytes_sec_up", 0.0, "bytes/s",
         "Average upload rate over a round: after a round the node waits until it is under this; 0 = no limit",
         _number(0, 1e12)),
    Pref("max_bytes_sec_down", 0.0, "bytes/s", "The same for downloads; 0 = no limit", _number(0, 1e12)),
    Pref("daily_xfer_limit_mb", 0.0, "MB",
         "Suspend ('network transfer limit exceeded') once the node moved this much in "
         "daily_xfer_period_days; 0 = no limit", _number(0, 1e9)),
    Pref("daily_xfer_period_days", 1, "days", "The period daily_xfer_limit_mb applies to",
         _number(1, 365, integer=True)),
    Pref("leave_apps_in_memory", False, "bool",
         "Keep the model in GPU memory while suspended (false: free it for other programs)", _bool),
    Pref("low_priority", True, "bool",
         "Run at the lowest CPU priority (nice 19) and idle IO priority; applies at the next start", _bool),
)

BY_NAME = {p.name: p for p in PREFS}


@dataclass(frozen=True)
class Preferences:
    """Validated computing preferences: `values` has every key, `changed` the keys the file sets."""

    values: dict[str, Any]
    changed: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("values", "changed"):
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def day_hours(self, weekday: int) -> tuple[float, float]:
        """(start, end) for a weekday (0 = Monday): its override, else start_hour/end_hour."""
        override = parse_hours(self.values[f"{WEEKDAYS[weekday]}_hours"])
        return override if override is not None else (self.values["start_hour"], self.values["end_hour"])

    @classmethod
    def defaults(cls) -> "Preferences":
        return cls({p.name: p.default for p in PREFS})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "prefs") -> "Preferences":
        values = {p.name: p.default for p in PREFS}
        for key, value in raw.items():
            values[key] = check(key, value, where)
        return cls(values, frozenset(raw))

    @classmethod
    def load(cls, path: Path) -> "Preferences":
        """The preferences in `path` (defaults when it does not exist); ConfigError naming the
        first bad key."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls.defaults()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for key, value in raw.items():
            if isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] is not a preference (the file has no sections)")
        return cls.from_dict(raw, str(path))

    @classmethod
    def salvage(cls, path: Path) -> tuple["Preferences", list[tuple[str | None, str]]]:
        """What can be kept of a file `load` refuses: every preference that parses and is
        allowed (line by line when the file is not valid TOML), and what was left out as
        (key or None, "what, why") — for `prefs set|reset`, which repair a broken file."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls.defaults(), []
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        dropped: list[tuple[str | None, str]] = []
        try:
            items = list(tomllib.loads(text).items())
        except tomllib.TOMLDecodeError:
            items = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    items.extend(tomllib.loads(line).items())
                except tomllib.TOMLDecodeError:
                    key = _KEY.match(line)
                    dropped.append((key[1], f"line {number}, {key[1]} (not TOML)") if key
                                   else (None, f"line {number} (not TOML)"))
        raw: dict[str, Any] = {}
        for key, value in items:
            if isinstance(value, dict):
                dropped.append((None, f"[{key}] (the file has no sections)"))
            elif key not in BY_NAME:
                dropped.append((key, f"{key} (unknown preference)"))
            else:
                try:
                    BY_NAME[key].parse(value)
                    raw[key] = value
                except ValueError as e:
                    dropped.append((key, f"{key} = {value!r} ({e})"))
        return cls.from_dict(raw, str(path)), dropped

    def to_toml(self) -> str:
        lines = ["# p2ptrain computing preferences (`p2ptrain prefs show` lists every key)"]
        for p in PREFS:
            if p.name in self.changed:
                lines.append(f"{p.name} = {_toml_value(self.values[p.name])}")
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        private_dir(path.parent)
        write_private(path, self.to_toml())

    def with_value(self, key: str, value: Any) -> "Preferences":
        values = dict(self.values)
        values[key] = check(key, value, "prefs")
        return Preferences(values, self.changed | {key})

    def without(self, key: str | None) -> "Preferences":
        if key is None:
            return Preferences.defaults()
        check_key(key, "prefs")
        values = dict(self.values)
        values[key] = BY_NAME[key].default
        return Preferences(values, self.changed - {key})


def check_key(key: str, where: str) -> Pref:
    if key not in BY_NAME:
        raise ConfigError(f"{where}: unknown preference '{key}' (`p2ptrain prefs show` lists them)")
    return BY_NAME[key]


def check(key: str, value: Any, where: str) -> Any:
    pref = check_key(key, where)
    try:
        return pref.parse(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {key} = {value!r} is not allowed: {e}") from None


def parse_cli_value(key: str, text: str) -> Any:
    """`prefs set KEY VALUE`: VALUE as typed on the command line."""
    check_key(key, "prefs set")
    return check(key, text, "prefs set")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value else "''"
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)
