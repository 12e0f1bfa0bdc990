"""Inner optimisation: AdamW8bit really learns, keeps 8-bit state for large tensors, and
the memory model matches what bitsandbytes allocates."""

import math
import statistics

import pytest
import torch

from p2ptrain.config import InnerConfig, RunConfig
from p2ptrain.data.batches import TokenStream
from p2ptrain.data.tokenizer import ByteTokenizer
from p2ptrain.train.inner import (InnerTrainer, estimate_state_bytes, lr_at, make_inner_optimizer,
                                  optimizer_state_bytes)
from p2ptrain.train.session import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_thirty_steps_on_real_text_lower_the_loss(tiny_run_state, stdlib_docs, optimizer):
    # Prepare
    inner = InnerConfig(optimizer=optimizer, lr=1e-2, warmup_steps=5, batch_size=8, steps_per_round=30,
                        total_rounds=1)
    model = build_model(tiny_run_state, (0, 0))
    trainer = InnerTrainer(model, inner, CPU)
    stream = TokenStream(stdlib_docs, ByteTokenizer())
    generator = torch.Generator().manual_seed(0)

    # Execute
    losses = [trainer.step(*stream.sample(8, 32, generator)).item() for _ in range(30)]

    # Assert: starts near the uniform byte loss ln(257) = 5.55, ends more than a nat lower
    assert losses[0] == pytest.approx(math.log(257), abs=0.3)
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5]) - 1.0
    assert trainer.step_count == 30


def test_adamw8bit_keeps_uint8_moments_for_tensors_of_4096_elements_or_more(tiny_run_state, stdlib_docs):
    # Prepare
    model = build_model(tiny_run_state, (0, 0))
    trainer = InnerTrainer(model, tiny_run_state.config.inner, CPU)
    stream = TokenStream(stdlib_docs[:20], ByteTokenizer())

    # Execute
    trainer.step(*stream.sample(2, 32, torch.Generator().manual_seed(0)))

    # Assert: embedding 257x32 = 8224 and MLP 32x128 = 4096 are 8-bit; qkv 96x32 = 3072 is not
    dtypes = {name: (trainer.optimizer.state[p]["state1"].dtype, trainer.optimizer.state[p]["state2"].dtype)
              for name, p in model.named_parameters()}
    assert dtypes["stem.embed.weight"] == (torch.uint8, torch.uint8)
    assert dtypes["levels.0.blocks.0.fc.weight"] == (torch.uint8, torch.uint8)
    assert dtypes["levels.0.blocks.0.fc_out.weight"] == (torch.uint8, torch.uint8)
    assert dtypes["levels.0.blocks.0.qkv.weight"] == (torch.float32, torch.float32)
    assert dtypes["levels.0.blocks.0.proj.weight"] == (torch.float32, torch.float32)
    assert dtypes["stem.norm.weight"] == (torch.float32, torch.float32)
    for name, p in model.named_parameters():
        expected = torch.uint8 if p.numel() >= 4096 else torch.float32
        assert dtypes[name] == (expected, expected), name


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_estimated_state_bytes_match_a_real_optimizer_after_one_step(tiny_run_state, stdlib_docs, optimizer):
    # Prepare
    model = build_model(tiny_run_state, (0, 0))
    trainer = InnerTrainer(model, InnerConfig(optimizer=optimizer), CPU)
    stream = TokenStream(stdlib_docs[:20], ByteTokenizer())
    shapes = [tuple(p.shape) for p in model.parameters()]

    # Execute
    trainer.step(*stream.sample(2, 32, torch.Generator().manual_seed(0)))
    measured = optimizer_state_bytes(trainer.optimizer)

    # Assert
    assert measured == pytest.approx(estimate_state_bytes(shapes, optimizer), rel=0.01)


