"""Freeing the training device while suspended (leave_apps_in_memory = false): the path's
model and inner optimizer state leave the device and come back bit for bit, and training
goes on exactly as if nothing had happened.

This machine has no GPU, so the round trip runs CPU → CPU: `offload` copies into new
storage even then, which is what shows that no reference to the old storage survives
(on a GPU, such a reference would keep the memory allocated)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from p2ptrain.data.batches import TokenStream
from p2ptrain.data.tokenizer import ByteTokenizer
from p2ptrain.train.inner import InnerTrainer
from p2ptrain.train.offload import frees_memory, off_device, offload, restore
from p2ptrain.train.session import build_model

CPU = torch.device("cpu")


def held(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor the path holds (parameters, buffers, optimizer state), as aliases of their
    current storage: keeping the list keeps that storage allocated."""
    tensors = [t.detach() for t in [*model.parameters(), *model.buffers()]]
    return tensors + [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    return {t.data_ptr() for t in held(model, optimizer)}


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"state {names[id(p)]} {key}"] = value.clone()
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def trainer_and_batches(run_state, docs, optimizer: str, steps: int):
    inner = dataclasses.replace(run_state.config.inner, optimizer=optimizer)
    torch.manual_seed(0)
    trainer = InnerTrainer(build_model(run_state, (0, 0)), inner, CPU)
    stream = TokenStream(docs[:40], ByteTokenizer())
    generator = torch.Generator().manual_seed(1)
    return trainer, [stream.sample(2, 32, generator) for _ in range(steps)]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_a_round_trip_moves_everything_and_training_goes_on_bit_for_bit(tiny_run_state, stdlib_docs, optimizer):
    # Prepare: two identical paths; each takes 3 inner steps
    suspended, reference = (trainer_and_batches(tiny_run_state, stdlib_docs, optimizer, 6) for _ in range(2))
    (a, batches), (b, _) = suspended, reference
    for x, y in batches[:3]:
        a.step(x, y)
        b.step(x, y)
    before = snapshot(a.model, a.optimizer)
    params = list(a.model.parameters())
    old = held(a.model, a.optimizer)  # kept allocated, so no copy can reuse an old address

    # Execute: the first path is suspended (offloaded), then resumed (restored)
    moved = offload(a.model, a.optimizer, CPU)
    offloaded_storage = storages(a.model, a.optimizer)
    restore(moved)

    # Assert: while offloaded, not one tensor was left in the old storage
    assert not offloaded_storage & {t.data_ptr() for t in old}
    assert moved.bytes > sum(p.numel() * p.element_size() for p in params)  # model and optimizer state
    # Assert: back bit for bit, the same parameter objects (the optimizer's keys)
    assert_bit_identical(before, snapshot(a.model, a.optimizer))
    assert list(a.model.parameters()) == params and all(p in a.optimizer.state for p in params)
    # Assert: three more steps land exactly where the path that was never suspended is
    for x, y in batches[3:]:
        assert torch.equal(a.step(x, y), b.step(x, y))
    assert_bit_identical(snapshot(a.model, a.optimizer), snapshot(b.model, b.optimizer))


def test_bitsandbytes_quantisation_maps_stay_shared_after_a_round_trip(tiny_run_state, stdlib_docs):
    # Prepare: AdamW8bit after one step: every 8-bit state points at the optimizer's shared qmaps
    trainer, batches = trainer_and_batches(tiny_run_state, stdlib_docs, "adamw8bit", 1)
    trainer.step(*batches[0])
    opt = trainer.optimizer
    eight_bit = [s for s in opt.state.values() if s["state1"].dtype == torch.uint8]
    assert len(eight_bit) >= 2 and all(s["qmap1"] is opt.name2qmap["dynamic"] for s in eight_bit)

    # Execute
    moved = offload(trainer.model, opt, CPU)
    shared_while_offloaded = all(s["qmap1"] is opt.name2qmap["dynamic"] for s in eight_bit)
    restore(moved)

    # Assert: one copy each way, still shared by every state
    assert shared_while_offloaded
    assert all(s["qmap1"] is opt.name2qmap["dynamic"] and s["qmap2"] is opt.name2qmap["udynamic"]
               for s in eight_bit)


def test_on_a_cpu_device_suspension_moves_nothing(tiny_run_state, stdlib_docs):
    # Prepare
    trainer, batches = trainer_and_batches(tiny_run_state, stdlib_docs, "adamw", 1)
    trainer.step(*batches[0])
    old_storage = storages(trainer.model, trainer.optimizer)

    # Execute / Assert: nothing to free on a CPU, nor when the preference keeps the model in memory
    assert not frees_memory(CPU) and frees_memory(torch.device("cuda", 0))
    with off_device(trainer.model, trainer.optimizer, CPU, leave_in_memory=False) as moved:
        assert moved is None and storages(trainer.model, trainer.optimizer) == old_storage
    with off_device(trainer.model, trainer.optimizer, torch.device("cuda", 0), leave_in_memory=True) as moved:
        assert moved is None and storages(trainer.model, trainer.optimizer) == old_storage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_suspension_frees_its_memory_and_resume_brings_the_path_back(tiny_run_state, stdlib_docs):
    # Prepare: the path on the GPU after two steps
    inner = tiny_run_state.config.inner
    gpu = torch.device("cuda", 0)
    trainer = InnerTrainer(build_model(tiny_run_state, (0, 0)).to(gpu), inner, gpu)
    stream = TokenStream(stdlib_docs[:40], ByteTokenizer())
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        trainer.step(*stream.sample(2, 32, generator))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(gpu)
    before = snapshot(trainer.model, trainer.optimizer)

    # Execute
    with off_device(trainer.model, trainer.optimizer, gpu, leave_in_memory=False) as moved:
        during = torch.cuda.memory_allocated(gpu)
        devices = {t.device.type for t in held(trainer.model, trainer.optimizer)}

    # Assert: the path's memory left the GPU while suspended; all of it is back after
    assert held - during >= moved.bytes and devices == {"cpu"}
    assert {p.device for p in trainer.model.parameters()} == {gpu}
    assert_bit_identical({k: v.cpu() for k, v in before.items()},
                         {k: v.cpu() for k, v in snapshot(trainer.model, trainer.optimizer).items()})
    trainer.step(*stream.sample(2, 32, generator))
