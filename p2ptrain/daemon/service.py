"""The daemon's lifecycle: `join` with a pid file, a log file, signals, a local control
socket and a policy thread that suspends and resumes the round driver.

    daemon run (main thread)                       threads
    ─────────────────────────                      ───────
    take the instance lock (pid file)              control socket: status, mode, stop, reload
    log to <logs>/daemon.log (rotating)            policy: every POLICY_TICK_S, preferences +
    nice 19, idle IO; lifeline (no orphans)          readings → node.suspension.set(reasons)
    signals: 1st = stop at a safe point, 2nd = exit now
    open_node → node.run(on_step, on_round) → close → exit 0

A foreground `join` takes the same lock and serves the same socket (ForegroundServices),
so `p2ptrain status` works for both and two nodes never share one home.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from p2ptrain import __version__
from p2ptrain.daemon import control, lifeline
from p2ptrain.daemon.policy import RunMode, Readings, describe, set_mode, suspend_reasons
from p2ptrain.daemon.prefs import Preferences
from p2ptrain.errors import ConfigError, UserError
from p2ptrain.home import Places, private_dir, write_private

logger = logging.getLogger(__name__)

POLICY_TICK_S = 2.0
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
START_TIMEOUT_S = 90.0  # `daemon start` waits this long for the control socket to answer
STOP_TIMEOUT_S = 180.0  # `daemon stop` waits this long for the process and its p2pd to be gone
MODE_FILE = "mode.json"
LAST_EXIT_FILE = "last-exit.json"
OUT_FILE = "daemon.out"  # a detached daemon's stdout/stderr: only what bypasses logging (crashes)


class AlreadyRunning(UserError):
    exit_code = 2


class StartupInterrupted(Exception):
    """A stop signal arrived before the node started its rounds (an Exception, so that
    open_node's own cleanup runs)."""


# ------------------------------------------------------------ the pid file

@dataclass
class PidInfo:
    pid: int
    create_time: float | None = None
    kind: str = "daemon"
    started_at: float | None = None


def read_pid_file(path: Path) -> PidInfo | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    try:
        raw = json.loads(text)
        if isinstance(raw, int):
            return PidInfo(raw, kind="?")
        return PidInfo(int(raw["pid"]), raw.get("create_time"), str(raw.get("kind", "daemon")),
                       raw.get("started_at"))
    except (ValueError, KeyError, TypeError):
        return None


def _lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def stale_reason(info: PidInfo | None) -> str:
    """Why a pid file whose lock nobody holds is stale: its pid is gone, or is now another process."""
    if info is None:
        return "unreadable"
    try:
        proc = psutil.Process(info.pid)
        name = proc.name()
        if info.create_time is not None and abs(proc.create_time() - info.create_time) > 1.0:
            return f"pid {info.pid} is now another process ({name})"
        return f"pid {info.pid} ({name}) is not a p2ptrain node"
    except psutil.NoSuchProcess:
        return f"pid {info.pid} is gone"
    except psutil.Error as e:
        return f"pid {info.pid}: {e}"


def running_node(places: Places) -> PidInfo | None:
    """The node holding this home's instance lock, or None (no pid file, or a stale one)."""
    info = read_pid_file(places.pid_file)
    if info is not None and _lock_is_held(places.pid_file):
        return info
    return None


class InstanceLock:
    """At most one node per home: an flock on the pid file, held for the node's life (the
    kernel drops it when the process dies, even by SIGKILL). The file says who holds it."""

    def __init__(self, places: Places, kind: str):
        self.places, self.kind = places, kind
        self.fd: int | None = None
        self.replaced: str | None = None  # why a previous pid file was stale

    def acquire(self) -> "InstanceLock":
        path = self.places.pid_file
        private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_pid_file(path)
            who = f"{info.kind}, pid {info.pid}" if info else "pid unknown"
            raise AlreadyRunning(f"a p2ptrain node is already running in this home ({who}); stop it with "
                                 "`p2ptrain daemon stop`, or give this one another --home") from None
        previous = read_pid_file(path)
        if previous is not None or os.fstat(fd).st_size:
            self.replaced = stale_reason(previous)
            logger.warning("removed a stale pid file %s: %s", path, self.replaced)
        me = psutil.Process()
        text = json.dumps({"pid": me.pid, "create_time": me.create_time(), "kind": self.kind,
                           "started_at": time.time(), "version": __version__})
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        lifeline.close_in_children(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.places.pid_file.unlink()
        lifeline.forget_fd(self.fd)
        os.close(self.fd)
        self.fd = None


# --------------------------------------------------------- logs, priority

class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files (the first and every one after a rotation) are mode 0600."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding,
                    opener=lambda path, flags: os.open(path, flags, 0o600))


def setup_daemon_logging(places: Places, to_stderr: bool) -> Path:
    """Log to <logs>/daemon.log, rotated at LOG_MAX_BYTES (LOG_BACKUPS old files kept); also to
    stderr in the foreground (systemd's journal). hivemind's records go to the same file
    (route_hivemind_logs, once hivemind is imported)."""
    private_dir(places.logs)
    root = logging.getLogger()
    for h in list(root.handlers):  # the CLI's stderr handler: replaced by ours
        root.removeHandler(h)
    file_handler = PrivateRotatingFileHandler(places.log_file, maxBytes=LOG_MAX_BYTES,
                                                        backupCount=LOG_BACKUPS, encoding="utf-8")
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    level = os.environ.get("P2PTRAIN_LOGLEVEL", "INFO").upper()
    root.setLevel(level)
    logging.getLogger("p2ptrain").setLevel(level)
    for noisy in ("hivemind", "bitsandbytes", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    os.chmod(places.log_file, 0o600)  # a file left by an older version
    return places.log_file


def route_hivemind_logs() -> None:
    """hivemind logs through its own stderr handler; send its records to ours instead."""
    from hivemind.utils.logging import use_hivemind_log_handler
    use_hivemind_log_handler("nowhere")


def lower_priority() -> list[str]:
    """nice 19 and the idle IO class (inherited by the DHT, averager and p2pd processes)."""
    done = []
    me = psutil.Process()
    try:
        if me.nice() < 19:
            me.nice(19)
        done.append("nice 19")
    except (psutil.Error, OSError) as e:
        logger.info("could not lower the CPU priority: %s", e)
    if hasattr(psutil, "IOPRIO_CLASS_IDLE"):
        try:
            me.ionice(psutil.IOPRIO_CLASS_IDLE)
            done.append("idle IO")
        except (psutil.Error, OSError) as e:
            logger.info("could not set the idle IO priority: %s", e)
    return done


# ----------------------------------------------------------- what a node says

def newest_checkpoint(data_home: Path) -> dict | None:
    """The newest checkpoint directory under this home (any run, any path)."""
    best = None
    for directory in data_home.glob("runs/*/checkpoints/path-*/round-*"):
        try:
            mtime = directory.stat().st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, directory)
    if best is None:
        return None
    mtime, directory = best
    return {"dir": str(directory), "round": int(directory.name.split("-")[1]), "age_s": round(time.time() - mtime, 1)}


def contribution(data_home: Path) -> dict | None:
    """Tokens, rounds (run, and averaged with at least one peer) and hours this home
    contributed since install (the ledger)."""
    try:
        from p2ptrain.data.ledger import Ledger
    except ImportError:  # the ledger lands with the data work
        return None
    try:
        totals = Ledger(data_home).totals()
    except (OSError, ValueError) as e:
        logger.warning("could not read the contribution ledger: %s", e)
        return None
    return {"tokens": totals["tokens"], "rounds": totals["rounds"], "rounds_averaged": totals["rounds_averaged"],
            "hours": totals["hours"], "modules": totals["modules"]}


def write_last_exit(places: Places, code: int, message: str, round_: int | None) -> None:
    with contextlib.suppress(OSError):
        private_dir(places.state)
        write_private(places.state / LAST_EXIT_FILE, json.dumps({"code": code, "message": message,
                                                                 "round": round_, "time": time.time()}))


def read_last_exit(places: Places) -> dict | None:
    try:
        return json.loads((places.state / LAST_EXIT_FILE).read_text())
    except (OSError, ValueError):
        return None


def offline_status(places: Places) -> dict:
    """What `status` says when no node answers (reading only: a missing home stays missing)."""
    if not places.data.is_dir():
        return {"state": "stopped", "kind": None, "pid": None, "version": __version__, "home": str(places.data),
                "home_exists": False, "stale_pid_file": None, "last_exit": None, "checkpoint": None,
                "contributed": None, "log_file": str(places.log_file), "prefs_file": str(places.prefs_file)}
    info = read_pid_file(places.pid_file)
    return {"state": "stopped", "kind": None, "pid": None, "version": __version__,
            "home": str(places.data), "home_exists": True,
            "stale_pid_file": stale_reason(info) if info is not None and not _lock_is_held(places.pid_file) else None,
            "last_exit": read_last_exit(places), "checkpoint": newest_checkpoint(places.data),
            "contributed": contribution(places.data), "log_file": str(places.log_file),
            "prefs_file": str(places.prefs_file)}


# ------------------------------------------------------------- node control

class NodeControl:
    """What every running node answers on the control socket: status and stop."""

    kind = "join"

    def __init__(self, places: Places):
        self.places = places
        self.started_at = time.time()
        self.opened = None  # p2ptrain.swarm.join.OpenNode, once the node is up
        self.phase = "starting"  # starting | running | stopping
        self.stop_event = threading.Event()

    @property
    def node(self):
        return self.opened.node if self.opened is not None else None

    def attach(self, opened) -> None:
        self.opened = opened
        if self.stop_event.is_set():
            opened.node.stop_requested.set()
        self.phase = "running"

    def request_stop(self, why: str) -> None:
        if not self.stop_event.is_set():
            logger.info("stopping (%s): the round in progress is abandoned, the last checkpoint kept", why)
        self.stop_event.set()
        self.phase = "stopping"
        if self.node is not None:
            self.node.stop_requested.set()

    def suspend_reasons(self) -> list[str]:
        return sorted(self.node.suspension.reasons()) if self.node is not None else []

    def status(self) -> dict:
        node = self.node
        node_status = node.status() if node is not None else None
        reasons = self.suspend_reasons()
        state = self.phase if self.phase != "running" else ("suspended" if reasons else "running")
        checkpoint = newest_checkpoint(self.places.data)
        if node is not None and checkpoint is not None:
            checkpoint["error"] = getattr(node.session.store, "last_error", None)
        return {
            "kind": self.kind, "state": state, "suspended": reasons, "pid": os.getpid(), "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1), "node": node_status,
            # the inner optimizer's step counter: moves with every inner step (tokens only per round)
            "inner_steps": node.session.inner.step_count if node is not None else None,
            "restored_round": getattr(self.opened, "restored_round", None),
            "caught_up": dict(getattr(self.opened, "caught_up", {}) or {}),
            "checkpoint": checkpoint, "contributed": contribution(self.places.data),
            "log_file": str(self.places.log_file) if self.kind == "daemon" else None,
            "socket": str(self.places.socket_file), "home": str(self.places.data),
        }

    def handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stop":
            if self.phase == "starting" and not self.stop_event.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # only the main thread can abandon the start-up
            else:
                self.request_stop("requested over the control socket")
            return {"ok": True, "pid": os.getpid()}
        if cmd in ("mode", "reload"):
            return {"ok": False, "error": f"this node is a foreground `join`: `{cmd}` needs the daemon "
                                          "(p2ptrain daemon start)"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


class ForegroundServices:
    """For `p2ptrain join`: the instance lock, the lifeline (no orphan p2pd after a kill) and
    the control socket that answers `p2ptrain status` and `daemon stop`."""

    def __init__(self, places: Places):
        self.control = NodeControl(places)
        self.lock = InstanceLock(places, "join").acquire()
        try:
            lifeline.install()
            self.server = control.ControlServer(places.runtime, self.control.handle).start()
        except BaseException:
            self.lock.release()
            raise

    def attach(self, opened) -> None:
        self.control.attach(opened)

    def close(self) -> None:
        self.server.close()
        self.lock.release()


# ------------------------------------------------------------------ daemon

class Daemon(NodeControl):
    """The daemon: NodeControl plus the computing preferences, the run mode and the policy
    thread that turns them into suspend reasons."""

    kind = "daemon"

    def __init__(self, places: Places, monitor_factory: Callable[["Daemon"], object] | None = None):
        super().__init__(places)
        self.prefs = Preferences.defaults()
        self.prefs_error: str | None = None
        self._prefs_mtime: float | None = None
        self.mode = RunMode.load(places.state / MODE_FILE)
        self.reasons: set[str] = set()
        self.readings: Readings | None = None
        self.monitor = None
        self.dashboard: str | None = None  # the --metrics-port URL
        self._monitor_factory = monitor_factory
        self._policy: threading.Thread | None = None
        self._policy_stop = threading.Event()
        self._lock = threading.Lock()  # the run mode
        self._evaluate_lock = threading.Lock()
        self.reload_prefs(initial=True)

    # ------------------------------------------------------- preferences

    def reload_prefs(self, initial: bool = False) -> str | None:
        """Re-read prefs.toml; a bad file keeps the last good preferences (and says why)."""
        path = self.places.prefs_file
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        try:
            prefs = Preferences.load(path)
        except ConfigError as e:
            if str(e) != self.prefs_error:
                logger.error("%s; keeping the %s preferences", e, "default" if initial else "last good")
            self.prefs_error = str(e)
            self._prefs_mtime = mtime
            return self.prefs_error
        if not initial and prefs.values != self.prefs.values:
            changed = sorted(k for k in prefs.values if prefs.values[k] != self.prefs.values[k])
            logger.info("preferences changed: %s", ", ".join(f"{k} = {prefs.values[k]!r}" for k in changed))
        self.prefs, self.prefs_error, self._prefs_mtime = prefs, None, mtime
        if self.monitor is not None:
            self.monitor.refresh_slow()
        return None

    def _prefs_changed_on_disk(self) -> bool:
        try:
            mtime = self.places.prefs_file.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        return mtime != self._prefs_mtime

    # ------------------------------------------------------------ policy

    def start_policy(self) -> None:
        from p2ptrain.daemon.activity import Monitor
        make = self._monitor_factory or (lambda d: Monitor(os.getpid(), d.places.data, d.places.state,
                                                           lambda: d.prefs.daily_xfer_period_days))
        self.monitor = make(self)
        self.evaluate()
        self._policy = threading.Thread(target=self._policy_loop, name="p2ptrain-policy", daemon=True)
        self._policy.start()

    def _policy_loop(self) -> None:
        while not self._policy_stop.wait(POLICY_TICK_S):
            try:
                self.evaluate()
            except Exception:  # a failed reading must never stop the node
                logger.exception("the policy check failed; trying again in %.0f s", POLICY_TICK_S)

    def evaluate(self) -> set[str]:
        """One policy tick: preferences, readings and mode → the node's suspend reasons. From
        the policy thread and from control requests: one at a time (the meters keep state)."""
        with self._evaluate_lock:
            return self._evaluate()

    def _evaluate(self) -> set[str]:
        if self._prefs_changed_on_disk():
            self.reload_prefs()
        readings = self.monitor.read() if self.monitor is not None else None
        now = time.time()
        with self._lock:
            settled = self.mode.settle(now)
            if settled != self.mode:
                logger.info("run mode: the temporary mode ended; back to %s", settled.mode)
                self.mode = settled
                self._save_mode()
            reasons = suspend_reasons(self.prefs, self.mode, readings, now) if readings is not None else (
                {"user request"} if self.mode.current(now) == "never" else set())
            self.readings = readings
            if reasons != self.reasons:
                logger.info("%s", describe(reasons) if reasons else "resumed: nothing keeps the node from computing")
            self.reasons = reasons
        if self.node is not None:
            self.node.suspension.leave_in_memory = self.prefs.leave_apps_in_memory
            self.node.suspension.set(reasons)
        return reasons

    def suspend_reasons(self) -> list[str]:
        return sorted(self.reasons)

    def set_mode(self, mode: str, for_s: float | None) -> RunMode:
        with self._lock:
            self.mode = set_mode(self.mode, mode, for_s, time.time())
            self._save_mode()
        logger.info("run mode: %s", self.mode.describe(time.time()))
        self.evaluate()
        return self.mode

    def _save_mode(self) -> None:
        try:
            private_dir(self.places.state)
            self.mode.save(self.places.state / MODE_FILE)
        except OSError as e:
            logger.warning("could not save the run mode: %s", e)

    def attach(self, opened) -> None:
        super().attach(opened)
        opened.node.suspension.leave_in_memory = self.prefs.leave_apps_in_memory
        opened.node.suspension.set(self.reasons)

    def close(self) -> None:
        self._policy_stop.set()
        if self._policy is not None:
            self._policy.join(timeout=10)
        if self.monitor is not None:
            self.monitor.close()

    # ------------------------------------------------------------ control

    def status(self) -> dict:
        status = super().status()
        now = time.time()
        r = self.readings
        status.update({
            "mode": self.mode.current(now), "mode_text": self.mode.describe(now),
            "prefs_error": self.prefs_error, "prefs_file": str(self.places.prefs_file), "dashboard": self.dashboard,
            "leave_apps_in_memory": self.prefs.leave_apps_in_memory,
            "activity_signal": getattr(getattr(self.monitor, "idle_signal", None), "name", None),
            "readings": None if r is None else {
                "idle_s": r.idle_s, "others_cpu_pct": r.others_cpu_pct,
                "battery": None if r.battery is None else {"percent": r.battery.percent, "plugged": r.battery.plugged},
                "memory_frac": r.memory_frac, "home_used_gb": r.home_used_gb, "disk_free_gb": r.disk_free_gb,
                "xfer_mb": r.xfer_mb},
        })
        return status

    def handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "mode":
            try:
                for_s = request.get("for_s")
                mode = self.set_mode(str(request.get("mode")), None if for_s is None else float(for_s))
            except (UserError, TypeError, ValueError) as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True, "mode": mode.current(time.time()), "mode_text": mode.describe(time.time()),
                    "suspended": sorted(self.reasons)}
        if cmd == "reload":
            error = self.reload_prefs()
            self.evaluate()
            return {"ok": error is None, "error": error} if error else {"ok": True}
        return super().handle(request)


# ---------------------------------------------------------------- signals

def install_signal_handlers(daemon: NodeControl, starting: Callable[[], bool]) -> None:
    """1st SIGTERM/SIGINT: stop at the next safe point (or abandon the start-up); a 2nd one
    exits at once (the lifeline takes the children down with us). SIGHUP: reload prefs."""

    def on_stop(signum, _frame):
        if daemon.stop_event.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        daemon.request_stop(signal.Signals(signum).name)
        if starting():
            raise StartupInterrupted()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if isinstance(daemon, Daemon) and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: daemon.reload_prefs())