def test_estimate_state_bytes_formula():
    # Execute / Assert
    # 32-bit AdamW: two fp32 moments
    assert estimate_state_bytes([(63, 64)], "adamw") == 8 * 4032
    # 8-bit, under 4096 elements: still two fp32 moments
    assert estimate_state_bytes([(63, 64)], "adamw8bit") == 8 * 4032
    # 8-bit, 4096 elements: two uint8 moments, 16 blocks x 2 fp32 absmax, two 256-entry fp32 qmaps
    assert estimate_state_bytes([(64, 64)], "adamw8bit") == 2 * 4096 + 2 * 4 * 16 + 2 * 256 * 4
    # a partial block counts as a block
    assert estimate_state_bytes([(4097,)], "adamw8bit") == 2 * 4097 + 2 * 4 * 17 + 2 * 256 * 4


def test_8bit_state_is_about_a_quarter_of_32bit_for_a_large_model():
    # Prepare
    shapes = [(50_000, 1024), (1024, 4096), (4096, 1024), (1024,)]

    # Execute
    ratio = estimate_state_bytes(shapes, "adamw8bit") / estimate_state_bytes(shapes, "adamw")

    # Assert: 2.03 B/param instead of 8
    assert ratio == pytest.approx(2.03 / 8, abs=0.002)


