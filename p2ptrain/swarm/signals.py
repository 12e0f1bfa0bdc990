"""What hivemind's forked children (DHT, averagers) and the p2pd daemon inherit.

Ctrl-C stays with the main process: the children ignore SIGINT, so the node can finish or
abandon its round, checkpoint, and shut them down itself instead of losing them mid-way.

And the parent's Python heap stays shared: a forked child shares its parent's memory
pages until either writes to one, and CPython's garbage collector writes to every object
it scans (its bookkeeping lives in the object's header), so each child's first full
collection copied most of the heap it inherited (torch's and hivemind's modules). Objects
alive at the fork are frozen first (`gc.freeze`: collections in parent and child skip
them; reference counting still frees them, only a reference cycle among them would stay,
and a node forks its children once, at start). Measured on the demo's swarm (4 peers, after round 3, proportional set size):
837 → 792 MB per peer, the DHT and averager processes' own pages 202 → 158 MB
(benchmarks/bench_node_memory.py; README's "Memory per peer").
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading


def share_heap_with_children() -> None:
    """Collect garbage now, then freeze what is left so that children forked next keep
    sharing its pages (the module docstring says why)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes forked or spawned inside this block inherit SIGINT=ignored (p2pd keeps it
    across exec) and share the parent's heap as it is now. The parent's handler is
    restored on exit."""
    share_heap_with_children()
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
