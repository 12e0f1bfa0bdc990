"""Free the accelerator while the node is suspended (BOINC's `leave_apps_in_memory = false`).

What a path holds on its training device: the model's parameters and buffers (and any
gradient), and the inner optimizer's per-parameter state — for bitsandbytes' AdamW8bit
the uint8 moments, their fp32 absmax per block and the shared quantisation maps. The
outer (DiLoCo) state already lives on the CPU (train/outer.py). `offload` moves every one
of those tensors to the CPU into fresh storage, so nothing on the device is referenced
any more and `torch.cuda.empty_cache()` can hand the memory back to the driver;
`restore` moves each tensor back to the device it came from. Parameter objects keep
their identity (only `.data` changes), so the optimizer's state, keyed by parameter,
stays attached, and tensors shared between entries (bitsandbytes' qmaps) stay shared.

Only the round driver's thread may call these, at a safe point (no inner step running).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


def frees_memory(device: torch.device) -> bool:
    """Whether offloading from `device` frees anything: on a CPU, the model already is in RAM."""
    return device.type == "cuda"


@dataclass
class Offloaded:
    """What `offload` moved and where each tensor lived; `restore` puts every one back."""

    # parameters and buffers, with their device and their gradient's (None: no gradient)
    tensors: list[tuple[torch.Tensor, torch.device, torch.device | None]] = field(default_factory=list)
    # optimizer state entries: (the dict holding it, its key, its device)
    entries: list[tuple[dict, object, torch.device]] = field(default_factory=list)
    bytes: int = 0  # moved off their device
    restored: bool = False


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, in new storage even when it is there already."""
    return torch.empty_like(tensor, device=device).copy_(tensor)


def _state_entries(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict, object]]:
    """(dict, key) of every tensor in the optimizer's state, nested dicts included, and in
    bitsandbytes' quantisation maps (shared by the 8-bit states)."""
    stack: list[dict] = [state for state in optimizer.state.values() if isinstance(state, dict)]
    qmaps = getattr(optimizer, "name2qmap", None)
    if isinstance(qmaps, dict):
        stack.append(qmaps)
    while stack:
        d = stack.pop()
        for key, value in d.items():
            if torch.is_tensor(value):
                yield d, key
            elif isinstance(value, dict):
                stack.append(value)


def _move_entries(entries: list[tuple[dict, object, torch.device]], to: torch.device | None) -> int:
    """Replace each optimizer entry by a copy on `to` (None: on the device it names); one
    copy per distinct tensor, so shared ones stay shared. Returns the bytes copied."""
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id → (source kept alive, copy)
    copied = 0
    for d, key, device in entries:
        value = d[key]
        if id(value) not in copies:
            copies[id(value)] = (value, _copy(value, to if to is not None else device))
            copied += value.numel() * value.element_size()
        d[key] = copies[id(value)][1]
    return copied


def offload(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            to: torch.device | str = "cpu") -> Offloaded:
    """Move the model's parameters, buffers and gradients and the optimizer's state to `to`
    (new storage, even from the same device). Returns what `restore` needs."""
    to = torch.device(to)
    moved = Offloaded()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            grad = tensor.grad
            moved.tensors.append((tensor, tensor.device, None if grad is None else grad.device))
            moved.bytes += tensor.numel() * tensor.element_size()
            tensor.grad = None  # a gradient must live where its parameter does
            tensor.data = _copy(tensor.data, to)
            if grad is not None:
                tensor.grad = _copy(grad, to)
        moved.entries = [(d, key, d[key].device) for d, key in _state_entries(optimizer)]
        moved.bytes += _move_entries(moved.entries, to)
    return moved


def restore(moved: Offloaded) -> None:
    """Put every tensor `offload` moved back on the device it came from (once)."""
    if moved.restored:
        return
    with torch.no_grad():
        for tensor, device, grad_device in moved.tensors:
            grad = tensor.grad
            tensor.grad = None
            tensor.data = _copy(tensor.data, device)
            if grad is not None:
                tensor.grad = _copy(grad, grad_device or device)
        _move_entries(moved.entries, None)
    moved.restored = True


@contextlib.contextmanager
def off_device(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               leave_in_memory: bool) -> Iterator[Offloaded | None]:
    """While the block runs (a suspension), the path's tensors are in RAM and the device's
    cached memory is returned — unless `leave_in_memory`, or the device is a CPU (nothing to
    free: then this does nothing). Back on the device when the block ends, however it ends."""
    if leave_in_memory or not frees_memory(device):
        yield None
        return
    moved = offload(model, optimizer, "cpu")
    torch.cuda.empty_cache()
    logger.info("suspended: moved the model and optimizer state (%.0f MB) to RAM and freed the GPU memory",
                moved.bytes / 1e6)
    try:
        yield moved
    finally:
        restore(moved)
        logger.info("resumed: model and optimizer state are back on %s", device)
