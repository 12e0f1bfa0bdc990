"""Helpers shared by the quality benchmarks (bench_dipaco_quality, bench_diloco_quality).

Both simulate K workers in one process. Each worker is a real `PathSession` — the same
model, routed token stream and AdamW8bit `InnerTrainer` that `p2ptrain join` drives —
and the outer step is the exact token-weighted mean of the pseudo-gradients of the
workers holding a module, applied with `ModuleOuterState.apply`. A real-peer test proves
the swarm's outer step equals exactly this; only the network is left out.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import Document, load_documents
from p2ptrain.data.tokenizer import load_tokenizer
from p2ptrain.model.grid import PathIndex
from p2ptrain.run_state import RunState
from p2ptrain.swarm.overlap import FragmentRebase
from p2ptrain.train.evaluate import document_loss, heldout_by_path
from p2ptrain.train.outer import ModuleOuterState, fragment_bounds
from p2ptrain.train.session import PathSession

import common
from common import REPO, markdown_table, write_json, write_plot  # noqa: F401 (re-exported to the scripts)

DEVICE = torch.device("cpu")
SIMULATION_NOTE = ("K workers are simulated in one process with exact averaging: each module's "
                   "pseudo-gradient is the token-weighted mean over the workers whose path holds it, "
                   "then ModuleOuterState.apply (Nesterov SGD) — the swarm's outer-step math minus the network.")


# ----------------------------------------------------------------- run setup

def base_parser(description: str) -> argparse.ArgumentParser:
    """common's --quick, plus --seeds and --jobs; no --threads: every training process uses one."""
    parser = common.base_parser(description, quick_help="smoke run (< 60 s): tiny budget, one seed", threads=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run (median reported); default: the preset's")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="training runs in parallel processes (each with one torch thread)")
    return parser


def setup_threads(threads: int = 1) -> None:
    # one torch thread per process: on this busy 2-core machine two OpenMP threads per
    # process ran 5-20x slower (workers spinning against the other load); parallelism
    # comes from running independent training runs in separate processes instead
    torch.set_num_threads(max(threads, 1))


def run_jobs(fn: Callable, jobs: Sequence[tuple], processes: int,
             on_done: Callable[[tuple, object], None] | None = None) -> list:
    """fn(*job) for every job, in `processes` spawned processes; results in job order.

    fn must be a module-level function of the benchmark script (spawn pickles it by name).
    """
    results: list = [None] * len(jobs)
    if processes <= 1:
        setup_threads(1)
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            if on_done:
                on_done(job, results[i])
        return results
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with ctx.Pool(min(processes, len(jobs)), initializer=setup_threads) as pool:
        pending = {i: pool.apply_async(fn, job) for i, job in enumerate(jobs)}
        while pending:
            for i in list(pending):
                if pending[i].ready():
                    results[i] = pending.pop(i).get()
                    if on_done:
                        on_done(jobs[i], results[i])
            time.sleep(0.2)
    return results


def machine_info() -> dict:
    """common.machine_info, taken after this process too is set to the one torch thread
    that every training process uses."""
    setup_threads(1)
    return common.machine_info()


def print_header(title: str, info: dict) -> None:
    notes = [SIMULATION_NOTE, "every training process uses 1 torch thread"]
    common.print_header(title, info, notes + ([f"**{info['note']}**"] if info.get("note") else []))


@functools.lru_cache(maxsize=1)
def load_corpus() -> list[Document]:
    """The built-in default corpus (this machine's Python standard library), split at 4096 chars."""
    return load_documents(None, 4096)


def small_config(seed: int, *, d_model: int, n_heads: int, context: int, levels: list[int],
                 blocks_per_level: int, batch_size: int, steps_per_round: int, rounds: int,
                 inner_lr: float | None = None, warmup_steps: int | None = None,
                 outer_lr: float | None = None, outer_momentum: float | None = None,
                 rescale_by_sharing: bool = False) -> RunConfig:
    """The packaged default preset, shrunk; the cosine schedule spans exactly `rounds` rounds.
    The outer step is DiLoCo's (common.DILOCO_OUTER) unless given."""
    cfg = RunConfig.load("default")
    cfg.run.seed = seed
    cfg.model.d_model, cfg.model.n_heads, cfg.model.context = d_model, n_heads, context
    cfg.grid.levels, cfg.grid.blocks_per_level = list(levels), blocks_per_level
    cfg.inner.batch_size, cfg.inner.steps_per_round, cfg.inner.total_rounds = batch_size, steps_per_round, rounds
    if inner_lr is not None:
        cfg.inner.lr = inner_lr
    if warmup_steps is not None:
        cfg.inner.warmup_steps = warmup_steps
    cfg.outer.lr = common.DILOCO_OUTER[0] if outer_lr is None else outer_lr
    cfg.outer.momentum = common.DILOCO_OUTER[1] if outer_momentum is None else outer_momentum
    cfg.outer.rescale_by_sharing = rescale_by_sharing
    cfg.validate("benchmark config")
    return cfg


def with_config(state: RunState, **changes: dict) -> RunState:
    """The same router under a modified copy of the config: {'inner': {'batch_size': 64}, ...}."""
    cfg = copy.deepcopy(state.config)
    for section, values in changes.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    cfg.validate("benchmark config")
    return RunState(cfg, state.router)


# ------------------------------------------------------------ simulated swarm

class SimulatedSwarm:
    """Sessions of several simulated workers, with one global copy per module.

    In the swarm every peer of a module keeps its own `ModuleOuterState`, but all of them
    apply the same averaged Δ to the same starting point, so one shared copy per module
    is the same thing.
    """

    def __init__(self, sessions: Sequence[PathSession], sharing_scale: Callable[[str], float] | None = None,
                 fragments: int | None = None,
                 encode: Callable[[PathSession, str, torch.Tensor], torch.Tensor] | None = None,
                 overlap: bool = False, final_average: bool = False,
                 encode_mean: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """fragments: None, the whole-module outer step below; N, the node's averaging.fragments
        code path (SwarmNode.outer_step): round r averages only fragment_bounds(numel, N, r).
        encode: with fragments, what a worker's (session, module id, flat pseudo-gradient
        slice) reaches the average as, e.g. after a lossy codec's round trip; None: exact.
        encode_mean: with fragments, what the average reaches every holder as (the return leg
        of an all-reduce whose reducers send the average itself, as 4-bit NF4 does); None: exact.
        overlap: with fragments > 1, the node's overlapped path (overlap.FragmentRebase): round
        r's slice average lands at round r + 1's end; finish() lands the last one.
        final_average: finish() then sets every module's globals to the token-weighted mean of
        its workers' latest weights, all slices at once (a closing round the node does not run)."""
        if (encode is not None or encode_mean is not None) and fragments is None:
            raise ValueError("encode works on the flat pseudo-gradient: pass fragments (1 for whole modules)")
        if overlap and not (fragments or 0) > 1:
            raise ValueError("overlap is simulated for fragments > 1 only (FragmentRebase)")
        self.encode = encode
        self.encode_mean = encode_mean
        self.overlap = overlap
        self.final_average = final_average
        self._last_weight: dict[int, float] = {}  # the last round's token weights
        self._rebase = {id(s): FragmentRebase() for s in sessions} if overlap else {}
        self._in_flight: tuple[int, dict] | None = None  # overlap: (round, each session's weight and deltas)
        self.sessions = list(sessions)
        self.sharing_scale = sharing_scale or (lambda module_id: 1.0)
        self.fragments = fragments
        self.rounds_done = 0  # the round number the fragments take turns by
        self.globals: dict[str, ModuleOuterState] = {}
        for session in self.sessions:
            for module_id in session.module_ids:
                if module_id not in self.globals:
                    self.globals[module_id] = session.outer[module_id]
                else:  # the init is a function of (run seed, module id): every holder starts equal
                    for a, b in zip(self.globals[module_id].global_params, session.outer[module_id].global_params):
                        assert torch.equal(a, b), f"{module_id}: workers start from different weights"
                session.outer[module_id] = self.globals[module_id]

    def holders(self, module_id: str) -> list[PathSession]:
        return [s for s in self.sessions if module_id in s.module_ids]

    def global_models(self) -> dict[PathIndex, torch.nn.Module]:
        """Each path's model with its modules' global weights (what a checkpoint holds)."""
        models = {}
        for session in self.sessions:
            if session.path not in models:
                models[session.path] = copy.deepcopy(session.model)
                for module_id in session.module_ids:
                    models[session.path].load_module_state(module_id, self.globals[module_id].global_state())
        return models

    def round(self, steps: int) -> float:
        """H inner steps on every worker, then the outer step; returns the mean inner loss."""
        tokens, losses = [], []
        for session in self.sessions:
            n, loss = session.inner_steps(steps, log_every=steps)
            tokens.append(n)
            losses.append(loss)
        self.outer_step(tokens)
        return sum(losses) / len(losses)

    def outer_step(self, tokens: Sequence[int]) -> None:
        """Per module: Δ̄ = Σ tokens_i·Δ_i / Σ tokens_i over its holders, Nesterov step, adopt."""
        weight = {id(s): float(max(t, 1)) for s, t in zip(self.sessions, tokens)}
        self._last_weight = weight
        self.rounds_done += 1
        if self.overlap:
            return self._overlapped_fragment_step(weight, self.rounds_done - 1)
        if self.fragments is not None:
            return self._fragment_outer_step(weight, self.rounds_done - 1)
        for module_id, state in self.globals.items():
            state.apply(self._mean_pseudo_gradient(module_id, weight), self.sharing_scale(module_id))
        for session in self.sessions:
            for module_id in session.module_ids:
                session.adopt_global(module_id)

    def _fragment_outer_step(self, weight: dict[int, float], round_: int) -> None:
        """As SwarmNode.outer_step with averaging.fragments = N: the flat pseudo-gradient's
        fragment [start, end) is averaged, stepped with apply_fragment, and adopted only there
        (N = 1: all of it, adopted whole)."""
        for module_id, state in self.globals.items():
            holders = self.holders(module_id)
            total = sum(weight[id(s)] for s in holders)
            start, end = fragment_bounds(sum(p.numel() for p in state.global_params), self.fragments, round_)
            mean = torch.zeros(end - start)
            for session in holders:
                delta = state.pseudo_gradient_flat(session.local_state(module_id))[start:end]
                if self.encode is not None:
                    delta = self.encode(session, module_id, delta)
                mean.add_(delta, alpha=weight[id(session)] / total)
            if self.encode_mean is not None:
                mean = self.encode_mean(mean)
            state.apply_fragment(mean, start, self.sharing_scale(module_id))
            for session in holders:
                session.adopt_global(module_id, None if self.fragments == 1 else (start, end))


    def _slots(self, session: PathSession) -> dict:
        return {m: _FragmentSlot(self.globals[m], self.fragments) for m in session.module_ids}

    def _overlapped_fragment_step(self, weight: dict[int, float], round_: int) -> None:
        """As SwarmNode._overlapped_outer_step with fragments: each worker's D = G − local
        (round_'s slice goes out), round_ − 1's slice average lands, each worker rebases it."""
        deltas = {id(s): self._rebase[id(s)].progress(self._slots(s), s, round_) for s in self.sessions}
        self._land()
        for session in self.sessions:
            self._rebase[id(session)].rebase(self._slots(session), session, deltas[id(session)], landed={})
        self._in_flight = (round_, {id(s): (weight[id(s)], deltas[id(s)]) for s in self.sessions})

    def _land(self) -> None:
        """The slice average in flight: token-weighted mean of its holders' D, the outer step."""
        if self._in_flight is None:
            return
        round_, sent = self._in_flight
        self._in_flight = None
        for module_id, state in self.globals.items():
            holders = self.holders(module_id)
            total = sum(sent[id(s)][0] for s in holders)
            start, end = fragment_bounds(sum(p.numel() for p in state.global_params), self.fragments, round_)
            mean = torch.zeros(end - start)
            for session in holders:
                flat = torch.cat([d.reshape(-1) for d in sent[id(session)][1][module_id]])
                mean.add_(flat[start:end], alpha=sent[id(session)][0] / total)
            state.apply_fragment(mean, start, self.sharing_scale(module_id))

    def finish(self) -> None:
        """Overlap: land the last round's average and adopt the globals, as run() does at a
        stop. final_average: the landed slice is first rebased (its workers keep the progress
        made since it went out), then every module's globals become its workers' mean."""
        if self.overlap:
            self._land()
            for session in self.sessions:
                if self.final_average:
                    self._rebase[id(session)].rebase(self._slots(session), session, {}, landed={})
                self._rebase[id(session)].reset()
                if not self.final_average:
                    for module_id in session.module_ids:
                        session.adopt_global(module_id)
        if self.final_average:
            self._closing_mean(self._last_weight)

    def _closing_mean(self, weight: dict[int, float]) -> None:
        """Every module's globals ← the token-weighted mean of its holders' latest weights, every
        value at once and no outer step (a plain average: the momentum would push the slices it
        has not moved for rounds past the mean); every worker adopts it whole."""
        for module_id, state in self.globals.items():
            for p, m in zip(state.global_params, self._mean_pseudo_gradient(module_id, weight)):
                p.sub_(m)  # G − Σ w (G − local) / Σ w = the weighted mean of the locals
            for session in self.holders(module_id):
                session.adopt_global(module_id)

    def _mean_pseudo_gradient(self, module_id: str, weight: dict[int, float]) -> list[torch.Tensor]:
        """Σ w_i (G − local_i) / Σ w_i over the module's holders, per parameter."""
        state, holders = self.globals[module_id], self.holders(module_id)
        total = sum(weight[id(s)] for s in holders)
        mean = [torch.zeros_like(p) for p in state.global_params]
        delta = [torch.empty_like(p) for p in state.global_params]
        for session in holders:
            state.pseudo_gradient_into(session.local_state(module_id), delta)
            for m, d in zip(mean, delta):
                m.add_(d, alpha=weight[id(session)] / total)
        return mean


class _FragmentSlot:
    """What FragmentRebase reads of a node's ModuleSlot: the module's (shared) outer state,
    a lock and the round's fragment."""

    def __init__(self, outer: ModuleOuterState, fragments: int):
        self.outer, self.fragments, self.lock = outer, fragments, threading.Lock()

    def fragment(self, round_: int) -> tuple[int, int]:
        return fragment_bounds(sum(p.numel() for p in self.outer.global_params), self.fragments, round_)


def make_session(state: RunState, path: PathIndex, docs: Sequence[Document], data_seed: int = 0) -> PathSession:
    # PathSession wants a node home for its checkpoint store; the store creates nothing
    # until a checkpoint is saved, and the benchmarks never save one
    home = Path(tempfile.gettempdir()) / "p2ptrain-bench-unused-home"
    return PathSession(state, path, docs, DEVICE, home, data_seed=data_seed)


def workers_of(state: RunState, docs: Sequence[Document], workers_on_one_path: int | None) -> list[PathSession]:
    """DiLoCo (workers_on_one_path = K): K workers on the grid's first path, each with its
    own data stream 0..K-1; DiPaCo (None): one worker per path of the grid."""
    if workers_on_one_path:
        first = next(iter(state.grid.paths()))
        return [make_session(state, first, docs, data_seed=k) for k in range(workers_on_one_path)]
    return [make_session(state, path, docs) for path in state.grid.paths()]


# ------------------------------------------------------------------ evaluation

SPLITS = ("validation", "test")


def heldout_split(doc: Document) -> str:
    """Which half of the held-out documents a document is in: "validation" (every setting
    a benchmark picks is picked on it) or "test" (the reported numbers).

    By the parity of the content hash's fifth byte; bytes 0-3 already decided held-out vs
    training (corpus.split_heldout), so the halves are disjoint from each other and from
    training, and fixed: the same documents for every seed."""
    return "validation" if doc.digest[4] % 2 == 0 else "test"


def heldout_sequences(state: RunState, docs: Sequence[Document], max_tokens_per_path: int,
                      split: str | None = None) -> dict[PathIndex, list[torch.Tensor]]:
    """Routed held-out documents, tokenised like `evaluate` does (doc + EOS, a capped prefix);
    split: only that half of them (see heldout_split), None: all."""
    assert split in (None, *SPLITS), split
    tokenizer = load_tokenizer(state.config.data.tokenizer)
    out = {}
    for path, path_docs in heldout_by_path(state, docs).items():
        sequences, budget = [], max_tokens_per_path
        for doc in path_docs:
            if split is not None and heldout_split(doc) != split:
                continue
            if budget <= 0:
                break
            ids = (list(tokenizer.encode(doc.text)) + [tokenizer.eos_id])[: budget + 1]
            sequences.append(torch.tensor(ids, dtype=torch.long))
            budget -= len(ids) - 1
        out[path] = sequences
    return out


def score(model: torch.nn.Module, sequences: Sequence[torch.Tensor], context: int) -> tuple[float, int]:
    """(summed loss, tokens) of a model over sequences, via evaluate.document_loss."""
    total, count = 0.0, 0
    for seq in sequences:
        t, c = document_loss(model, seq, context, DEVICE)
        total, count = total + t, count + c
    model.train()
    return total, count


def routed_loss(models: dict[PathIndex, torch.nn.Module], sequences: dict, context: int) -> tuple[float, int]:
    """(loss, tokens scored): each path's held-out docs scored by its path's model."""
    scored = [score(models[path], seqs, context) for path, seqs in sequences.items()]
    return sum(t for t, _ in scored) / sum(c for _, c in scored), sum(c for _, c in scored)


def train_with_curve(swarm: SimulatedSwarm, rounds: int, steps: int, curve_sequences: dict,
                     context: int) -> tuple[list[int], list[float]]:
    """`rounds` rounds of `steps` inner steps and an outer step; after each, the global
    weights' routed loss on curve_sequences: (inner steps per worker, loss) per round."""
    xs, ys = [], []
    for r in range(rounds):
        swarm.round(steps)
        if r == rounds - 1:
            swarm.finish()  # overlap: the last round's average lands at the stop
        xs.append(steps * (r + 1))
        ys.append(routed_loss(swarm.global_models(), curve_sequences, context)[0])
    return xs, ys


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- output

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def plot_curves(name: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str) -> Path | None:
    """One line per series into bench-out/<name>.png; None when matplotlib is missing."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig

    return write_plot(name, draw)