# ------------------------------------------------------------- daemon run

def run_daemon(places: Places, open_fn: Callable[[], object], detached: bool, max_rounds: int | None = None,
               max_minutes: float | None = None, metrics: tuple[str, int] | None = None) -> int:
    """`p2ptrain daemon run`: the whole life of a daemon; returns the exit code."""
    lock = InstanceLock(places, "daemon").acquire()
    setup_daemon_logging(places, to_stderr=not detached)
    if lock.replaced:
        logger.warning("the previous daemon did not exit cleanly (%s)", lock.replaced)
    daemon = Daemon(places)
    starting = [True]
    install_signal_handlers(daemon, lambda: starting[0])
    server = None
    code, message = 0, "stopped"
    try:
        server = control.ControlServer(places.runtime, daemon.handle).start()  # `daemon start` waits for it
        lifeline.install()
        logger.info("p2ptrain %s daemon pid %d; control socket %s; preferences %s", __version__, os.getpid(),
                    server.address, places.prefs_file)
        if daemon.prefs.low_priority:
            logger.info("priority: %s", ", ".join(lower_priority()) or "unchanged")
        route_hivemind_logs()
        daemon.start_policy()
        opened = open_fn()
        starting[0] = False
        try:
            daemon.attach(opened)
            node = opened.node
            logger.info("peer %s training %s from round %d%s", node.peer_id, node.describe(), node.round,
                        f" (resumed from the round {opened.restored_round} checkpoint)"
                        if opened.restored_round is not None else "")
            if opened.caught_up:
                logger.info("downloaded the current state of %s from peers", ", ".join(opened.caught_up))
            _drive(daemon, node, max_rounds, max_minutes, metrics)
            message = f"stopped at round {node.round}"
        finally:
            opened.close()
    except StartupInterrupted:
        message = "stopped during start-up"
    except UserError as e:
        code, message = e.exit_code, f"error: {e}"
        logger.error("%s", message)
    except Exception as e:  # logged with its traceback; the service manager may restart us
        code, message = 1, f"internal error: {type(e).__name__}: {e}"
        logger.exception("the daemon failed")
    finally:
        starting[0] = False
        daemon.close()
        if server is not None:
            server.close()
        write_last_exit(places, code, message, daemon.node.round if daemon.node is not None else None)
        logger.info("daemon exits with code %d (%s)", code, message)
        lock.release()
    return code


