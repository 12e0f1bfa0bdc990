"""A small pre-norm decoder-only transformer assembled from grid modules.

`PathModel` = stem (token embedding, final norm, head) + one `LevelModule` per level.
Each module is initialised from a seed derived from the run seed and the module id, so
every peer that holds `L0.M1` starts from the very same weights without talking to anyone.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from p2ptrain.config import ModelConfig
from p2ptrain.model.grid import Grid, PathIndex


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, heads, time, head_dim)
        t = torch.arange(x.shape[-2], device=x.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.fc_out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.n_heads)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc_out(F.gelu(self.fc(self.norm2(x))))
        return x


class LevelModule(nn.Module):
    """One alternative at one level of the grid: a few consecutive blocks."""

    def __init__(self, cfg: ModelConfig, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)


def module_seed(run_seed: int, module_id: str) -> int:
    digest = hashlib.sha256(f"{run_seed}/{module_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _init_module(module: nn.Module, seed: int, n_layers_total: int) -> None:
    """GPT-2 style init, drawn from a private generator so it never depends on call order."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() == 1:  # LayerNorm gains and biases (linears carry no bias)
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                std = 0.02
                if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                    std = 0.02 / math.sqrt(2 * n_layers_total)
                p.copy_(torch.randn(p.shape, generator=gen) * std)


class PathModel(nn.Module):
    """The network of one path: stem → level modules → head."""

    def __init__(self, cfg: ModelConfig, grid: Grid, blocks_per_level: int, path: PathIndex,
                 vocab_size: int, run_seed: int = 0, initialize: bool = True):
        super().__init__()
        grid.check_path(path)
        self.path = tuple(path)
        self.module_ids = grid.modules_of(path)
        self.stem = Stem(cfg, vocab_size)
        self.levels = nn.ModuleList(LevelModule(cfg, blocks_per_level) for _ in path)
        n_layers = blocks_per_level * len(path)
        for module_id, module in (self.parts().items() if initialize else ()):
            _init_module(module, module_seed(run_seed, module_id), n_layers)

    def parts(self) -> dict[str, nn.Module]:
        """Module id → the nn.Module holding its parameters, in forward order."""
        return dict(zip(self.module_ids, [self.stem, *self.levels]))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.stem.embed(idx)
        for level in self.levels:
            x = level(x)
        logits = self.stem.logits(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ------------------------------------------------------- split / assemble

    def module_state(self, module_id: str) -> dict[str, torch.Tensor]:
        """A module's parameters by name (detached CPU copies, in a fixed order)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.parts()[module_id].named_parameters()}

    def load_module_state(self, module_id: str, state: dict[str, torch.Tensor]) -> None:
        module = self.parts()[module_id]
        expected = module_schema(module)
        names = [name for name, _, _ in expected]
        # files return tensors sorted by name: compare in the module's own order
        got = state_schema({n: state[n] for n in names}) if set(state) == set(names) else state_schema(state)
        if expected != got:
            raise ValueError(f"module {module_id}: schema mismatch (expected {schema_hash(expected)[:12]}, "
                             f"got {schema_hash(got)[:12]})")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(state[name])

    def module_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {module_id: self.module_state(module_id) for module_id in self.module_ids}

    def load_module_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for module_id, state in states.items():
            self.load_module_state(module_id, state)


Schema = list[tuple[str, tuple[int, ...], str]]


def module_schema(module: nn.Module) -> Schema:
    return [(name, tuple(p.shape), str(p.dtype).replace("torch.", "")) for name, p in module.named_parameters()]


def state_schema(state: dict[str, torch.Tensor]) -> Schema:
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in state.items()]


def schema_hash(schema: Schema) -> str:
    return hashlib.sha256(json.dumps([list(map(str, s)) for s in schema]).encode()).hexdigest()


def count_params(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)
