"""No orphans: the node's child processes die with it, even when it is SIGKILLed.

hivemind forks the DHT and one process per averager from the node's process, and the DHT
process starts p2pd. When the node is killed (SIGKILL, the OOM killer, a crash), nothing
tells them: they would keep running, holding ports, memory and CPU. So, once `install()`
ran (before the node opens its DHT):

- every process forked from the node's main thread asks the kernel for a parent-death
  signal (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`): when the node dies, so do they;
- p2pd is started through a small launcher that asks the same for p2pd (the setting
  survives `exec`) before it becomes p2pd; so when the DHT process dies, p2pd dies;
- a fork from another thread (the kernel's parent-death signal follows the forking
  *thread*) and every fork on other systems gets a watchdog thread instead, which polls
  the parent's pid and exits the child when it changes;
- file descriptors registered with `close_in_children` (the pid-file lock, the control
  socket) are closed in forked children, so they never outlive the node in a child.

Both checks also cover the race where the parent dies between fork and prctl.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WATCHDOG_POLL_S = 1.0

_installed = False
_fds_to_close: set[int] = set()
_forking_from_main: dict[int, bool] = {}
_prctl = None

# Run as `python -S -c LAUNCHER PARENT_PID PROGRAM ARGS…`: die with the parent, then become PROGRAM.
LAUNCHER = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


def _before_fork() -> None:
    _forking_from_main[threading.get_ident()] = threading.current_thread() is threading.main_thread()


def _after_fork_in_parent() -> None:
    _forking_from_main.pop(threading.get_ident(), None)


def _after_fork_in_child() -> None:
    parent = os.getppid()
    for fd in list(_fds_to_close):
        try:
            os.close(fd)
        except OSError:
            pass
    _fds_to_close.clear()
    from_main = _forking_from_main.get(threading.get_ident(), False)
    _forking_from_main.clear()
    if _prctl is not None and from_main:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return
    _start_watchdog(parent)


def _start_watchdog(parent: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_POLL_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="p2ptrain-lifeline", daemon=True).start()


def _launcher_args(make_process_args):
    """Wrap hivemind's P2P._make_process_args so that p2pd starts through LAUNCHER."""

    def make_args(*args, **kwargs):
        argv = make_process_args(*args, **kwargs)
        if _prctl is None:
            return argv
        return [sys.executable, "-S", "-c", LAUNCHER, str(os.getpid()), *argv]

    return staticmethod(make_args)


def install() -> None:
    """Make every child forked or started from now on die with this process. Idempotent;
    call before the node starts its DHT."""
    global _installed, _prctl
    if _installed:
        return
    _prctl = _load_prctl()
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
    from hivemind.p2p.p2p_daemon import P2P
    P2P._make_process_args = _launcher_args(P2P._make_process_args)
    _installed = True
    logger.debug("lifeline installed (%s)", "parent-death signal" if _prctl else "watchdog threads")


def close_in_children(fd: int) -> None:
    """Close `fd` in every child forked from now on (a lock or a listening socket)."""
    _fds_to_close.add(fd)


def forget_fd(fd: int) -> None:
    _fds_to_close.discard(fd)
