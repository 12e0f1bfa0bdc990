"""Progress of long operations as lines a person reads in a terminal or a log file: a
module state download (bytes, rate, ETA) and inner steps in the daemon's log.

Both are throttled to one line every few seconds, and say nothing for an operation that
ends before the first line is due (a small module downloads in a blink). Lines go to the
`p2ptrain.progress` logger, which `setup_logging` shows at the default level, so `join`
prints them on stderr and the daemon writes them to its log.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

PROGRESS_LOGGER = "p2ptrain.progress"
logger = logging.getLogger(PROGRESS_LOGGER)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # unreachable: the loop returns at GB


class TransferProgress:
    """`update(received)` as bytes arrive; a line every `every_s` seconds once the transfer
    has run that long. `expected` is an upper bound known in advance (the module's fp32
    state): with a compressed stream the ETA errs on the long side."""

    def __init__(self, what: str, expected: int, every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, emit: Optional[Callable[[str], None]] = None):
        self.what, self.expected, self.every_s, self.clock = what, max(int(expected), 1), every_s, clock
        self.emit = emit or logger.info
        self.started = self.last_line = clock()
        self.lines = 0

    def update(self, received: int) -> Optional[str]:
        now = self.clock()
        if now - self.last_line < self.every_s:
            return None
        self.last_line = now
        elapsed = now - self.started
        rate = received / elapsed if elapsed > 0 else 0.0
        left = max(self.expected - received, 0)
        eta = f"ETA {left / rate:.0f} s" if rate > 0 else "ETA unknown"
        line = (f"{self.what}: {human_bytes(received)} of {human_bytes(self.expected)} "
                f"({min(received / self.expected, 1.0):.0%}), {human_bytes(rate)}/s, {eta}")
        self.lines += 1
        self.emit(line)
        return line

    def finish(self, received: int) -> Optional[str]:
        """A closing line, only if progress was shown (otherwise the caller's own log says it)."""
        if not self.lines:
            return None
        line = f"{self.what}: {human_bytes(received)} in {self.clock() - self.started:.1f} s"
        self.emit(line)
        return line


class StepProgress:
    """Inner-step progress for a log: `update(round, step, loss, tokens_per_s)` after steps
    (`step` counts this node's inner steps); a line every `every_s` seconds.
    `new_round(step)` when a round ends. `steps_per_round` is the round's cap (H); None when
    the node trains until the round's end (averaging.fill_round)."""

    def __init__(self, steps_per_round: Optional[int], first_step: int = 0, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, emit: Optional[Callable[[str], None]] = None):
        self.steps_per_round, self.every_s, self.clock = steps_per_round, every_s, clock
        self.emit = emit or logger.info
        self.last_line = clock()
        self.round_started_at_step = first_step

    def new_round(self, step: int) -> None:
        self.round_started_at_step = step

    def update(self, round_: int, step: int, loss: float, tokens_per_s: float) -> Optional[str]:
        now = self.clock()
        if now - self.last_line < self.every_s:
            return None
        self.last_line = now
        cap = "" if self.steps_per_round is None else f" of at most {self.steps_per_round}"
        line = (f"round {round_}: inner step {step - self.round_started_at_step}{cap}, loss {loss:.3f}, "
                f"{tokens_per_s:,.0f} tok/s")
        self.emit(line)
        return line
