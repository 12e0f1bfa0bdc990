"""What the machine is doing: the user's idle time, batteries, other programs' CPU, the
node's memory, disk and network use — the readings the policy turns into suspend reasons.

User activity uses the best signal the platform gives, probed in this order:

- macOS: the HID system's idle time (`ioreg -c IOHIDSystem`);
- X11: the screen saver extension's idle time (libXss, when $DISPLAY is set);
- GNOME (X11 or Wayland): Mutter's idle monitor over the session bus (`gdbus`);
- logind: the sessions' IdleHint (`loginctl`), which desktops and TTYs keep up to date;
- terminals and input devices: the newest access time of the user's ttys (as `w` shows)
  and of /dev/input/*;
- otherwise other processes' CPU use (psutil): the user counts as active while other
  programs use more than ACTIVE_OTHERS_CPU_PCT of the machine.

`status` names the signal in use.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import datetime as _dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil

from p2ptrain.daemon.policy import Battery, Readings
from p2ptrain.home import write_private

logger = logging.getLogger(__name__)

ACTIVE_OTHERS_CPU_PCT = 10.0  # fallback signal: other programs above this share of the CPU = a user
CPU_WINDOW_S = 10.0  # other programs' CPU is averaged over this long (BOINC also averages)
IDLE_SAMPLE_S = 5.0  # how often the (subprocess-based) idle signals are read
SLOW_SAMPLE_S = 30.0  # memory, disk: they change slowly and cost a directory walk
PSS_SAMPLE_S = 300.0  # the proportional memory of every process (costs ~0.1 s of kernel time)
REPROBE_S = 300.0  # look again for a better idle signal (a desktop session may start later)
COMMAND_TIMEOUT_S = 3.0


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


# ------------------------------------------------------------ idle signals

class IdleSignal:
    """One way to learn how long the user has been away; `read` returns seconds or None."""

    name = "?"

    def read(self) -> float | None:
        raise NotImplementedError


class MacHIDIdle(IdleSignal):
    name = "macOS HID idle time"

    def read(self) -> float | None:
        return parse_ioreg_idle(_run(["ioreg", "-c", "IOHIDSystem", "-d", "4"]) or "")


def parse_ioreg_idle(text: str) -> float | None:
    """`"HIDIdleTime" = 1234567890` (nanoseconds) in ioreg's output → seconds."""
    match = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', text)
    return int(match.group(1)) / 1e9 if match else None


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("eventMask", ctypes.c_ulong)]


class X11Idle(IdleSignal):
    name = "X11 idle time"

    def __init__(self) -> None:
        if not os.environ.get("DISPLAY"):
            raise OSError("no $DISPLAY")
        x11, xss = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
        if not x11 or not xss:
            raise OSError("libX11 / libXss not installed")
        self._x11, self._xss = ctypes.CDLL(x11), ctypes.CDLL(xss)
        self._x11.XOpenDisplay.restype = ctypes.c_void_p
        self._x11.XDefaultRootWindow.restype = ctypes.c_ulong
        self._x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        self._xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        self._xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong,
                                                    ctypes.POINTER(_XScreenSaverInfo)]
        self._display = self._x11.XOpenDisplay(None)
        if not self._display:
            raise OSError("cannot open the X display")
        self._info = self._xss.XScreenSaverAllocInfo()
        if self.read() is None:
            raise OSError("the X server has no screen saver extension")

    def read(self) -> float | None:
        root = self._x11.XDefaultRootWindow(self._display)
        if not self._xss.XScreenSaverQueryInfo(self._display, root, self._info):
            return None
        return self._info.contents.idle / 1000.0


class MutterIdle(IdleSignal):
    name = "GNOME idle monitor"

    def __init__(self) -> None:
        if not os.environ.get("DBUS_SESSION_BUS_ADDRESS") or not shutil.which("gdbus"):
            raise OSError("no session bus")
        if self.read() is None:
            raise OSError("no GNOME idle monitor on the session bus")

    def read(self) -> float | None:
        out = _run(["gdbus", "call", "--session", "--dest", "org.gnome.Mutter.IdleMonitor", "--object-path",
                    "/org/gnome/Mutter/IdleMonitor/Core", "--method", "org.gnome.Mutter.IdleMonitor.GetIdletime"])
        match = re.search(r"(\d+)", out or "")
        return int(match.group(1)) / 1000.0 if match else None


