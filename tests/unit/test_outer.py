"""The DiLoCo outer step: Nesterov SGD on the pseudo-gradient, exactly as torch's SGD."""

import pytest
import torch

from p2ptrain.config import OuterConfig
from p2ptrain.train.outer import ModuleOuterState, fragment_bounds


def make_state(cfg: OuterConfig) -> ModuleOuterState:
    params = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([0.5, -0.5])}
    return ModuleOuterState("L0.M0", params, cfg)


def deltas(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(2, 3, generator=gen), torch.randn(2, generator=gen)] for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_equals_torch_sgd_over_several_rounds(nesterov):
    # Prepare
    state = make_state(OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov))
    reference = [p.clone().requires_grad_(True) for p in state.global_params]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=nesterov)

    # Execute
    for delta in deltas(5):
        state.apply(delta)
        for p, d in zip(reference, delta):
            p.grad = d.clone()
        sgd.step()

    # Assert
    for ours, theirs in zip(state.global_params, reference):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6)
    for ours, p in zip(state.momentum, reference):
        torch.testing.assert_close(ours, sgd.state[p]["momentum_buffer"], rtol=0, atol=1e-6)


def test_two_outer_steps_in_closed_form():
    # Prepare: a single scalar, pseudo-gradients 1 then 2
    state = ModuleOuterState("stem", {"x": torch.tensor([10.0])}, OuterConfig(lr=0.7, momentum=0.9))

    # Execute
    state.apply([torch.tensor([1.0])])
    after_one = state.global_params[0].item()
    state.apply([torch.tensor([2.0])])
    after_two = state.global_params[0].item()

    # Assert: m1 = 1, x1 = 10 - 0.7(1 + 0.9) ; m2 = 0.9 + 2 = 2.9, x2 = x1 - 0.7(2 + 0.9 * 2.9)
    assert after_one == pytest.approx(10 - 0.7 * 1.9)
    assert after_two == pytest.approx(10 - 0.7 * 1.9 - 0.7 * (2 + 0.9 * 2.9))
    assert state.momentum[0].item() == pytest.approx(2.9)


def test_plain_sgd_with_lr_one_and_no_momentum_adopts_the_averaged_local_weights():
    # Prepare
    state = make_state(OuterConfig(lr=1.0, momentum=0.0))
    local = {"w": torch.full((2, 3), 3.0), "b": torch.tensor([1.0, 2.0])}
    delta = [torch.empty(2, 3), torch.empty(2)]

    # Execute
    state.pseudo_gradient_into(local, delta)
    state.apply(delta)

    # Assert
    assert torch.equal(state.global_state()["w"], local["w"])
    assert torch.equal(state.global_state()["b"], local["b"])


def test_pseudo_gradient_is_global_minus_local():
    # Prepare
    state = make_state(OuterConfig())
    local = {"w": torch.ones(2, 3), "b": torch.tensor([0.0, 0.0])}
    out = [torch.empty(2, 3), torch.empty(2)]

    # Execute
    state.pseudo_gradient_into(local, out)

    # Assert
    assert torch.equal(out[0], torch.arange(6, dtype=torch.float32).reshape(2, 3) - 1)
    assert torch.equal(out[1], torch.tensor([0.5, -0.5]))


def test_scale_divides_the_pseudo_gradient_before_the_step():
    # Prepare
    scaled = make_state(OuterConfig())
    halved = make_state(OuterConfig())
    delta = deltas(1)[0]

    # Execute
    scaled.apply(delta, scale=0.5)
    halved.apply([d * 0.5 for d in delta])

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(scaled.global_params, halved.global_params))


def test_global_copy_is_independent_of_the_tensors_it_was_made_from():
    # Prepare
    source = {"w": torch.zeros(3)}
    state = ModuleOuterState("stem", source, OuterConfig())

    # Execute
    source["w"].add_(1.0)

    # Assert
    assert torch.equal(state.global_state()["w"], torch.zeros(3))


def test_state_dict_round_trip_restores_params_and_momentum():
    # Prepare
    state = make_state(OuterConfig())
    for delta in deltas(2):
        state.apply(delta)
    fresh = make_state(OuterConfig())

    # Execute
    fresh.load_state_dict({k: v.clone() for k, v in state.state_dict().items()})

    # Assert
    assert sorted(state.state_dict()) == ["global.b", "global.w", "momentum.b", "momentum.w"]
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.state_dict().items())


# --- fragments (averaging.fragments): Streaming DiLoCo's slices of a module, in turn ----

def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("numel, fragments", [(8, 1), (8, 4), (8, 3), (10, 4), (3, 4)])
def test_fragments_in_turn_cover_every_value_exactly_once(numel, fragments):
    # Execute
    bounds = [fragment_bounds(numel, fragments, round_) for round_ in range(7, 7 + fragments)]

    # Assert
    covered = sorted(i for start, end in bounds for i in range(start, end))
    assert covered == list(range(numel))
    assert fragment_bounds(numel, fragments, 7) == fragment_bounds(numel, fragments, 7 + fragments)


def test_stepping_every_fragment_in_turn_equals_one_whole_step():
    # Prepare: Nesterov momentum is elementwise, so slices stepped one by one with the same
    # averaged pseudo-gradient land exactly where one step of the whole module does
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
    whole, sliced = make_state(cfg), make_state(cfg)
    delta = deltas(1)[0]

    # Execute
    whole.apply(delta)
    for round_ in range(3):
        start, end = fragment_bounds(8, 3, round_)
        sliced.apply_fragment(flat(delta)[start:end], start)

    # Assert
    torch.testing.assert_close(flat(sliced.global_params), flat(whole.global_params), rtol=0, atol=1e-7)
    torch.testing.assert_close(flat(sliced.momentum), flat(whole.momentum), rtol=0, atol=1e-7)


def test_a_fragment_step_leaves_the_other_values_and_their_momentum_alone():
    # Prepare: the fragment [4, 7) spans the end of "w" (6 values) and the start of "b"
    state = make_state(OuterConfig(lr=0.7, momentum=0.9))
    before = flat(state.global_params).clone()

    # Execute
    state.apply_fragment(torch.ones(3), 4)

    # Assert
    after, momentum = flat(state.global_params), flat(state.momentum)
    outside = [0, 1, 2, 3, 7]
    torch.testing.assert_close(after[outside], before[outside], rtol=0, atol=0)
    assert torch.all(momentum[outside] == 0)
    torch.testing.assert_close(momentum[4:7], torch.ones(3))
    torch.testing.assert_close(after[4:7], before[4:7] - 0.7 * (1 + 0.9 * 1))


def test_a_flat_pseudo_gradient_is_the_parameters_laid_end_to_end():
    # Prepare
    state = make_state(OuterConfig())
    local = {"w": torch.zeros(2, 3), "b": torch.ones(2)}

    # Execute
    delta = state.pseudo_gradient_flat(local)

    # Assert
    torch.testing.assert_close(delta, torch.tensor([0.0, 1, 2, 3, 4, 5, -0.5, -1.5]))
