"""Overlapped rounds: the all-reduce of round k runs on its own thread while round k+1
trains, and its outer update lands one round late (Streaming DiLoCo, hivemind's delayed
updates). At the end of round k:

    δ_k = local − anchor_k                 (this round's progress)
    wait for round k−1's average; G ← Nesterov(G, mean Δ_{k−1})
    local ← G + δ_k ;  anchor_{k+1} ← local
    start averaging Δ_k = −δ_k in the background

so the local model always equals the latest agreed global plus the progress whose
average has not landed yet.

With fragments (averaging.fragments = N > 1: round k averages slice f = k mod N of each
module, Streaming DiLoCo's overlapped fragments) every slice keeps its own progress until
its turn (FragmentRebase). At the end of round k:

    D = G − local                          (each value's progress since its slice last synced)
    keep D_f and G_f                       (this round's slice, as it goes out)
    wait for round k−1's average: G_f' ← Nesterov(G_f', mean D_f')
    local_f' ← local_f' + (G_f' − G_f' kept) + D_f'   (= the new G_f' + progress since k−1's end)
    start averaging D_f in the background

so a slice's local values always equal its latest agreed global plus its progress not yet
averaged. A module whose landed round replaced its whole state (a re-sync from the majority,
a tie healed) starts again from it, as in plain averaging, and the slice then going out
lands on that state (it was cut from the replaced one).

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

    def progress(self, slots: dict, session, round_: int = 0) -> dict[str, list[torch.Tensor]]:
        """Δ = anchor − local for every module: this round's progress, as a pseudo-gradient."""
        if self.by_module is None:
            self.by_module = {m: [g.clone() for g in slot.outer.global_params] for m, slot in slots.items()}
        deltas = {}
        for module_id, anchor in self.by_module.items():
            local = session.local_state(module_id)
            names = slots[module_id].outer.names
            deltas[module_id] = [a - local[n].detach().to("cpu", torch.float32) for a, n in zip(anchor, names)]
        return deltas

    def rebase(self, slots: dict, session, deltas: dict[str, list[torch.Tensor]], landed: dict | None = None) -> None:
        """local ← G + δ (the latest agreed globals plus the progress still in flight)."""
        for module_id, slot in slots.items():
            with slot.lock:
                state = {n: g - d for n, g, d in zip(slot.outer.names, slot.outer.global_params, deltas[module_id])}
            session.model.load_module_state(module_id, state)
            self.by_module[module_id] = [state[n].clone() for n in slot.outer.names]

    def reset(self) -> None:
        self.by_module = None


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class FragmentRebase:
    """Overlapped rounds with fragments (see the module's docstring): what went out with the
    slice in flight, and the rebase of that slice once its average lands."""

    def __init__(self) -> None:
        # module -> (start, end, the slice's globals and pseudo-gradient as they went out)
        self.in_flight: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self._next: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}

    def progress(self, slots: dict, session, round_: int) -> dict[str, list[torch.Tensor]]:
        """D = G − local for every module (the averaging picks round_'s slice), keeping that
        slice's D and G until its average lands. Reads no slice the averaging in flight writes:
        that one is round_ − 1's."""
        deltas, self._next = {}, {}
        for module_id, slot in slots.items():
            local = session.local_state(module_id)
            with slot.lock:
                deltas[module_id] = [g - local[n].detach().to("cpu", torch.float32)
                                     for g, n in zip(slot.outer.global_params, slot.outer.names)]
                start, end = slot.fragment(round_)
                kept = _flat(slot.outer.global_params)[start:end].clone()
            self._next[module_id] = (start, end, kept, _flat(deltas[module_id])[start:end].clone())
        return deltas

    def rebase(self, slots: dict, session, deltas: dict[str, list[torch.Tensor]], landed: dict | None = None) -> None:
        """Once round k−1's average has landed: its slice ← the new globals plus the progress
        made since it went out (a module whose state was replaced: local ← G); then round k's
        slice is the one in flight."""
        for module_id, (start, end, kept, delta) in self.in_flight.items():
            result = (landed or {}).get(module_id)
            slot = slots[module_id]
            if result is not None and (result.resynced_from or result.healed_with):
                session.adopt_global(module_id)
                # the slice going out now was cut from the replaced copy: when it lands, the
                # model is the new globals plus the progress made since this re-sync, so it is
                # rebased from the replaced state with no progress of its own (what it sent
                # still counts in the others' average)
                if module_id in self._next:
                    next_start, next_end, _, next_delta = self._next[module_id]
                    with slot.lock:
                        now = _flat(slot.outer.global_params)[next_start:next_end].clone()
                    self._next[module_id] = (next_start, next_end, now, torch.zeros_like(next_delta))
                continue
            with slot.lock:
                now = _flat(slot.outer.global_params)[start:end]
            session.shift_local(module_id, start, now - kept + delta)
        self.in_flight, self._next = self._next, {}

    def reset(self) -> None:
        self.in_flight, self._next = {}, {}
