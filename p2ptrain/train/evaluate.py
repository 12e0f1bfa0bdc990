"""Routed evaluation: each held-out document goes to the path the router picks, and is
scored by that path's model; the mixture loss is the token-weighted mean over paths.

The same documents are scored by the untrained initialisation, so a report always says
how far training moved each path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from p2ptrain.data.corpus import Document, split_heldout
from p2ptrain.data.tokenizer import load_tokenizer
from p2ptrain.home import checkpoint_dir
from p2ptrain.model.grid import PathIndex, path_name
from p2ptrain.model.transformer import PathModel
from p2ptrain.run_state import RunState
from p2ptrain.train.checkpoint import CheckpointStore
from p2ptrain.train.session import build_model


@dataclass
class PathEval:
    path: str
    docs: int
    tokens: int
    loss: float | None  # None when no checkpoint of this path was found
    init_loss: float
    round: int | None


@dataclass
class EvalReport:
    paths: list[PathEval] = field(default_factory=list)

    @property
    def untrained_paths(self) -> int:
        return sum(1 for p in self.paths if p.loss is None)

    @property
    def mixture_loss(self) -> float:
        """Token-weighted loss of the routed mixture; a path with no checkpoint counts at its init."""
        scored = [p for p in self.paths if p.tokens]
        total = sum((p.loss if p.loss is not None else p.init_loss) * p.tokens for p in scored)
        return total / max(sum(p.tokens for p in scored), 1)

    @property
    def mixture_init_loss(self) -> float:
        scored = [p for p in self.paths if p.tokens]
        return sum(p.init_loss * p.tokens for p in scored) / max(sum(p.tokens for p in scored), 1)

    def to_dict(self) -> dict:
        """JSON-ready: a path with no held-out tokens has no loss (null, not NaN, which JSON lacks)."""
        paths = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(p).items()}
                 for p in self.paths]
        return {"paths": paths, "mixture_loss": self.mixture_loss,
                "mixture_init_loss": self.mixture_init_loss, "untrained_paths": self.untrained_paths}


@torch.no_grad()
def document_loss(model: PathModel, tokens: torch.Tensor, context: int, device: torch.device,
                  batch_windows: int = 32) -> tuple[float, int]:
    """Summed next-token loss over non-overlapping windows of a token sequence."""
    model.eval()
    n = (len(tokens) - 1) // context * context
    windows = []
    if n:
        windows = list(tokens[: n + 1].unfold(0, context + 1, context))
    rest = len(tokens) - 1 - n
    if rest > 0:  # the tail, scored as one shorter window
        windows.append(tokens[n:])
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == context + 1]
    for i in range(0, len(full), batch_windows):
        chunk = torch.stack(full[i:i + batch_windows]).to(device)
        logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    for w in windows:
        if len(w) != context + 1 and len(w) > 1:
            w = w.to(device)
            logits, _ = model(w[None, :-1])
            total += F.cross_entropy(logits.float()[0], w[1:], reduction="sum").item()
            count += len(w) - 1
    return total, count


def heldout_by_path(run_state: RunState, docs: Sequence[Document]) -> dict[PathIndex, list[Document]]:
    _, heldout = split_heldout(docs, run_state.config.data.heldout_percent)
    routes = run_state.router.route([d.text for d in heldout])
    paths = run_state.grid.paths()
    out: dict[PathIndex, list[Document]] = {p: [] for p in paths}
    for doc, r in zip(heldout, routes):
        out[paths[r]].append(doc)
    return out


def find_path_state(run_state: RunState, homes: Sequence[Path], path: PathIndex):
    """The newest verified checkpoint of `path` among the given node homes, or None."""
    best = None
    fingerprint = run_state.fingerprint()
    for home in homes:
        store = CheckpointStore(checkpoint_dir(home, run_state.config.run.id, path))
        ckpt = store.load_latest(accept=lambda c: c.meta.get("run_fingerprint") == fingerprint)
        if ckpt is not None and (best is None or ckpt.round > best.round):
            best = ckpt
    return best


def evaluate(run_state: RunState, docs: Sequence[Document], homes: Sequence[Path], device: torch.device,
             max_tokens_per_path: int = 32_768, on_path=None) -> EvalReport:
    """Score held-out documents routed to each path with its newest checkpoint and with the init.

    on_path(path name, paths done, paths in all): called after each path (progress)."""
    cfg = run_state.config
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    report = EvalReport()
    by_path = heldout_by_path(run_state, docs)
    for path, path_docs in by_path.items():
        sequences, budget = [], max_tokens_per_path
        for doc in path_docs:  # deterministic prefix of the routed held-out docs
            if budget <= 0:
                break
            ids = list(tokenizer.encode(doc.text)) + [tokenizer.eos_id]
            ids = ids[: budget + 1]
            sequences.append(torch.tensor(ids, dtype=torch.long))
            budget -= len(ids) - 1
        model = build_model(run_state, path).to(device)
        init_total, count = _score(model, sequences, cfg.model.context, device)
        ckpt = find_path_state(run_state, homes, path)
        loss = None
        if ckpt is not None:
            for module_id in model.module_ids:
                model.load_module_state(module_id, ckpt.groups[module_id])
            total, _ = _score(model, sequences, cfg.model.context, device)
            loss = total / count if count else math.nan
        report.paths.append(PathEval(path_name(path), len(path_docs), count, loss,
                                     init_total / count if count else math.nan,
                                     ckpt.round if ckpt is not None else None))
        if on_path is not None:
            on_path(path_name(path), len(report.paths), len(by_path))
    return report


def _score(model: PathModel, sequences: list[torch.Tensor], context: int, device: torch.device) -> tuple[float, int]:
    total, count = 0.0, 0
    for seq in sequences:
        t, c = document_loss(model, seq, context, device)
        total += t
        count += c
    return total, count
