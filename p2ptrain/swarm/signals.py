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
