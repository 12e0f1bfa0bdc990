"""The path model: modules split off and assemble back exactly, and every peer that
builds a module initialises it identically from the run seed alone."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2ptrain.config import ModelConfig
from p2ptrain.model.grid import Grid
from p2ptrain.model.transformer import PathModel, module_schema, schema_hash

VOCAB = 257
CFG = ModelConfig(d_model=32, n_heads=2, context=16)
GRID = Grid((2, 2))


def make_model(path=(0, 0), seed=0, cfg=CFG, blocks=1) -> PathModel:
    return PathModel(cfg, GRID, blocks, path, VOCAB, run_seed=seed)


def test_module_states_cover_every_parameter_exactly_once():
    # Prepare
    model = make_model()

    # Execute
    states = model.module_states()

    # Assert
    assert list(states) == ["stem", "L0.M0", "L1.M0"]
    assert sum(t.numel() for s in states.values() for t in s.values()) == sum(p.numel() for p in model.parameters())
    # stem: embedding 257x32 + final LayerNorm; a level module: one block of 32-wide attention + 4x MLP
    assert sum(t.numel() for t in states["stem"].values()) == 257 * 32 + 2 * 32
    assert sum(t.numel() for t in states["L0.M0"].values()) == 2 * 2 * 32 + 4 * 32 * 32 + 2 * 4 * 32 * 32


def test_split_then_assemble_into_another_model_is_exact():
    # Prepare
    source = make_model(seed=1)
    torch.manual_seed(123)
    with torch.no_grad():  # move away from the init so the test cannot pass by seed coincidence
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    target = make_model(seed=2)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))

    # Execute
    target.load_module_states(source.module_states())

    # Assert
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(source(idx)[0], target(idx)[0])


def test_module_state_is_a_detached_copy():
    # Prepare
    model = make_model()
    state = model.module_state("L0.M0")
    before = {n: t.clone() for n, t in state.items()}

    # Execute
    with torch.no_grad():
        for t in state.values():
            t.add_(1.0)

    # Assert
    assert all(torch.equal(model.module_state("L0.M0")[n], before[n]) for n in before)


def test_module_round_trips_through_safetensors_file_in_sorted_key_order(tmp_path):
    # Prepare
    source = make_model(seed=5)
    target = make_model(seed=6)
    save_file(source.module_state("L1.M0"), str(tmp_path / "m.safetensors"))
    from_file = load_file(str(tmp_path / "m.safetensors"))

    # Execute
    target.load_module_state("L1.M0", from_file)

    # Assert
    assert list(from_file) == sorted(from_file)  # files hand tensors back sorted by name
    assert all(torch.equal(t, source.module_state("L1.M0")[n]) for n, t in target.module_state("L1.M0").items())


def test_loading_a_module_of_another_shape_raises_schema_mismatch():
    # Prepare
    wide = make_model(cfg=ModelConfig(d_model=64, n_heads=2, context=16))
    model = make_model()

    # Execute
    with pytest.raises(ValueError) as excinfo:
        model.load_module_state("L0.M0", wide.module_state("L0.M0"))

    # Assert
    assert "module L0.M0: schema mismatch" in str(excinfo.value)


def test_loading_a_module_with_a_missing_tensor_raises_schema_mismatch():
    # Prepare
    model = make_model()
    state = model.module_state("stem")
    del state["norm.bias"]

    # Execute / Assert
    with pytest.raises(ValueError, match="module stem: schema mismatch"):
        model.load_module_state("stem", state)


def test_paths_sharing_a_module_start_with_identical_weights_for_it():
    # Prepare / Execute
    a = make_model(path=(0, 1), seed=7)
    b = make_model(path=(0, 0), seed=7)
    c = make_model(path=(1, 1), seed=7)

    # Assert
    shared_stem = [torch.equal(x, y) for x, y in zip(a.module_state("stem").values(),
                                                      b.module_state("stem").values())]
    shared_l0 = [torch.equal(x, y) for x, y in zip(a.module_state("L0.M0").values(),
                                                    b.module_state("L0.M0").values())]
    shared_l1 = [torch.equal(x, y) for x, y in zip(a.module_state("L1.M1").values(),
                                                    c.module_state("L1.M1").values())]
    assert all(shared_stem) and all(shared_l0) and all(shared_l1)
    # different modules at the same level do not share weights
    assert not torch.equal(a.module_state("L1.M1")["blocks.0.qkv.weight"],
                           b.module_state("L1.M0")["blocks.0.qkv.weight"])


def test_another_run_seed_gives_other_weights_for_the_same_module():
    # Prepare / Execute
    a = make_model(seed=0)
    b = make_model(seed=1)

    # Assert
    for name, t in a.module_state("L0.M0").items():
        if t.dim() >= 2:  # LayerNorms start at exactly 1 and 0 for every seed
            assert not torch.equal(t, b.module_state("L0.M0")[name]), name
        else:
            assert torch.equal(t, b.module_state("L0.M0")[name]), name


def test_init_does_not_depend_on_the_global_torch_rng():
    # Prepare
    torch.manual_seed(1)
    a = make_model(seed=3)
    torch.manual_seed(2)
    torch.rand(1000)

    # Execute
    b = make_model(seed=3)

    # Assert
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_init_is_gpt2_style_with_scaled_residual_projections():
    # Prepare
    model = PathModel(ModelConfig(d_model=128, n_heads=4, context=16), GRID, 2, (0, 0), VOCAB, run_seed=0)

    # Execute
    state = model.module_state("L0.M0")

    # Assert: std 0.02, and 0.02 / sqrt(2 * 4 layers) on the projections into the residual stream
    assert state["blocks.0.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert state["blocks.0.fc_out.weight"].std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.02)
    assert torch.equal(state["blocks.0.norm1.weight"], torch.ones(128))
    assert torch.equal(state["blocks.0.norm1.bias"], torch.zeros(128))


def test_untrained_model_predicts_nearly_uniform_bytes():
    # Prepare
    model = make_model()
    idx = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))

    # Execute
    logits, loss = model(idx[:, :-1], idx[:, 1:])

    # Assert
    assert logits.shape == (4, 15, VOCAB)
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.05)


def test_schema_hash_depends_on_shapes_not_values():
    # Prepare
    a = make_model(seed=0).parts()["L0.M0"]
    b = make_model(seed=1).parts()["L0.M0"]
    wide = make_model(cfg=ModelConfig(d_model=64, n_heads=2, context=16)).parts()["L0.M0"]

    # Execute
    hashes = [schema_hash(module_schema(m)) for m in (a, b, wide)]

    # Assert
    assert hashes[0] == hashes[1] != hashes[2]
