"""Work-arounds for hivemind 1.1.12 bugs we measured, applied once before any DHT or
averager starts.

Large pipe messages: the DHT and averager processes read commands from a pipe whose
descriptor they register with uvloop's `add_reader`; libuv switches that descriptor to
non-blocking mode, so a command larger than one socket write (a run record of ~20 KB
after a previous `get`, in our measurements) arrives in pieces, `recv()` raises
BlockingIOError half-way and the child dies ("Ran out of input"). We hand the child a
loop whose `add_reader` puts the descriptor back in blocking mode: libuv only polls it,
and `recv()` then waits for the whole message.
"""

from __future__ import annotations

import os

_APPLIED = False


class _BlockingReaderLoop:
    """Delegates to the real loop; `add_reader` keeps the descriptor blocking."""

    def __init__(self, loop):
        self._loop = loop

    def add_reader(self, fd, callback, *args):
        result = self._loop.add_reader(fd, callback, *args)
        os.set_blocking(fd, True)
        return result

    def __getattr__(self, name):
        return getattr(self._loop, name)


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    import hivemind.averaging.averager as averager_module
    import hivemind.dht.dht as dht_module
    from hivemind.utils.asyncio import switch_to_uvloop

    def switch_to_uvloop_with_blocking_pipe():
        return _BlockingReaderLoop(switch_to_uvloop())

    dht_module.switch_to_uvloop = switch_to_uvloop_with_blocking_pipe
    averager_module.switch_to_uvloop = switch_to_uvloop_with_blocking_pipe
    _APPLIED = True