class LogindIdle(IdleSignal):
    name = "logind IdleHint"

    def __init__(self) -> None:
        if not shutil.which("loginctl"):
            raise OSError("no loginctl")
        if self.read() is None:
            raise OSError("logind has no session of this user")

    def read(self) -> float | None:
        listing = _run(["loginctl", "list-sessions", "--no-legend"])
        if listing is None:
            return None
        ids = [line.split()[0] for line in listing.splitlines()
               if len(line.split()) >= 2 and line.split()[1] == str(os.getuid())]
        if not ids:
            return None
        shown = _run(["loginctl", "show-session", *ids, "-p", "IdleHint", "-p", "IdleSinceHintMonotonic"])
        return parse_logind_idle(shown or "", time.clock_gettime(time.CLOCK_MONOTONIC))


def parse_logind_idle(text: str, monotonic_now: float) -> float | None:
    """`loginctl show-session A B -p IdleHint -p IdleSinceHintMonotonic` → seconds the user
    has been idle: 0 if any session is in use, else since the latest session went idle."""
    sessions, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                sessions.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    if current:
        sessions.append(current)
    sessions = [s for s in sessions if "IdleHint" in s]
    if not sessions:
        return None
    if any(s["IdleHint"] != "yes" for s in sessions):
        return 0.0
    since = [int(s.get("IdleSinceHintMonotonic") or 0) / 1e6 for s in sessions]
    return max(0.0, monotonic_now - max(since))


class TerminalIdle(IdleSignal):
    """The newest access time of this user's terminals (what `w` shows as IDLE) and of the
    input devices. Ttys get their times updated by the kernel on every keystroke."""

    name = "terminal and input-device access times"

    def __init__(self, dev: Path = Path("/dev"), users: Callable[[], list] = psutil.users,
                 clock: Callable[[], float] = time.time) -> None:
        self.dev, self.users, self.clock = dev, users, clock
        if self.read() is None:
            raise OSError("no terminal or input device to watch")

    def devices(self) -> list[Path]:
        me = _user_name()
        found = [self.dev / u.terminal for u in self.users() if u.terminal and (me is None or u.name == me)]
        input_dir = self.dev / "input"
        if input_dir.is_dir():
            found += [p for p in input_dir.iterdir() if p.name.startswith(("event", "mice", "mouse"))]
        return found

    def read(self) -> float | None:
        times = []
        for path in self.devices():
            try:
                times.append(path.stat().st_atime)
            except OSError:
                continue
        return max(0.0, self.clock() - max(times)) if times else None


def _user_name() -> str | None:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return None


class OthersCpuIdle(IdleSignal):
    """The portable fallback: the user counts as active while other programs use the CPU."""

    name = f"other programs' CPU use (active above {ACTIVE_OTHERS_CPU_PCT:g}%)"

    def __init__(self, cpu: "CpuMeter", clock: Callable[[], float] = time.monotonic) -> None:
        self.cpu, self.clock = cpu, clock
        self.last_busy = clock()

    def read(self) -> float | None:
        now = self.clock()
        current = self.cpu.latest_pct
        if current is None:
            return None
        if current > ACTIVE_OTHERS_CPU_PCT:
            self.last_busy = now
        return now - self.last_busy


def probe_idle_signal(cpu: "CpuMeter") -> IdleSignal:
    """The best user-activity signal this machine offers."""
    candidates: list[Callable[[], IdleSignal]] = [X11Idle, MutterIdle, LogindIdle, TerminalIdle]
    if sys.platform == "darwin":
        candidates.insert(0, MacHIDIdle)
    for make in candidates:
        try:
            signal = make()
            logger.info("user activity: using %s", signal.name)
            return signal
        except (OSError, AttributeError) as e:
            logger.debug("user activity: %s unavailable (%s)", getattr(make, "name", make), e)
    return OthersCpuIdle(cpu)


# ------------------------------------------------------- CPU of others

def _busy_seconds(times) -> float:
    """System-wide CPU seconds spent on work (not idle, iowait, stolen; guest is in user)."""
    skip = {"idle", "iowait", "steal", "guest", "guest_nice"}
    return sum(v for k, v in times._asdict().items() if k not in skip)


