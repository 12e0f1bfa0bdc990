"""Why a node is not training right now: a set of reasons, like BOINC's suspend reasons.

Whoever governs the node (the daemon's computing preferences, `daemon mode never`, a
test) sets the reasons; the round driver reads them only at safe points (between inner
steps and between rounds), so a suspension never tears a step or an all-reduce.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable


class Suspension:
    """A thread-safe set of suspend reasons; empty means the node may train."""

    def __init__(self) -> None:
        self._reasons: frozenset[str] = frozenset()
        self._changed = threading.Condition()
        self.suspended_seconds = 0.0  # total time the driver spent waiting in wait_until_resumed
        # keep the model on its device while suspended (BOINC's leave_apps_in_memory); the
        # daemon sets it from the preferences, a node without one never frees its device
        self.leave_in_memory = True

    def set(self, reasons: Iterable[str]) -> None:
        """Replace the reasons (an empty iterable resumes the node)."""
        with self._changed:
            self._reasons = frozenset(reasons)
            self._changed.notify_all()

    def reasons(self) -> frozenset[str]:
        return self._reasons

    @property
    def active(self) -> bool:
        return bool(self._reasons)

    def describe(self) -> str | None:
        """`on batteries, user active`, or None when not suspended."""
        return ", ".join(sorted(self._reasons)) or None

    def wait_until_resumed(self, stop: threading.Event, poll_s: float = 0.5) -> float:
        """Block while suspended (or until `stop` is set); returns the seconds waited."""
        t0 = time.monotonic()
        with self._changed:
            while self._reasons and not stop.is_set():
                self._changed.wait(poll_s)
        waited = time.monotonic() - t0
        self.suspended_seconds += waited
        return waited