def _drive(daemon: Daemon, node, max_rounds: int | None, max_minutes: float | None,
           metrics: tuple[str, int] | None = None) -> None:
    """node.run with the preferences that act inside the training thread (pacing.py), and the
    dashboard and /metrics with --metrics-port (p2ptrain.monitor)."""
    from p2ptrain.daemon.pacing import Pacer
    pacer = Pacer(lambda: daemon.prefs, node.stop_requested)
    xfer = daemon.monitor.xfer if daemon.monitor is not None else None
    watched = server = None
    if metrics is not None:
        from p2ptrain.monitor.web import is_loopback, serve_node
        host, port = metrics
        if not is_loopback(host):
            logger.warning("--metrics-host %s is not loopback: anyone who can reach it sees this node's status", host)
        try:
            watched, server = serve_node(node, host, port)
        except OSError as e:
            raise UserError(f"--metrics-port {port}: cannot listen on {host}: {e.strerror}") from None
        daemon.dashboard = server.url
        logger.info("dashboard at %s (Prometheus: %smetrics)", server.url, server.url)
    pacer.apply_threads()
    pacer.round_started(xfer.total_bytes if xfer else None)
    from p2ptrain.swarm.events import peers_text
    from p2ptrain.swarm.progress import StepProgress
    cap = None if node.cfg.averaging.fill_round else node.cfg.inner.steps_per_round
    steps = StepProgress(cap, first_step=node.session.inner.step_count)

    def on_step(report) -> None:
        if watched is not None:
            watched.on_step(report)
        steps.update(node.round + 1, report.step, report.loss, report.tokens_per_s)  # the round in progress
        pacer.after_steps()

    def on_round(report) -> None:
        if watched is not None:
            watched.on_round(report)
        logger.info("round %d  loss %.3f  %.0f tok/s  outer %.1fs  peers %s", report.round, report.loss,
                    report.tokens_per_s, report.seconds_outer, peers_text(report.modules))
        steps.new_round(node.session.inner.step_count)
        pacer.after_round(xfer.total_bytes if xfer else None)

    def on_landing(landing) -> None:
        logger.info("round %d  averaging landed at stop  peers %s", landing.round, peers_text(landing.modules))

    try:
        node.run(max_rounds=max_rounds, max_minutes=max_minutes, on_round=on_round, on_step=on_step,
                 on_landing=on_landing)
    finally:
        if server is not None:
            from p2ptrain.monitor.web import stop_node_server
            stop_node_server(watched, server)