class ProcessTree:
    """CPU seconds of a process and all its descendants (the node: the main process, the
    DHT and averager processes, p2pd), monotonic across children that come and go.

    psutil finds descendants by reading every process on the machine (7 ms for 170 of
    them, every policy tick: 0.7 % of a core by itself); on Linux the kernel lists each
    thread's children in /proc/PID/task/TID/children, which costs a few small reads."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self._last: dict[tuple[int, float], float] = {}
        self._gone = 0.0
        self._procfs = Path(f"/proc/{root_pid}/task/{root_pid}/children").exists()
        self._known: dict[int, psutil.Process] = {root_pid: self.root}
        self._listed: list[psutil.Process] = []
        self._listed_at = -1e9

    def processes(self) -> list[psutil.Process]:
        """The root and its descendants now (one walk serves every meter in a tick)."""
        now = time.monotonic()
        if now - self._listed_at < 0.5:
            return list(self._listed)
        self._listed, self._listed_at = self._walk(), now
        return list(self._listed)

    def _walk(self) -> list[psutil.Process]:
        if not self._procfs:
            try:
                return [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return []
        found, stack = [], [self.root.pid]
        while stack:
            pid = stack.pop()
            proc = self._process(pid)
            if proc is None:
                continue
            found.append(proc)
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        stack += [int(c) for c in f.read().split()]
                except (OSError, ValueError):
                    continue
        self._known = {p.pid: p for p in found}
        return found

    def _process(self, pid: int) -> psutil.Process | None:
        """The psutil handle of pid (kept across calls: psutil caches what it read)."""
        proc = self._known.get(pid)
        try:
            return proc if proc is not None else psutil.Process(pid)
        except psutil.Error:
            return None

    def cpu_seconds(self) -> float:
        seen = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
                seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                continue
        self._gone += sum(v for k, v in self._last.items() if k not in seen)
        self._last = seen
        return self._gone + sum(seen.values())


class CpuMeter:
    """Other programs' CPU use as a % of all cores: system busy time minus the node's own,
    averaged over CPU_WINDOW_S."""

    def __init__(self, tree: ProcessTree, window_s: float = CPU_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tree, self.window_s, self.clock = tree, window_s, clock
        self.samples: collections.deque = collections.deque()
        self.latest_pct: float | None = None
        self.ncpu = psutil.cpu_count() or 1

    def sample(self) -> float | None:
        now = self.clock()
        busy, ours = _busy_seconds(psutil.cpu_times()), self.tree.cpu_seconds()
        if self.samples:
            t, b, o = self.samples[-1]
            self.latest_pct = _others_pct(busy - b, ours - o, now - t, self.ncpu)
        self.samples.append((now, busy, ours))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        return self.average()

    def average(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0, o0), (t1, b1, o1) = self.samples[0], self.samples[-1]
        return _others_pct(b1 - b0, o1 - o0, t1 - t0, self.ncpu)


def _others_pct(busy: float, ours: float, wall: float, ncpu: int) -> float | None:
    if wall <= 0:
        return None
    return min(100.0, max(0.0, (busy - ours) / (wall * ncpu) * 100))


# --------------------------------------------------- memory, disk, network

def proportional_memory(processes: Iterable[psutil.Process]) -> int:
    """Bytes of RAM the processes use, shared pages split among their sharers (PSS, from
    /proc/PID/smaps_rollup on Linux; RSS elsewhere). Forked children share most pages with
    the parent, so summing RSS would count torch's libraries once per child."""
    total = 0
    for p in processes:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
    return total


