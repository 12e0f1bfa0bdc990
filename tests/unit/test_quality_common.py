"""The quality benchmarks' simulated outer step with averaging.fragments (SimulatedSwarm's
`fragments`): N = 1 through the fragment code path is bit-identical to the whole-module
outer step, and N > 1 steps and adopts only the round's fragment; bench_fragments'
--outer-grid takes only a well-formed outer setting."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_fragments import outer_setting  # noqa: E402
from quality_common import SimulatedSwarm, make_session  # noqa: E402

from p2ptrain.train.outer import fragment_bounds  # noqa: E402

TOKENS = [100, 300, 200, 400]  # unequal weights: the token-weighted mean matters


def trained_swarm(state, docs, fragments=None, **options) -> SimulatedSwarm:
    """One worker per path of the 2x2 grid (the stem held by 4, each level module by 2),
    each after 3 inner steps; the same seeds give the same weights every call."""
    torch.manual_seed(0)
    swarm = SimulatedSwarm([make_session(state, path, docs, data_seed=i)
                            for i, path in enumerate(state.grid.paths())], fragments=fragments, **options)
    for session in swarm.sessions:
        session.inner_steps(3, log_every=3)
    return swarm


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def local_flat(session, module_id: str) -> torch.Tensor:
    return flat(session.local_state(module_id).values()).clone()


def test_one_fragment_equals_the_whole_module_outer_step_bit_for_bit(tiny_run_state, stdlib_docs):
    # Prepare
    old, new = trained_swarm(tiny_run_state, stdlib_docs), trained_swarm(tiny_run_state, stdlib_docs, fragments=1)
    for a, b in zip(old.sessions, new.sessions):
        assert all(torch.equal(local_flat(a, m), local_flat(b, m)) for m in a.module_ids)

    # Execute: two rounds, so the second one steps with momentum
    for swarm in (old, new):
        swarm.outer_step(TOKENS)
        for session in swarm.sessions:
            session.inner_steps(2, log_every=2)
        swarm.outer_step(TOKENS)

    # Assert
    assert old.globals.keys() == new.globals.keys()
    for module_id in old.globals:
        assert torch.equal(flat(old.globals[module_id].global_params), flat(new.globals[module_id].global_params))
        assert torch.equal(flat(old.globals[module_id].momentum), flat(new.globals[module_id].momentum))
    for a, b in zip(old.sessions, new.sessions):
        assert all(torch.equal(local_flat(a, m), local_flat(b, m)) for m in a.module_ids)


def test_two_fragments_step_and_adopt_only_the_rounds_fragment(tiny_run_state, stdlib_docs):
    # Prepare
    swarm = trained_swarm(tiny_run_state, stdlib_docs, fragments=2)
    before_global = {m: flat(s.global_params).clone() for m, s in swarm.globals.items()}
    before_local = {(i, m): local_flat(s, m) for i, s in enumerate(swarm.sessions) for m in s.module_ids}

    # Execute
    swarm.outer_step(TOKENS)

    # Assert: round 0 is fragment 0; outside it, globals and every worker's weights are as before
    for module_id, state in swarm.globals.items():
        numel = before_global[module_id].numel()
        start, end = fragment_bounds(numel, 2, 0)
        assert (start, end) == (0, (numel + 1) // 2)
        after = flat(state.global_params)
        assert not torch.equal(after[start:end], before_global[module_id][start:end])
        assert torch.equal(after[end:], before_global[module_id][end:])
        assert torch.equal(flat(state.momentum)[end:], torch.zeros(numel - end))
        for i, session in enumerate(swarm.sessions):
            if module_id in session.module_ids:
                local = local_flat(session, module_id)
                assert torch.equal(local[start:end], after[start:end])
                assert torch.equal(local[end:], before_local[(i, module_id)][end:])


def test_an_encode_hook_changes_what_each_worker_contributes_and_nothing_else(tiny_run_state, stdlib_docs):
    # Prepare: the same trained workers, averaged exactly and through a codec that halves every value
    exact = trained_swarm(tiny_run_state, stdlib_docs, fragments=1)
    seen = []

    def halve(session, module_id, delta):
        seen.append((id(session), module_id, delta.numel()))
        return delta * 0.5

    halved = trained_swarm(tiny_run_state, stdlib_docs, fragments=1)
    halved.encode = halve
    start = {m: flat(s.global_params).clone() for m, s in exact.globals.items()}

    # Execute
    exact.outer_step(TOKENS)
    halved.outer_step(TOKENS)

    # Assert: every holder's flat pseudo-gradient of every module went through the hook once,
    # and the first outer step (momentum from zero) moved each module exactly half as far
    assert sorted(seen) == sorted((id(s), m, start[m].numel()) for s in halved.sessions for m in s.module_ids)
    for module_id in exact.globals:
        moved_exact = flat(exact.globals[module_id].global_params) - start[module_id]
        moved_halved = flat(halved.globals[module_id].global_params) - start[module_id]
        assert torch.allclose(moved_halved, moved_exact * 0.5, atol=1e-7)


def test_a_closing_average_sets_every_module_to_the_token_weighted_mean_of_its_workers_weights(tiny_run_state,
                                                                                                stdlib_docs):
    # Prepare: a round of 2 fragments (slice 0 stepped), then 3 more inner steps
    swarm = trained_swarm(tiny_run_state, stdlib_docs, fragments=2, final_average=True)
    swarm.outer_step(TOKENS)
    for session in swarm.sessions:
        session.inner_steps(3, log_every=3)
    weight = {id(s): float(t) for s, t in zip(swarm.sessions, TOKENS)}
    expected = {}
    for module_id in swarm.globals:
        holders = swarm.holders(module_id)
        total = sum(weight[id(h)] for h in holders)
        expected[module_id] = sum(local_flat(h, module_id) * (weight[id(h)] / total) for h in holders)
    momentum = {m: flat(s.momentum).clone() for m, s in swarm.globals.items()}

    # Execute
    swarm.finish()

    # Assert: both slices at the mean at once, no outer step (momentum untouched), and every
    # worker continues from it
    for module_id, state in swarm.globals.items():
        assert torch.allclose(flat(state.global_params), expected[module_id], atol=1e-6)
        assert torch.equal(flat(state.momentum), momentum[module_id])
        for session in swarm.holders(module_id):
            assert torch.equal(local_flat(session, module_id), flat(state.global_params))


def test_with_overlap_the_closing_average_lands_the_slice_in_flight_and_leaves_every_worker_on_the_globals(
        tiny_run_state, stdlib_docs):
    swarm = trained_swarm(tiny_run_state, stdlib_docs, fragments=2, overlap=True, final_average=True)
    swarm.outer_step(TOKENS)  # slice 0 goes out; it lands at finish()
    swarm.finish()
    assert swarm._in_flight is None
    for module_id, state in swarm.globals.items():
        for session in swarm.holders(module_id):
            assert torch.equal(local_flat(session, module_id), flat(state.global_params))


def test_an_outer_grid_setting_is_lr_comma_momentum_and_anything_else_is_refused():
    assert outer_setting("0.7,0.9") == (0.7, 0.9)
    assert outer_setting("1,0") == (1.0, 0.0)
    for bad in ("0.7", "0.7,0.9,1", "lr,0.9", "0,0.9", "-1,0.9", "0.7,1", "0.7,-0.1", "nan,0.9"):
        with pytest.raises(argparse.ArgumentTypeError):
            outer_setting(bad)
