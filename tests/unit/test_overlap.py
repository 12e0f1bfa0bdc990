"""Overlapped fragments (swarm/overlap.py, FragmentRebase): what goes out with a round's
slice, and the rebase of that slice once its average lands, on a real PathSession."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from p2ptrain.swarm.node import ModuleRound
from p2ptrain.swarm.overlap import FragmentRebase
from p2ptrain.train.outer import ModuleOuterState, fragment_bounds
from p2ptrain.train.session import PathSession

FRAGMENTS = 4


@dataclass
class SlotView:
    """The parts of a ModuleSlot the rebase reads (the real slot also owns a hivemind averager)."""

    outer: ModuleOuterState
    lock: threading.Lock

    def fragment(self, round_: int) -> tuple[int, int]:
        numel = sum(g.numel() for g in self.outer.global_params)
        return fragment_bounds(numel, FRAGMENTS, round_)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def local_flat(session: PathSession, module_id: str) -> torch.Tensor:
    local = session.local_state(module_id)
    return flat([local[n] for n in session.outer[module_id].names])


def train(session: PathSession, gen: torch.Generator) -> None:
    """Stand-in progress: every local value moves a little."""
    for module_id in session.module_ids:
        n = local_flat(session, module_id).numel()
        session.shift_local(module_id, 0, 1e-3 * torch.randn(n, generator=gen))


def land(slot: SlotView, start: int, end: int, update: torch.Tensor) -> None:
    """An average landing: the slice's globals move by `update` (laid end to end)."""
    offset = 0
    with slot.lock:
        for g in slot.outer.global_params:
            lo, hi = max(start, offset), min(end, offset + g.numel())
            if lo < hi:
                g.view(-1)[lo - offset:hi - offset] += update[lo - start:hi - start]
            offset += g.numel()


def session_and_slots(run_state, docs, tmp_path, path: tuple[int, int], seed: int):
    """A real PathSession on `path`, its modules' slot views, a seeded generator and a fresh rebase."""
    session = PathSession(run_state, path, docs, torch.device("cpu"), tmp_path)
    slots = {m: SlotView(session.outer[m], threading.Lock()) for m in session.module_ids}
    return session, slots, torch.Generator().manual_seed(seed), FragmentRebase()


def two_slices_out(run_state, docs, tmp_path, path: tuple[int, int], seed: int):
    """session_and_slots after rounds 1 and 2 trained: slice 1 in flight, round 2's progress
    taken (its slice going out), nothing landed yet; and round 2's pseudo-gradients."""
    session, slots, gen, rebase = session_and_slots(run_state, docs, tmp_path, path, seed)
    train(session, gen)
    rebase.rebase(slots, session, rebase.progress(slots, session, 1), landed={})
    train(session, gen)
    return session, slots, gen, rebase, rebase.progress(slots, session, 2)


def test_a_landed_slice_becomes_the_new_globals_plus_the_progress_made_since_it_went_out(
        tiny_run_state, stdlib_docs, tmp_path):
    # Prepare: a path's session; rounds 1 and 2 of 4 fragments send out slices 1 and 2
    session, slots, gen, rebase = session_and_slots(tiny_run_state, stdlib_docs, tmp_path, (0, 0), seed=0)
    train(session, gen)
    deltas_1 = rebase.progress(slots, session, 1)
    rebase.rebase(slots, session, deltas_1, landed={})  # nothing in flight before round 1
    before = {m: local_flat(session, m) for m in slots}
    train(session, gen)  # round 2's progress
    at_round_2 = {m: local_flat(session, m) for m in slots}
    deltas_2 = rebase.progress(slots, session, 2)

    # Execute: round 1's slice lands, its globals moved by a chosen update, then the rebase
    updates = {}
    for m, slot in slots.items():
        start, end = slot.fragment(1)
        updates[m] = torch.linspace(-1.0, 1.0, end - start)
        land(slot, start, end, updates[m])
    rebase.rebase(slots, session, deltas_2, landed={m: ModuleRound() for m in slots})

    # Assert: slice 1's local values are the new globals plus round 2's progress (what was
    # sent, G − local at round 1's end, is no longer counted locally); every other slice keeps
    # its values and its progress for its own turn
    for m, slot in slots.items():
        start, end = slot.fragment(1)
        g = flat(slot.outer.global_params)
        progress_since = at_round_2[m] - before[m]
        after = local_flat(session, m)
        torch.testing.assert_close(after[start:end], g[start:end] + progress_since[start:end], rtol=0, atol=1e-6)
        torch.testing.assert_close(after[:start], at_round_2[m][:start], rtol=0, atol=0)
        torch.testing.assert_close(after[end:], at_round_2[m][end:], rtol=0, atol=0)
        # and round 2's pseudo-gradient, kept for its slice, is G − local at round 2's end
        s2, e2 = slot.fragment(2)
        torch.testing.assert_close(flat(deltas_2[m])[s2:e2], g[s2:e2] - at_round_2[m][s2:e2], rtol=0, atol=1e-6)


