"""Claim: p2ptrain's inner steps run at >= 0.97x the speed of a minimal plain-PyTorch loop
training the same model with the same bitsandbytes AdamW8bit on the same batches.

p2ptrain side: a real `PathSession` (default preset, default corpus, path 0,0) timed
through `session.inner_steps(n)` — data sampling, lr schedule, clipping, optimizer step
and its loss bookkeeping included.
Plain side: a deep copy of the session's initial model, `bnb.optim.AdamW8bit` built by
hand with the same hyperparameters and param groups, and the bare loop below, drawing the
very same batches from the session's token stream (its generator state is copied before
each block), so both sides do the same work and their losses must agree.

Blocks of n steps alternate A,B / B,A / A,B ... so load from other processes hits both;
the ratio reported is the median of the per-pair ratios.

    python benchmarks/bench_inner_throughput.py [--quick] [--steps 10] [--repeats 15] [--profile]
"""

from __future__ import annotations

import copy
import cProfile
import io
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (apply_threads, base_parser, machine_info, markdown_table, paired_stats,  # noqa: E402
                    print_header, write_json)
from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.data.corpus import load_documents  # noqa: E402
from p2ptrain.model.grid import path_name  # noqa: E402
from p2ptrain.run_state import RunState  # noqa: E402
from p2ptrain.train.inner import MIN_8BIT_SIZE, import_bitsandbytes  # noqa: E402
from p2ptrain.train.session import PathSession  # noqa: E402

TARGET = 0.97
MIN_PAIRS = 3
QUICK_CORPUS_CHARS = 1_500_000  # --quick: a prefix of the default corpus, so setup takes seconds


# ------------------------------------------------------------- the plain loop