# ---------------------------------------------------------- start and stop

def spawn_detached(places: Places, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `daemon run --detached ARGS` in a new session, stdin from /dev/null and
    stdout/stderr to <logs>/daemon.out (what bypasses logging: a crash's traceback)."""
    private_dir(places.logs)
    out = os.open(places.logs / OUT_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return subprocess.Popen([sys.executable, "-m", "p2ptrain.cli", "daemon", "run", "--detached", *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                cwd=str(places.data), env=env, close_fds=True)
    finally:
        os.close(out)


def wait_until_answering(places: Places, process: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> dict:
    """Wait until the new daemon answers `status`; UserError with its last words if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise UserError(f"the daemon exited at start with code {code}: {_last_words(places)}")
        try:
            reply = control.request(places.runtime, {"cmd": "status"}, timeout=5.0)
            if reply.get("ok") and reply["status"].get("pid") == process.pid:
                return reply["status"]
        except control.NotRunning:
            pass
        time.sleep(0.2)
    raise UserError(f"the daemon (pid {process.pid}) did not answer within {timeout:.0f} s; "
                    f"see {places.log_file}")


def _last_words(places: Places) -> str:
    last = read_last_exit(places)
    if last and time.time() - float(last.get("time", 0)) < 120:
        return str(last.get("message"))
    try:
        lines = (places.logs / OUT_FILE).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"see {places.log_file}"
    except OSError:
        return f"see {places.log_file}"


def stop_node(places: Places, timeout: float = STOP_TIMEOUT_S) -> tuple[int, float]:
    """`daemon stop`: ask the node to stop, then wait until it and its child processes
    (DHT, averagers, p2pd) are gone. Returns (pid, seconds). SIGTERM if the socket is dead."""
    info = running_node(places)
    if info is None:
        raise UserError("no p2ptrain node is running in this home")
    try:
        proc = psutil.Process(info.pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return info.pid, 0.0
    t0 = time.monotonic()
    try:
        reply = control.request(places.runtime, {"cmd": "stop"})
        if not reply.get("ok"):
            raise control.NotRunning(reply.get("error"))
    except control.NotRunning as e:
        logger.info("control socket unavailable (%s); sending SIGTERM", e)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    deadline = time.monotonic() + timeout
    alive = family
    while time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]  # (a zombie is gone: its parent has not reaped it yet)
        if not alive:
            break
        time.sleep(0.1)
    if alive:
        raise UserError(f"the node did not stop within {timeout:.0f} s (still running: "
                        f"{', '.join(f'{p.pid}' for p in alive)}); `kill {info.pid}` again exits at once")
    return info.pid, time.monotonic() - t0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