def test_a_lone_holder_whose_average_is_its_own_progress_keeps_its_model_unchanged(
        tiny_run_state, stdlib_docs, tmp_path):
    # Prepare: the average of a group of one is its own pseudo-gradient; with outer lr 1 and
    # no momentum the slice's globals become the local values that went out
    session, slots, gen, rebase = session_and_slots(tiny_run_state, stdlib_docs, tmp_path, (1, 1), seed=1)

    # Execute: 6 rounds, each landing the previous round's slice as G ← G − D
    for round_ in range(1, 7):
        train(session, gen)
        deltas = rebase.progress(slots, session, round_)
        before = {m: local_flat(session, m) for m in slots}
        for m, (start, end, _, delta) in rebase.in_flight.items():
            land(slots[m], start, end, -delta)
        rebase.rebase(slots, session, deltas, landed={})

        # Assert: the rebase leaves the model where training left it
        for m in slots:
            torch.testing.assert_close(local_flat(session, m), before[m], rtol=0, atol=1e-6)


def test_a_module_whose_state_was_replaced_starts_again_from_its_globals(tiny_run_state, stdlib_docs, tmp_path):
    # Prepare: a slice in flight, then the landed round re-synced the module from the majority
    session, slots, gen, rebase, deltas = two_slices_out(tiny_run_state, stdlib_docs, tmp_path, (0, 1), seed=2)
    module = next(iter(slots))

    # Execute
    rebase.rebase(slots, session, deltas, landed={module: ModuleRound(resynced_from="12D3KooWmajority")})

    # Assert: as in plain averaging, the re-synced module continues from the agreed state
    torch.testing.assert_close(local_flat(session, module), flat(slots[module].outer.global_params), rtol=0, atol=0)


def test_the_slice_that_went_out_before_a_re_sync_lands_on_the_re_synced_state(
        tiny_run_state, stdlib_docs, tmp_path):
    # Prepare: slice 1 in flight; round 2's slice goes out, cut from this copy; then round 1's
    # landing re-syncs the module from the majority, whose state is far from this copy's
    session, slots, gen, rebase, deltas = two_slices_out(tiny_run_state, stdlib_docs, tmp_path, (1, 0), seed=3)
    module = next(iter(slots))
    slot = slots[module]
    numel = flat(slot.outer.global_params).numel()
    land(slot, 0, numel, torch.full((numel,), 5.0))  # the majority's state replaces this copy's
    rebase.rebase(slots, session, deltas, landed={module: ModuleRound(resynced_from="12D3KooWmajority")})
    resynced = local_flat(session, module)
    train(session, gen)  # round 3's progress, on the re-synced state
    progress_since = local_flat(session, module) - resynced

    # Execute: round 2's slice lands (its globals move by a chosen update), then the rebase
    start, end = slot.fragment(2)
    land(slot, start, end, torch.linspace(-1.0, 1.0, end - start))
    rebase.rebase(slots, session, rebase.progress(slots, session, 3), landed={module: ModuleRound()})

    # Assert: that slice is the new globals plus the progress made since the re-sync; neither
    # the re-sync's jump nor the progress the re-sync dropped comes back into the model
    g = flat(slot.outer.global_params)
    after = local_flat(session, module)
    torch.testing.assert_close(after[start:end], g[start:end] + progress_since[start:end], rtol=0, atol=1e-5)
