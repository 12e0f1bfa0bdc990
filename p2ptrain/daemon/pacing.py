"""Preferences applied inside the training thread: how many CPU threads the inner steps
use (max_ncpus_pct), the duty cycle (cpu_usage_limit) and the average network rate
(max_bytes_sec_up / _down).

These slow the node down without suspending it: a throttled node still counts as a
module holder and averages every round, it just computes less often. They run in the
driver's `on_step` / `on_round` callbacks, i.e. in the thread that trains, between steps.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

import psutil

from p2ptrain.daemon.prefs import Preferences

logger = logging.getLogger(__name__)

MAX_PAUSE_S = 600.0  # no single pause longer than this (a preference change ends it sooner anyway)


def threads_for(max_ncpus_pct: float, base_threads: int) -> int:
    return max(1, math.floor(base_threads * max_ncpus_pct / 100 + 1e-9))


class Pacer:
    """Call `round_started` when the inner steps of a round begin, `after_steps` from
    on_step and `after_round(bytes_moved_total)` from on_round."""

    def __init__(self, prefs: Callable[[], Preferences], stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic, base_threads: int | None = None,
                 set_threads: Callable[[int], None] | None = None, wait: Callable[[float], bool] | None = None):
        self.prefs = prefs
        self.stop = stop
        self.clock = clock
        # 100 % is what torch would use anyway: one thread per core, or $OMP_NUM_THREADS when set
        # (more threads than that only oversubscribe a busy machine)
        self.base_threads = base_threads or _torch_threads()
        self._set_threads = set_threads or _torch_set_threads
        self._wait = wait or stop.wait
        self.threads: int | None = None
        self.busy_since = clock()
        self.round_bytes_start: int | None = None
        self.round_started_at = clock()
        self.paused_s = 0.0  # total time spent in duty-cycle and rate pauses

    def apply_threads(self) -> int:
        """Set the inner steps' thread count from max_ncpus_pct (in the training thread:
        torch's intra-op thread count is per calling thread)."""
        wanted = threads_for(self.prefs().max_ncpus_pct, self.base_threads)
        if wanted != self.threads:
            self._set_threads(wanted)
            if self.threads is not None:
                logger.info("inner steps now use %d of %d CPU threads", wanted, self.base_threads)
            self.threads = wanted
        return wanted

    def round_started(self, bytes_total: int | None = None) -> None:
        self.busy_since = self.round_started_at = self.clock()
        self.round_bytes_start = bytes_total

    def after_steps(self) -> float:
        """Duty cycle: after computing for `busy` seconds, pause busy × (100/limit − 1).
        Returns the pause taken."""
        self.apply_threads()
        limit = self.prefs().cpu_usage_limit
        now = self.clock()
        busy = now - self.busy_since
        pause = 0.0
        if limit < 100 and busy > 0:
            pause = min(MAX_PAUSE_S, busy * (100.0 / limit - 1.0))
            self._pause(pause)
        self.busy_since = self.clock()
        return pause

    def after_round(self, bytes_total: int | None) -> float:
        """Network rate: wait until this round's transfers averaged over the round (pause
        included) are under max_bytes_sec_up/_down. Up and down are each taken as half of
        the measured total (the butterfly all-reduce is symmetric). Returns the pause."""
        prefs = self.prefs()
        limits = [x for x in (prefs.max_bytes_sec_up, prefs.max_bytes_sec_down) if x > 0]
        pause = 0.0
        if limits and bytes_total is not None and self.round_bytes_start is not None:
            each_way = max(0, bytes_total - self.round_bytes_start) / 2
            elapsed = self.clock() - self.round_started_at
            pause = min(MAX_PAUSE_S, max(0.0, each_way / min(limits) - elapsed))
            if pause > 0:
                logger.info("network limit: %.0f bytes each way this round; pausing %.1f s", each_way, pause)
                self._pause(pause)
        self.round_started(bytes_total)
        return pause

    def _pause(self, seconds: float) -> None:
        if seconds <= 0 or self.stop.is_set():
            return
        self.paused_s += seconds
        self._wait(seconds)


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads() or psutil.cpu_count() or 1


def _torch_set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
