"""Overlapped rounds: the all-reduce of round k runs on its own thread while round k+1
trains, and its outer update lands one round late (Streaming DiLoCo, hivemind's delayed
updates). At the end of round k:

    δ_k = local − anchor_k                 (this round's progress)
    wait for round k−1's average; G ← Nesterov(G, mean Δ_{k−1})
    local ← G + δ_k ;  anchor_{k+1} ← local
    start averaging Δ_k = −δ_k in the background

so the local model always equals the latest agreed global plus the progress whose
average has not landed yet.

Shared state: the background thread owns the module globals (under each slot's lock)
from `start` until `finish` returns; the driver touches them only after `finish`. An
exception on the background thread is kept and handed back by `finish`, never lost.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


class BackgroundRound:
    """One round's averaging on a thread of its own."""

    def __init__(self, round_: int, work: Callable[[], dict]):
        self.round = round_
        self.results: dict = {}
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"p2ptrain-averaging-{round_}",
                                        daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], dict]) -> None:
        try:
            self.results = work()
        except BaseException as e:  # surfaced by finish(): a failed round is reported, never lost
            self.error = e

    def finish(self, timeout: Optional[float] = None) -> tuple[dict, Optional[BaseException]]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            return {}, TimeoutError(f"round {self.round}'s averaging did not finish in {timeout} s")
        return self.results, self.error


class Anchors:
    """Where this round's training started, per module (the local model after the last rebase)."""

    def __init__(self) -> None:
        self.by_module: dict[str, list[torch.Tensor]] | None = None

    def progress(self, slots: dict, session) -> dict[str, list[torch.Tensor]]:
        """Δ = anchor − local for every module: this round's progress, as a pseudo-gradient."""
        if self.by_module is None:
            self.by_module = {m: [g.clone() for g in slot.outer.global_params] for m, slot in slots.items()}
        deltas = {}
        for module_id, anchor in self.by_module.items():
            local = session.local_state(module_id)
            names = slots[module_id].outer.names
            deltas[module_id] = [a - local[n].detach().to("cpu", torch.float32) for a, n in zip(anchor, names)]
        return deltas

    def rebase(self, slots: dict, session, deltas: dict[str, list[torch.Tensor]]) -> None:
        """local ← G + δ (the latest agreed globals plus the progress still in flight)."""
        for module_id, slot in slots.items():
            with slot.lock:
                state = {n: g - d for n, g, d in zip(slot.outer.names, slot.outer.global_params, deltas[module_id])}
            session.model.load_module_state(module_id, state)
            self.by_module[module_id] = [state[n].clone() for n in slot.outer.names]

    def reset(self) -> None:
        self.by_module = None
