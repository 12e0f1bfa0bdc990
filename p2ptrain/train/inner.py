"""Inner optimisation: AdamW8bit steps on one path, with warm-up + cosine and clipping.

bitsandbytes keeps Adam's two moments in 8 bits (blockwise-quantised uint8 plus one fp32
absmax per block) for every tensor of at least `min_8bit_size` elements — 2 B/param
instead of 8 — which is what lets a ~150M-parameter path train on a consumer GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from typing import Callable, Iterator

import torch

from p2ptrain.config import InnerConfig

logger = logging.getLogger(__name__)

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from p2ptrain.errors import UserError
        raise UserError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    return torch.device(device)


def import_bitsandbytes():
    with warnings.catch_warnings(), contextlib.redirect_stdout(None), _compile_on_first_call():
        # bitsandbytes prints a note about the optional `kernels` package on import
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
    return bitsandbytes


@contextlib.contextmanager
def _compile_on_first_call() -> Iterator[None]:
    """While bitsandbytes imports: `torch.compile` wraps a function without compiling it yet.

    bitsandbytes decorates some of its pure-PyTorch fallback kernels with `torch.compile`
    when imported; that call alone imports TorchDynamo and Inductor, about 5 s of CPU in
    every process that builds a node (measured: 4.9-5.5 s on a 2-core machine). Deferred,
    a kernel is compiled when first called, if ever, as bitsandbytes would have compiled
    it then (and falls back to the plain function the same way when compiling fails)."""
    real = torch.compile

    def deferred(fn: Callable | None = None, **options):
        if fn is None:  # used as @torch.compile(**options)
            return lambda f: deferred(f, **options)
        compiled: list[Callable] = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(real(fn, **options))
            return compiled[0](*args, **kwargs)
        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


def make_inner_optimizer(params: list[torch.nn.Parameter], cfg: InnerConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.optimizer == "adamw8bit":
        bnb = import_bitsandbytes()
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas, min_8bit_size=MIN_8BIT_SIZE)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def lr_at(step: int, cfg: InnerConfig, position: int | None = None) -> float:
    """Linear warm-up over this trainer's own first steps, then cosine decay to
    min_lr_ratio × lr over total_rounds × H steps.

    position: where the cosine stands, in nominal steps (the swarm's round × H), when the
    node trains until each round's end: then a fast peer that takes more than H steps a
    round does not run through the schedule sooner than its slower peers (default: step).
    """
    total = max(cfg.total_rounds * cfg.steps_per_round, 1)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    at = step if position is None else max(position, cfg.warmup_steps)
    progress = min((at - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class InnerTrainer:
    """Owns the path model's inner optimizer and performs one step at a time."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, device: torch.device, accumulation: int = 1):
        """accumulation: micro-batches per step. A step's batch is split into this many
        chunks, each forward/backward on its own and their gradients summed, weighted by
        chunk size: the gradient of the whole batch, with the activation memory of one
        chunk. 1 (the default) is one forward/backward over the whole batch."""
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.model = model
        self.cfg = cfg
        self.device = device
        self.accumulation = accumulation
        self.optimizer = make_inner_optimizer(list(model.parameters()), cfg)
        self.step_count = 0
        self.schedule_position: int | None = None  # nominal step for the cosine (see lr_at); None: step_count
        self.schedule_end: int | None = None  # ... which does not pass the end of the round in progress
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())

    def enter_round(self, round_: int) -> None:
        """Time-based rounds: this round's steps follow the cosine from (round − 1) × H, at
        most to round × H, however many steps the round holds."""
        H = self.cfg.steps_per_round
        self.schedule_position, self.schedule_end = (round_ - 1) * H, round_ * H

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (no host sync here)."""
        lr = lr_at(self.step_count, self.cfg, self.schedule_position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.backward(x, y)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.schedule_position is not None:
            self.schedule_position += 1
            if self.schedule_end is not None:
                self.schedule_position = min(self.schedule_position, self.schedule_end)
        return loss.detach()

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate the batch's mean-loss gradient into .grad, in `accumulation`
        micro-batches; returns the batch's mean loss (detached, on the device)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.accumulation == 1:
            with self.autocast:
                _, loss = self.model(x, y)
            loss.backward()
            return loss.detach()
        total = torch.zeros((), device=self.device)
        # every sequence has the same length, so the mean over the batch is the
        # size-weighted mean of the micro-batches' means
        for xm, ym in zip(x.chunk(self.accumulation), y.chunk(self.accumulation)):
            share = xm.size(0) / x.size(0)
            with self.autocast:
                _, loss = self.model(xm, ym)
            (loss * share).backward()
            total += loss.detach().float() * share
        return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def estimate_state_bytes(shapes: list[tuple[int, ...]], optimizer: str, blocksize: int = 256) -> int:
    """Optimizer-state bytes for parameters of these shapes, without allocating anything.

    AdamW: two fp32 moments (8 B/param). AdamW8bit: two uint8 moments plus one fp32
    absmax per block of 256 for each moment (~2.03 B/param); tensors under 4096
    elements stay 32-bit.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw8bit" and n >= MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / blocksize) + 2 * 256 * 4  # states, absmax, qmaps
        else:
            total += 8 * n
    return total