def directory_bytes(root: Path) -> int:
    total, stack = 0, [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class TransferMeter:
    """Bytes the node moved over the network, kept per day in `<state>/xfer.json` so the
    daily_xfer_limit_mb survives restarts.

    Measured on p2pd, the libp2p daemon that carries all of the node's traffic: every byte
    it receives from the network it writes to the node's unix socket and vice versa, so its
    bytes read (/proc/PID/io rchar) ≈ bytes in + bytes out. Linux only (None elsewhere).
    Upload and download are not told apart; the butterfly all-reduce moves about as much
    each way.
    """

    def __init__(self, tree: ProcessTree, path: Path | None, today: Callable[[], _dt.date] = _dt.date.today):
        self.tree, self.path, self.today = tree, path, today
        self._last: dict[tuple[int, float], int] = {}
        self._names: dict[tuple[int, float], str] = {}
        self.days: dict[str, float] = self._load()
        self.total_bytes = 0  # since this meter started
        self.available = sys.platform.startswith("linux")

    def _load(self) -> dict[str, float]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(k): float(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def sample(self) -> None:
        if not self.available:
            return
        seen = {}
        for p in self.tree.processes():
            try:
                key = (p.pid, p.create_time())
                if key not in self._names:
                    self._names[key] = p.name()
                if self._names[key] == "p2pd":
                    seen[key] = p.io_counters().read_chars
            except (psutil.Error, AttributeError):
                continue
        moved = sum(max(0, v - self._last.get(k, 0)) for k, v in seen.items())
        self._last = seen
        if moved:
            self.total_bytes += moved
            day = self.today().isoformat()
            self.days[day] = self.days.get(day, 0.0) + moved

    def megabytes(self, period_days: int) -> float | None:
        if not self.available:
            return None
        today = self.today()
        keep = {(today - _dt.timedelta(days=i)).isoformat() for i in range(period_days)}
        return sum(v for k, v in self.days.items() if k in keep) / 1e6

    def save(self) -> None:
        if self.path is None or not self.available:
            return
        cutoff = (self.today() - _dt.timedelta(days=400)).isoformat()
        self.days = {k: v for k, v in self.days.items() if k >= cutoff}
        try:
            write_private(self.path, json.dumps(self.days, sort_keys=True))
        except OSError as e:
            logger.warning("could not save the network transfer counts in %s: %s", self.path, e)


# ------------------------------------------------------------- the monitor

def read_battery() -> Battery | None:
    try:
        b = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return None
    if b is None:
        return None
    return Battery(float(b.percent), True if b.power_plugged is None else bool(b.power_plugged))


class Monitor:
    """Takes `Readings` of this machine for the node whose main process is `root_pid`."""

    def __init__(self, root_pid: int, home: Path, state_dir: Path | None, xfer_period_days: Callable[[], int],
                 idle_signal: IdleSignal | None = None) -> None:
        self.home = home
        self.tree = ProcessTree(root_pid)
        self.cpu = CpuMeter(self.tree)
        self.xfer = TransferMeter(self.tree, state_dir / "xfer.json" if state_dir else None)
        self.xfer_period_days = xfer_period_days
        self.idle_signal = idle_signal or probe_idle_signal(self.cpu)
        self._probed_at = time.monotonic()
        self._idle: tuple[float, float | None] = (-1e9, None)  # (monotonic time read, value)
        self._slow: tuple[float, dict] = (-1e9, {})
        self._pss: tuple[float, int, int] = (-1e9, 0, 0)  # (when, proportional bytes, main rss then)
        self._saved_xfer_at = time.monotonic()

    def read(self) -> Readings:
        now = time.monotonic()
        others = self.cpu.sample()
        self.xfer.sample()
        if isinstance(self.idle_signal, OthersCpuIdle) and now - self._probed_at > REPROBE_S:
            self._probed_at = now
            self.idle_signal = probe_idle_signal(self.cpu)
        if now - self._idle[0] >= IDLE_SAMPLE_S or isinstance(self.idle_signal, OthersCpuIdle):
            self._idle = (now, self.idle_signal.read())
        idle = None if self._idle[1] is None else self._idle[1] + (now - self._idle[0])
        if now - self._slow[0] >= SLOW_SAMPLE_S:
            self._slow = (now, self._read_slow())
        if now - self._saved_xfer_at >= 60:
            self._saved_xfer_at = now
            self.xfer.save()
        return Readings(now=_dt.datetime.now(), idle_s=idle, others_cpu_pct=others, battery=read_battery(),
                        xfer_mb=self.xfer.megabytes(self.xfer_period_days()), **self._slow[1])

    def node_memory(self) -> int:
        """Bytes of RAM the node uses: the proportional memory of all its processes, read every
        PSS_SAMPLE_S (the kernel walks every mapping for it), and in between that figure moved
        by the main process's resident size, where the model, optimizer and data live."""
        now = time.monotonic()
        rss = self.tree.root.memory_info().rss
        if now - self._pss[0] >= PSS_SAMPLE_S:
            self._pss = (now, proportional_memory(self.tree.processes()), rss)
        _, pss, rss_then = self._pss
        return max(0, pss + rss - rss_then)

    def _read_slow(self) -> dict:
        slow: dict = {}
        try:
            slow["memory_frac"] = self.node_memory() / psutil.virtual_memory().total
        except (psutil.Error, OSError):
            pass
        slow["home_used_gb"] = directory_bytes(self.home) / 1e9
        try:
            slow["disk_free_gb"] = shutil.disk_usage(self.home).free / 1e9
        except OSError:
            pass
        return slow

    def refresh_slow(self) -> None:
        """Read memory and disk at the next `read` (after preferences changed)."""
        self._slow = (-1e9, {})
        self._pss = (-1e9, 0, 0)

    def close(self) -> None:
        self.xfer.save()
