"""What `p2ptrain info` reports: the grid, parameters per module and path, and the
memory a path needs to train (8-bit vs 32-bit optimizer state)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from p2ptrain.data.tokenizer import load_tokenizer
from p2ptrain.model.grid import path_name
from p2ptrain.model.transformer import PathModel
from p2ptrain.config import RunConfig
from p2ptrain.model.grid import Grid
from p2ptrain.train.inner import estimate_state_bytes

GIB = 1024 ** 3


@dataclass
class ModuleInfo:
    module: str
    params: int
    shared_by_paths: int


@dataclass
class MemoryModel:
    """Training memory of one path on its device, in bytes (an estimate, bf16 autocast)."""

    weights: int
    grads: int
    optimizer_8bit: int
    optimizer_32bit: int
    activations: int

    @property
    def total_8bit(self) -> int:
        return self.weights + self.grads + self.optimizer_8bit + self.activations

    @property
    def total_32bit(self) -> int:
        return self.weights + self.grads + self.optimizer_32bit + self.activations


def run_info(config: RunConfig) -> dict:
    grid = Grid.from_config(config.grid)
    vocab = load_tokenizer(config.data.tokenizer).vocab_size
    path0 = grid.paths()[0]
    with torch.device("meta"):  # shapes only: no memory, no init cost even for large presets
        model = PathModel(config.model, grid, config.grid.blocks_per_level, path0, vocab, initialize=False)
    modules = []
    for module_id in grid.all_modules():
        part = model.parts().get(module_id) or _part_for(model, grid, module_id)
        modules.append(ModuleInfo(module_id, sum(p.numel() for p in part.parameters()),
                                  len(grid.paths_containing(module_id))))
    shapes = [tuple(p.shape) for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    m = config.model
    layers = config.grid.blocks_per_level * len(grid.levels)
    tokens = config.inner.batch_size * m.context
    # bf16 activations kept for backward: ~34·d bytes per token per block (Korthikanti et al.)
    # with fused attention, plus fp32 logits and their gradient
    activations = tokens * layers * 34 * m.d_model + tokens * vocab * 4 * 2
    memory = MemoryModel(weights=4 * n, grads=4 * n, optimizer_8bit=estimate_state_bytes(shapes, "adamw8bit"),
                         optimizer_32bit=estimate_state_bytes(shapes, "adamw"), activations=activations)
    return {
        "run_id": config.run.id,
        "grid": list(grid.levels),
        "paths": [path_name(p) for p in grid.paths()],
        "modules": [asdict(mod) for mod in modules],
        "params_per_path": n,
        "params_total": sum(mod.params for mod in modules),
        "optimizer_bytes_per_param": {"adamw8bit": memory.optimizer_8bit / n, "adamw": memory.optimizer_32bit / n},
        "memory_per_path_bytes": {**asdict(memory), "total_8bit": memory.total_8bit,
                                  "total_32bit": memory.total_32bit},
        "inner_steps_per_round": config.inner.steps_per_round,
        "tokens_per_round": config.inner.steps_per_round * tokens,
    }


def _part_for(model: PathModel, grid: Grid, module_id: str):
    """Modules not on path 0 have the same shapes as their level's module on path 0."""
    if module_id.startswith("stem"):
        return model.stem
    level = int(module_id.split(".")[0][1:])
    return model.levels[level]
