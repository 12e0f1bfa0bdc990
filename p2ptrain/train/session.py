"""A path training session: the model, its data shard, the inner and outer optimizer
state and the checkpoint store of one path on this node.

Both `p2ptrain train` (one machine) and `p2ptrain join` (the swarm) drive a session;
the swarm adds the outer step between rounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from p2ptrain.data.batches import DataUsage, TokenStream
from p2ptrain.data.corpus import Document, split_heldout
from p2ptrain.data.tokenizer import load_tokenizer
from p2ptrain.errors import CheckpointError, DataError
from p2ptrain.home import checkpoint_dir
from p2ptrain.model.grid import PathIndex, path_name
from p2ptrain.model.transformer import PathModel, module_schema, schema_hash
from p2ptrain.run_state import RunState
from p2ptrain.train.checkpoint import Checkpoint, CheckpointStore
from p2ptrain.train.inner import InnerTrainer
from p2ptrain.train.outer import ModuleOuterState

logger = logging.getLogger(__name__)


def build_model(run_state: RunState, path: PathIndex) -> PathModel:
    cfg = run_state.config
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    return PathModel(cfg.model, run_state.grid, cfg.grid.blocks_per_level, path, tokenizer.vocab_size, cfg.run.seed)


def shard_for_path(run_state: RunState, docs: Sequence[Document], path: PathIndex) -> list[Document]:
    """The training documents this path sees: the train split, routed to this path."""
    train, _ = split_heldout(docs, run_state.config.data.heldout_percent)
    number = run_state.grid.path_number(path)
    routes = run_state.router.route([d.text for d in train])
    return [d for d, r in zip(train, routes) if r == number]


@dataclass
class StepReport:
    step: int
    loss: float  # of the latest step
    tokens_per_s: float
    window: list[float]  # losses of every step since the previous report


class PathSession:
    def __init__(self, run_state: RunState, path: PathIndex, docs: Sequence[Document], device: torch.device,
                 home: Path, data_seed: int = 0):
        cfg = run_state.config
        self.run_state = run_state
        self.cfg = cfg
        self.path = tuple(path)
        self.device = device
        shard = shard_for_path(run_state, docs, path)
        if not shard:
            raise DataError(f"no local documents are routed to path {path_name(path)}: add data with --data "
                            "or pick another --path (see `p2ptrain route`)")
        self.stream = TokenStream(shard, load_tokenizer(cfg.data.tokenizer))
        self.model = build_model(run_state, path).to(device)
        self.inner = InnerTrainer(self.model, cfg.inner, device)
        self.outer = {m: ModuleOuterState(m, self.model.module_state(m), cfg.outer) for m in self.model.module_ids}
        self.store = CheckpointStore(checkpoint_dir(home, cfg.run.id, path))
        self.generator = torch.Generator().manual_seed(hash((cfg.run.seed, data_seed, self.path)) & 0xFFFF_FFFF)
        self.round = 0
        self.tokens_seen = 0

    @property
    def module_ids(self) -> list[str]:
        return self.model.module_ids

    # ----------------------------------------------------------- inner loop

    def inner_steps(self, n: int, on_step: Callable[[StepReport], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, log_every: int = 10,
                    last_step_rows: Callable[[int], int] | None = None) -> tuple[int, float]:
        """Run up to n inner steps; returns (tokens processed, mean loss).

        When should_stop says stop, last_step_rows (if given) may still allow one last step
        on fewer sequences than the batch (0: none); the loop ends after it.
        The loss is read back to the host only every `log_every` steps: on a GPU each
        read is a sync point that would stall the launch queue.
        """
        self.model.train()
        batch, context = self.cfg.inner.batch_size, self.cfg.model.context
        losses, tokens, t0 = [], 0, time.perf_counter()
        pending: list[torch.Tensor] = []
        for i in range(n):
            rows = batch
            if should_stop is not None and should_stop():
                rows = last_step_rows(batch) if last_step_rows is not None else 0
                if not 0 < rows < batch:
                    break
            x, y = self.stream.sample(rows, context, self.generator)
            pending.append(self.inner.step(x, y))
            tokens += x.numel()
            if rows < batch:
                break  # the shorter last step
            if len(pending) == log_every or i == n - 1:
                values = torch.stack(pending).float().cpu().tolist()
                losses.extend(values)
                pending = []
                if on_step is not None:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    on_step(StepReport(self.inner.step_count, values[-1], tokens / elapsed, values))
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
        self.tokens_seen += tokens
        return tokens, (sum(losses) / len(losses) if losses else float("nan"))

    # ------------------------------------------------- data sources (issue 15)
    # The round driver reads what the inner steps consumed (for the ledger) and hands in
    # refreshed documents at round boundaries; see p2ptrain.data.sources.DocumentFeed.

    def take_data_usage(self) -> DataUsage:
        """Input tokens consumed since the last call, per source, file and document."""
        return self.stream.take_usage()

    def set_documents(self, docs: Sequence[Document]) -> int:
        """Train on these documents from the next inner step on; returns the shard's size in documents."""
        shard = shard_for_path(self.run_state, docs, self.path)
        if not shard:
            raise DataError(f"after the data sources changed, no local documents are routed to path "
                            f"{path_name(self.path)}: register more data (p2ptrain data add) or pick another --path")
        self.stream = TokenStream(shard, load_tokenizer(self.cfg.data.tokenizer))
        return len(shard)

    # --------------------------------------------------- global <-> local

    def local_state(self, module_id: str) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.parts()[module_id].named_parameters()}

    def adopt_global(self, module_id: str, fragment: tuple[int, int] | None = None) -> None:
        """Continue training from the module's global parameters (after an outer step); with
        `fragment` ([start, end) of the parameters laid end to end), only those values: the
        rest keep their local progress until their own fragment is averaged."""
        outer = self.outer[module_id]
        if fragment is None:
            self.model.load_module_state(module_id, outer.global_state())
            return
        start, end = fragment
        params = dict(self.model.parts()[module_id].named_parameters())
        offset = 0
        with torch.no_grad():
            for name, g in zip(outer.names, outer.global_params):
                lo, hi = max(start, offset), min(end, offset + g.numel())
                if lo < hi:
                    local = params[name].view(-1)
                    local[lo - offset:hi - offset].copy_(g.view(-1)[lo - offset:hi - offset])
                offset += g.numel()

    def shift_local(self, module_id: str, start: int, shift: torch.Tensor) -> None:
        """Add `shift` (flat) to the local parameters' values [start, start + len(shift)), the
        parameters laid end to end (overlapped fragments rebase one slice this way)."""
        params = dict(self.model.parts()[module_id].named_parameters())
        offset, end = 0, start + shift.numel()
        with torch.no_grad():
            for name in self.outer[module_id].names:
                local = params[name].view(-1)
                lo, hi = max(start, offset), min(end, offset + local.numel())
                if lo < hi:
                    local[lo - offset:hi - offset] += shift[lo - start:hi - start].to(local.device, local.dtype)
                offset += local.numel()

    def make_local_global(self) -> None:
        """Single-machine training has no outer step: the local weights are the global ones."""
        for module_id in self.module_ids:
            state = self.model.module_state(module_id)
            for dst, name in zip(self.outer[module_id].global_params, self.outer[module_id].names):
                dst.copy_(state[name])

    # ---------------------------------------------------------- checkpoints

    def schema_hashes(self) -> dict[str, str]:
        return {m: schema_hash(module_schema(mod)) for m, mod in self.model.parts().items()}

    def save_checkpoint(self, background: bool = False) -> Path:
        """Checkpoint this path; with background=True the disk write overlaps what comes next
        (see CheckpointStore.save_in_background). Returns the checkpoint's directory."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for module_id in self.module_ids:
            groups[module_id] = self.outer[module_id].global_state()
            groups[f"outer.{module_id}"] = {f"momentum.{n}": m for n, m in
                                            zip(self.outer[module_id].names, self.outer[module_id].momentum)}
        opt_tensors, opt_meta = _flatten_optimizer_state(self.inner.optimizer.state_dict())
        groups["optimizer"] = opt_tensors
        # the data order: without it a resumed session would replay the batches it started with
        groups["data"] = {"generator": self.generator.get_state()}
        meta = {
            "run_id": self.cfg.run.id,
            "run_fingerprint": self.run_state.fingerprint(),
            "path": list(self.path),
            "step": self.inner.step_count,
            "tokens": self.tokens_seen,
            "modules": self.schema_hashes(),
            "optimizer": opt_meta,
            "saved_at": time.time(),
        }
        if background:
            self.store.save_in_background(self.round, groups, meta)
            return self.store.directory(self.round)
        return self.store.save(self.round, groups, meta)

    def restore(self) -> Checkpoint | None:
        """Resume from the newest good checkpoint of this path, if any."""
        fingerprint = self.run_state.fingerprint()

        def matches(ckpt: Checkpoint) -> bool:
            if ckpt.meta.get("run_fingerprint") != fingerprint:
                logger.warning("ignoring checkpoint %s: it belongs to another version of run %s",
                               ckpt.directory, self.cfg.run.id)
                return False
            return ckpt.meta.get("modules") == self.schema_hashes()

        ckpt = self.store.load_latest(accept=matches)
        if ckpt is None:
            if self.store.rounds():
                logger.warning("no usable checkpoint under %s; starting from the initialisation", self.store.root)
            return None
        try:
            for module_id in self.module_ids:
                self.model.load_module_state(module_id, ckpt.groups[module_id])
                outer = self.outer[module_id]
                for i, n in enumerate(outer.names):
                    outer.global_params[i].copy_(ckpt.groups[module_id][n])
                    outer.momentum[i].copy_(ckpt.groups[f"outer.{module_id}"][f"momentum.{n}"])
            self.inner.optimizer.load_state_dict(
                _unflatten_optimizer_state(ckpt.groups["optimizer"], ckpt.meta["optimizer"]))
            if "data" in ckpt.groups:  # checkpoints written before the data order was saved lack it
                self.generator.set_state(ckpt.groups["data"]["generator"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt.directory}: does not fit this path's model ({e}); "
                                  "move it away to start fresh") from None
        self.inner.step_count = int(ckpt.meta["step"])
        self.tokens_seen = int(ckpt.meta["tokens"])
        self.round = ckpt.round
        return ckpt


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON scalars.

    bitsandbytes nests its quantisation state in a dict per parameter, so nested dicts
    are flattened with '/'-joined keys.
    """
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        else:
            scalars[prefix] = list(value) if isinstance(value, tuple) else value

    for idx, state in state_dict["state"].items():
        walk(str(idx), state)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, *names = key.split("/")
        node = state.setdefault(int(idx), {})
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