def test_weight_decay_applies_to_matrices_only():
    # Prepare
    params = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8))]

    # Execute
    optimizer = make_inner_optimizer(params, InnerConfig(optimizer="adamw", weight_decay=0.25))

    # Assert
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.25, 0.0]
    assert optimizer.param_groups[0]["params"][0] is params[0]
    assert optimizer.param_groups[1]["params"][0] is params[1]


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    # Prepare: 1000 steps in all, 100 of warm-up, floor at 10 % of 1e-3
    cfg = InnerConfig(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, steps_per_round=100, total_rounds=10)

    # Execute / Assert
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(49, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(550, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through the cosine
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)


def test_lr_schedule_without_warmup_starts_at_the_peak():
    # Prepare
    cfg = InnerConfig(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0, steps_per_round=10, total_rounds=2)

    # Execute / Assert
    assert lr_at(0, cfg) == pytest.approx(2e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(20, cfg) == pytest.approx(0.0)


def test_trainer_sets_the_scheduled_lr_on_every_group(tiny_run_state, stdlib_docs):
    # Prepare
    config = RunConfig.from_dict({**tiny_run_state.config.to_dict(),
                                  "inner": {"optimizer": "adamw", "lr": 1e-2, "warmup_steps": 4}})
    model = build_model(tiny_run_state, (0, 0))
    trainer = InnerTrainer(model, config.inner, CPU)
    stream = TokenStream(stdlib_docs[:20], ByteTokenizer())
    generator = torch.Generator().manual_seed(0)

    # Execute
    trainer.step(*stream.sample(2, 32, generator))
    trainer.step(*stream.sample(2, 32, generator))

    # Assert: the second step (step index 1) ran at 2/4 of the peak
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(5e-3)] * 2


class _Regression(torch.nn.Module):
    """The smallest model with the (x, y) -> (output, loss) shape InnerTrainer calls."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        out = self.linear(x).squeeze(-1)
        return out, torch.nn.functional.mse_loss(out, y)


def test_time_based_rounds_follow_the_swarms_schedule_not_the_peers_step_count():
    """A fast peer that takes 3 × H steps in a round keeps the lr of the round it is in."""
    cfg = InnerConfig(optimizer="adamw", lr=1e-3, warmup_steps=10, steps_per_round=100, total_rounds=10,
                      min_lr_ratio=0.1)
    trainer = InnerTrainer(_Regression(), cfg, torch.device("cpu"))
    x, y = torch.randn(8, 4), torch.randn(8)
    for _ in range(20):  # past warm-up, before any round
        trainer.step(x, y)
    trainer.enter_round(6)  # nominal steps 500..600 of 1,000
    trainer.step(x, y)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(500, cfg))
    for _ in range(300):
        trainer.step(x, y)
    assert trainer.schedule_position == 600  # capped at the round's nominal end, not 801
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(600, cfg))
    trainer.enter_round(7)
    trainer.step(x, y)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(600, cfg))
    # warm-up still counts this trainer's own steps: a late joiner ramps up first
    assert lr_at(0, cfg, 500) == pytest.approx(1e-4)


@pytest.mark.parametrize("accumulation", [2, 3])
def test_accumulated_micro_batch_gradients_equal_the_whole_batch_gradient(tiny_run_state, stdlib_docs, accumulation):
    # Prepare: two identical models (same seed), one batch of 6 sequences
    inner = tiny_run_state.config.inner
    whole = InnerTrainer(build_model(tiny_run_state, (0, 0)), inner, CPU)
    accumulated = InnerTrainer(build_model(tiny_run_state, (0, 0)), inner, CPU, accumulation=accumulation)
    x, y = TokenStream(stdlib_docs[:20], ByteTokenizer()).sample(6, 32, torch.Generator().manual_seed(0))

    # Execute
    loss_whole = whole.backward(x, y)
    loss_accumulated = accumulated.backward(x, y)

    # Assert: the same mean loss and, tensor by tensor, the same gradient (to float rounding)
    assert loss_accumulated.item() == pytest.approx(loss_whole.item(), rel=1e-6)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), accumulated.model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_below_one_is_rejected(tiny_run_state):
    with pytest.raises(ValueError, match="accumulation"):
        InnerTrainer(build_model(tiny_run_state, (0, 0)), tiny_run_state.config.inner, CPU, accumulation=0)


def test_importing_bitsandbytes_defers_its_torch_compile_calls_to_first_use():
    # Execute: a fresh interpreter, as `p2ptrain join` starts; then a function compiled under
    # the same deferral is called (the eager backend: Dynamo traces it, no C++ compiler runs)
    import subprocess
    import sys
    script = (
        "import sys, torch\n"
        "from p2ptrain.train.inner import _compile_on_first_call, import_bitsandbytes\n"
        "real = torch.compile\n"
        "bnb = import_bitsandbytes()\n"
        "print('dynamo after import:', 'torch._dynamo' in sys.modules)\n"
        "print('torch.compile restored:', torch.compile is real)\n"
        "with _compile_on_first_call():\n"
        "    double_plus_one = torch.compile(lambda x: 2 * x + 1, backend='eager')\n"
        "print('dynamo before the first call:', 'torch._dynamo' in sys.modules)\n"
        "print('first call:', double_plus_one(torch.ones(3)).tolist())\n"
        "print('dynamo after it:', 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    # Assert: the import left TorchDynamo unloaded and torch.compile as it was; a deferred
    # function is compiled by its first call and computes what it says
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dynamo after import: False" in done.stdout
    assert "torch.compile restored: True" in done.stdout
    assert "dynamo before the first call: False" in done.stdout
    assert "first call: [3.0, 3.0, 3.0]" in done.stdout
    assert "dynamo after it: True" in done.stdout



@pytest.mark.parametrize("offered", [1, 0])
def test_the_inner_loop_ends_with_a_shorter_step_only_when_offered_one(tiny_run_state, stdlib_docs, tmp_path, offered):
    from p2ptrain.train.session import PathSession

    session = PathSession(tiny_run_state, (0, 0), stdlib_docs, torch.device("cpu"), tmp_path)
    batch, context = session.cfg.inner.batch_size, session.cfg.model.context
    assert batch > 1
    checks = []

    def deadline_after_two_steps() -> bool:
        checks.append(None)
        return len(checks) > 2

    tokens, loss = session.inner_steps(10, should_stop=deadline_after_two_steps, last_step_rows=lambda b: offered)
    rows = [batch, batch] + ([offered] if offered else [])
    assert tokens == sum(rows) * context
    assert session.inner.step_count == len(rows)
    assert len(checks) == 3  # the loop ended after the shorter step without asking again
    assert math.isfinite(loss)
