"""Keep Ctrl-C for the main process: hivemind's forked children (DHT, averagers) and the
p2pd daemon ignore SIGINT, so the node can finish or abandon its round, checkpoint,
and shut them down itself instead of losing them mid-way."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes forked or spawned inside this block inherit SIGINT=ignored (p2pd keeps it
    across exec). The parent's handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_on_signals(stop: threading.Event, message: str | None = None) -> None:
    """First SIGINT/SIGTERM: set `stop`, so the loop ends after what it is doing (a
    KeyboardInterrupt raised inside a call to hivemind's DHT process can leave its pipe
    half-written and the shutdown stuck). Second SIGINT: abort now. Main thread only."""
    import sys

    def request_stop(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        if message:
            print(message, file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