class PlainLoop:
    """What one would write by hand: model, AdamW8bit, warm-up + cosine lr, clip, step."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig):
        bnb = import_bitsandbytes()
        inner = cfg.inner
        self.model, self.inner = model, inner
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": inner.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = bnb.optim.AdamW8bit(groups, lr=inner.lr, betas=tuple(inner.betas),
                                             min_8bit_size=MIN_8BIT_SIZE)
        self.total = max(inner.total_rounds * inner.steps_per_round, 1)
        self.step_count = 0

    def lr(self) -> float:
        s, c = self.step_count, self.inner
        if s < c.warmup_steps:
            return c.lr * (s + 1) / c.warmup_steps
        progress = min((s - c.warmup_steps) / max(self.total - c.warmup_steps, 1), 1.0)
        floor = c.lr * c.min_lr_ratio
        return floor + (c.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def steps(self, n: int, sample) -> float:
        self.model.train()
        losses = []
        for _ in range(n):
            lr = self.lr()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = sample()
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.inner.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            self.step_count += 1
        return float(torch.stack(losses).mean())


# ------------------------------------------------------------------- driver

def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="inner steps per timed block (full: 10 = the session's log_every)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved block pairs (full: 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (full: 3)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"stop adding pairs (after {MIN_PAIRS}) once the timed part took this long "
                             "(full: 150, quick: 20)")
    parser.add_argument("--path", default="0,0", help="the path to train")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one block of each side and print the top functions")
    args = parser.parse_args()
    apply_threads(args.threads)
    steps = args.steps or (5 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    info = machine_info()

    # --- setup: the same objects `p2ptrain train` builds
    t0 = time.perf_counter()
    docs = load_documents(None, 4096, max_total_chars=QUICK_CORPUS_CHARS if args.quick else None)
    cfg = RunConfig.load()
    state = RunState.create(cfg, docs)
    path = tuple(int(i) for i in args.path.split(","))
    home = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-inner-"))
    session = PathSession(state, path, docs, torch.device("cpu"), home)
    plain = PlainLoop(copy.deepcopy(session.model), cfg)
    plain_gen = torch.Generator()
    setup_s = time.perf_counter() - t0

    batch, context = cfg.inner.batch_size, cfg.model.context
    params = sum(p.numel() for p in session.model.parameters())

    def sample():
        return session.stream.sample(batch, context, plain_gen)

    # wall-clock seconds (the claim), CPU seconds of this process (less sensitive to other
    # processes on the machine), and the block's mean loss
    def run_p2ptrain(n: int) -> tuple[float, float, float]:
        t, c = time.perf_counter(), time.process_time()
        _, loss = session.inner_steps(n)
        return time.perf_counter() - t, time.process_time() - c, loss

    def run_plain(n: int) -> tuple[float, float, float]:
        t, c = time.perf_counter(), time.process_time()
        loss = plain.steps(n, sample)
        return time.perf_counter() - t, time.process_time() - c, loss

    def pair(n: int, p2ptrain_first: bool) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        plain_gen.set_state(session.generator.get_state())  # the plain side draws the same batches
        if p2ptrain_first:
            a = run_p2ptrain(n)
            b = run_plain(n)
        else:
            b = run_plain(n)
            a = run_p2ptrain(n)
        return a, b

    # --- warm-up (bnb allocates its states on the first step), then timed pairs
    if warmup:
        pair(warmup, True)
    tokens = steps * batch * context
    a_tps, b_tps, a_cpu, b_cpu, loss_diffs, rows = [], [], [], [], [], []
    budget_s = args.budget_s if args.budget_s is not None else (20.0 if args.quick else 150.0)
    t_timed = time.perf_counter()
    for r in range(repeats):
        if r >= MIN_PAIRS and time.perf_counter() - t_timed > budget_s:
            break  # the machine is in a slow phase: report the pairs we have
        (ta, ca, la), (tb, cb, lb) = pair(steps, p2ptrain_first=(r % 2 == 0))
        a_tps.append(tokens / ta)
        b_tps.append(tokens / tb)
        a_cpu.append(tokens / ca)
        b_cpu.append(tokens / cb)
        loss_diffs.append(abs(la - lb))
        rows.append([r + 1, "p2ptrain" if r % 2 == 0 else "plain", f"{tokens / ta:,.0f}", f"{tokens / tb:,.0f}",
                     f"{tb / ta:.3f}", f"{cb / ca:.3f}", f"{la:.4f}", f"{lb:.4f}"])
    stats = paired_stats(a_tps, b_tps)
    cpu_stats = paired_stats(a_cpu, b_cpu)

    profiles = {}
    if args.profile:
        for name, fn in (("p2ptrain", run_p2ptrain), ("plain", run_plain)):
            plain_gen.set_state(session.generator.get_state())
            prof = cProfile.Profile()
            prof.enable()
            fn(steps)
            prof.disable()
            profiles[name] = top_functions(prof)

    # --- report
    print_header("Inner-step throughput: p2ptrain PathSession vs a plain PyTorch loop", info, [
        f"model: default preset path {path_name(path)}: d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
        f"{len(cfg.grid.levels)} levels x {cfg.grid.blocks_per_level} blocks, vocab 257 (bytes), "
        f"{params:,} parameters; batch {batch} x {context} tokens = {batch * context:,} tokens/step; CPU, fp32",
        f"optimizer: bitsandbytes AdamW8bit, lr {cfg.inner.lr} (warm-up {cfg.inner.warmup_steps} + cosine), "
        f"betas {tuple(cfg.inner.betas)}, weight decay {cfg.inner.weight_decay} on >=2-D params, "
        f"clip {cfg.inner.grad_clip}",
        f"corpus: default (Python stdlib{', first %s chars' % format(QUICK_CORPUS_CHARS, ',') if args.quick else ''}), "
        f"{len(docs):,} documents; path shard {session.stream.num_docs:,} documents, "
        f"{len(session.stream):,} tokens; setup {setup_s:.1f} s",
        f"timing: {warmup} warm-up steps per side, then {len(rows)} interleaved pairs of {steps}-step blocks "
        f"(order alternates{'; stopped early at the %.0f s budget, %d planned' % (budget_s, repeats) if len(rows) < repeats else ''}); "
        "tokens/s per block; ratio = p2ptrain / plain; a pair's ratio cancels load that hits both of its blocks",
    ])
    print(markdown_table(["pair", "first", "p2ptrain tok/s", "plain tok/s", "ratio (wall)", "ratio (CPU time)",
                          "p2ptrain loss", "plain loss"], rows))
    print()
    verdict = "meets" if stats["median_ratio"] >= TARGET else "BELOW"
    print(markdown_table(["metric", "value"], [
        ["p2ptrain tokens/s (median)", f"{statistics.median(a_tps):,.0f}"],
        ["plain loop tokens/s (median)", f"{statistics.median(b_tps):,.0f}"],
        ["ratio p2ptrain/plain (median of pairs)", f"{stats['median_ratio']:.3f}"],
        ["ratio range over pairs", f"{stats['min_ratio']:.3f} – {stats['max_ratio']:.3f}"],
        ["ratio of medians", f"{stats['ratio_of_medians']:.3f}"],
        ["ratio per CPU-second (median of pairs; less load-sensitive)", f"{cpu_stats['median_ratio']:.3f}"],
        ["target", f">= {TARGET} ({verdict})"],
        ["max abs diff of block mean loss (same batches)", f"{max(loss_diffs):.2e}"],
    ]))
    for name, top in profiles.items():
        print(f"\ncProfile, one {steps}-step block, {name} side (top functions by own time):\n")
        print(markdown_table(["function", "calls", "own s", "cumulative s"],
                             [[f, c, f"{t:.3f}", f"{ct:.3f}"] for f, c, t, ct in top]))

    out = write_json(__file__, {
        "machine": info, "quick": args.quick, "target": TARGET, "meets_target": stats["median_ratio"] >= TARGET,
        "config": {"path": list(path), "params": params, "batch_size": batch, "context": context,
                   "steps_per_block": steps, "repeats": len(rows), "repeats_planned": repeats, "budget_s": budget_s, "warmup_steps": warmup,
                   "docs": len(docs), "shard_tokens": len(session.stream)},
        "p2ptrain_tokens_per_s": a_tps, "plain_tokens_per_s": b_tps,
        "ratio_median_of_pairs": stats["median_ratio"], "ratio_min": stats["min_ratio"],
        "ratio_max": stats["max_ratio"], "ratio_of_medians": stats["ratio_of_medians"],
        "pair_ratios": stats["ratios"], "cpu_ratio_median_of_pairs": cpu_stats["median_ratio"],
        "cpu_pair_ratios": cpu_stats["ratios"], "p2ptrain_tokens_per_cpu_s": a_cpu, "plain_tokens_per_cpu_s": b_cpu, "max_abs_loss_diff": max(loss_diffs), "setup_s": setup_s,
        "profiles": {k: [list(row) for row in v] for k, v in profiles.items()},
    })
    print(f"\n(numbers also in {out.relative_to(out.parent.parent)})")


def top_functions(prof: cProfile.Profile, n: int = 12) -> list[tuple[str, int, float, float]]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in stats.stats.items():
        where = f"{Path(file).name}:{line}" if line else file
        rows.append((f"{func} ({where})", calls, own, cumulative))
    rows.sort(key=lambda r: -r[2])
    return rows[:n]


if __name__ == "__main__":
    main()
