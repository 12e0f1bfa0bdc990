"""Claim: p2ptrain's inner steps run at >= 0.97x the speed of a minimal plain-PyTorch loop
training the same model with the same bitsandbytes AdamW8bit on the same batches.

p2ptrain side: a real `PathSession` (default preset, default corpus, path 0,0), one step
per `session.inner_steps(1)` call: batch sampling, lr schedule, forward, backward,
clipping, optimizer step and the loss read-back, all as `p2ptrain train` and `join` run
them (calling it per step pays its per-call bookkeeping every step instead of every 10:
if anything, that is against p2ptrain).
Plain side: a deep copy of the session's initial model (fp32, CPU, no autocast: the
session uses none on CPU either), `bnb.optim.AdamW8bit` built by hand with the same
hyperparameters and param groups, and the bare loop below. Before each pair of steps the
plain side's generator copies the session's, so both sides draw the very same batch, and
their losses must agree (checked in the table).

Steps alternate p2ptrain, plain, plain, p2ptrain, ... so a load burst from other processes
on the machine hits both sides nearly equally. Reported: the median over step pairs of
(plain step seconds) / (p2ptrain step seconds), wall-clock and CPU time; per block of
`--steps` pairs also tokens/s of each side.

    python benchmarks/bench_inner_throughput.py [--quick] [--steps 10] [--repeats 15] [--profile]
"""

from __future__ import annotations

import copy
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (Stopwatch, apply_threads, base_parser, corpus_note, default_run, machine_info,  # noqa: E402
                    markdown_table, open_session, paired_stats, parse_path, print_header, write_outputs)
from p2ptrain.config import InnerConfig  # noqa: E402
from p2ptrain.model.grid import path_name  # noqa: E402
from p2ptrain.train.inner import MIN_8BIT_SIZE, import_bitsandbytes, lr_at  # noqa: E402

TARGET = 0.97
MIN_BLOCKS = 3  # reported even when the time budget runs out earlier


# ------------------------------------------------------------- the plain loop

class PlainLoop:
    """What one would write by hand: model, AdamW8bit, scheduled lr, clip, step.

    The lr comes from p2ptrain's `lr_at` (a few float operations per step), so both sides
    follow the same schedule and their losses can be compared step for step."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig):
        bnb = import_bitsandbytes()
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), min_8bit_size=MIN_8BIT_SIZE)
        self.model, self.cfg, self.step_count = model, cfg, 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_count, self.cfg)
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.item()


# ------------------------------------------------------------- the two sides

class SideBySide:
    """The session and the plain loop, stepped in lock-step on the same batches."""

    def __init__(self, session):
        self.session = session
        self.plain = PlainLoop(copy.deepcopy(session.model), session.cfg.inner)
        self.plain_generator = torch.Generator()
        self.batch, self.context = session.cfg.inner.batch_size, session.cfg.model.context

    def p2ptrain_step(self) -> tuple[Stopwatch, float]:
        with Stopwatch() as watch:
            _, loss = self.session.inner_steps(1)
        return watch, loss

    def plain_step(self) -> tuple[Stopwatch, float]:
        with Stopwatch() as watch:
            x, y = self.session.stream.sample(self.batch, self.context, self.plain_generator)
            loss = self.plain.step(x, y)
        return watch, loss

    def pair(self, p2ptrain_first: bool) -> tuple[tuple[Stopwatch, float], tuple[Stopwatch, float]]:
        """One step of each side on the same batch; returns (p2ptrain, plain)."""
        self.plain_generator.set_state(self.session.generator.get_state())
        if p2ptrain_first:
            a = self.p2ptrain_step()
            return a, self.plain_step()
        b = self.plain_step()
        return self.p2ptrain_step(), b


def timed_blocks(sides: SideBySide, steps: int, repeats: int, budget_s: float) -> list[dict]:
    """Blocks of `steps` step pairs, the order within a pair alternating; stops adding blocks
    once the budget is spent (after MIN_BLOCKS): a slow phase of the machine can be 10x slower.

    A pair's ratio compares two steps that ran back to back on the same batch; its median
    ignores the steps that a burst of load on the machine hit (they dominate a sum)."""
    tokens = sides.batch * sides.context
    blocks, start = [], time.perf_counter()
    for r in range(repeats):
        if r >= MIN_BLOCKS and time.perf_counter() - start > budget_s:
            break
        pairs = [sides.pair(p2ptrain_first=(i + r) % 2 == 0) for i in range(steps)]
        wall = [sum(side[0].wall for side in sides_) for sides_ in zip(*pairs)]
        cpu = [sum(side[0].cpu for side in sides_) for sides_ in zip(*pairs)]
        blocks.append({"p2ptrain_tps": steps * tokens / wall[0], "plain_tps": steps * tokens / wall[1],
                       "p2ptrain_tpcpu": steps * tokens / cpu[0], "plain_tpcpu": steps * tokens / cpu[1],
                       "pair_ratios": [b.wall / a.wall for (a, _), (b, _) in pairs],
                       "pair_cpu_ratios": [b.cpu / a.cpu for (a, _), (b, _) in pairs],
                       "max_abs_loss_diff": max(abs(la - lb) for (_, la), (_, lb) in pairs),
                       "loss": pairs[-1][0][1]})
    return blocks


def profile_sides(sides: SideBySide, steps: int) -> dict[str, list[tuple[str, int, float, float]]]:
    """cProfile of `steps` steps of each side (top functions by own time)."""
    out = {}
    for name, step in (("p2ptrain", sides.p2ptrain_step), ("plain", sides.plain_step)):
        sides.plain_generator.set_state(sides.session.generator.get_state())
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        out[name] = top_functions(prof)
    return out


def top_functions(prof: cProfile.Profile, n: int = 12) -> list[tuple[str, int, float, float]]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in stats.stats.items():
        where = f"{Path(file).name}:{line}" if line else file
        rows.append((f"{func} ({where})", calls, own, cumulative))
    rows.sort(key=lambda r: -r[2])
    return rows[:n]


def draw(pair_ratios: list[float], pair_cpu_ratios: list[float], blocks: list[dict]):
    def figure(plt):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5))
        x = range(1, len(blocks) + 1)
        top.plot(x, [b["p2ptrain_tps"] for b in blocks], "o-", label="p2ptrain PathSession")
        top.plot(x, [b["plain_tps"] for b in blocks], "s--", label="plain PyTorch loop")
        top.set_xlabel("block")
        top.set_ylabel("tokens/s (wall)")
        top.set_title("Inner steps, default preset path, CPU: load on the machine moves both sides together")
        top.legend()
        bins = [0.5 + 0.025 * i for i in range(41)]
        bottom.hist([min(max(r, 0.5), 1.5) for r in pair_ratios], bins=bins, alpha=0.6,
                    label=f"wall (median {statistics.median(pair_ratios):.3f})")
        bottom.hist([min(max(r, 0.5), 1.5) for r in pair_cpu_ratios], bins=bins, alpha=0.6,
                    label=f"CPU time (median {statistics.median(pair_cpu_ratios):.3f})")
        bottom.axvline(TARGET, color="red", linestyle=":", label=f"target {TARGET}")
        bottom.set_xlabel("p2ptrain / plain speed, per step pair (clipped to 0.5 – 1.5)")
        bottom.set_ylabel("step pairs")
        bottom.legend()
        fig.tight_layout()
        return fig
    return figure


# ------------------------------------------------------------------- driver

def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="step pairs per block (full: 10, quick: 3)")
    parser.add_argument("--repeats", type=int, default=None, help="blocks (full: 15, quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed step pairs first (full: 3, quick: 1)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"stop adding blocks (after {MIN_BLOCKS}) once the timed part took this long "
                             "(full: 150, quick: 15)")
    parser.add_argument("--path", default="0,0", help="the path to train")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one block of each side and print the top functions")
    args = parser.parse_args()
    apply_threads(args.threads)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    budget_s = args.budget_s if args.budget_s is not None else (15.0 if args.quick else 150.0)
    info = machine_info()

    # --- setup: the same objects `p2ptrain train` builds
    with Stopwatch() as setup:
        cfg, state, docs = default_run(args.quick)
        path = parse_path(args.path)
        sides = SideBySide(open_session(state, docs, path))
    session = sides.session
    params = sum(p.numel() for p in session.model.parameters())

    # --- warm-up (bitsandbytes allocates its states on the first step), then timed blocks
    for i in range(warmup):
        sides.pair(p2ptrain_first=i % 2 == 0)
    blocks = timed_blocks(sides, steps, repeats, budget_s)
    block_stats = paired_stats([b["p2ptrain_tps"] for b in blocks], [b["plain_tps"] for b in blocks])
    pair_ratios = [r for b in blocks for r in b["pair_ratios"]]
    pair_cpu_ratios = [r for b in blocks for r in b["pair_cpu_ratios"]]
    ratio, cpu_ratio = statistics.median(pair_ratios), statistics.median(pair_cpu_ratios)
    max_loss_diff = max(b["max_abs_loss_diff"] for b in blocks)
    profiles = profile_sides(sides, steps) if args.profile else {}

    # --- report
    stopped = f"; budget of {budget_s:.0f} s reached after {len(blocks)} of {repeats}" if len(blocks) < repeats else ""
    print_header("Inner-step throughput: p2ptrain PathSession vs a plain PyTorch loop", info, [
        f"model: default preset path {path_name(path)}: d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
        f"{len(cfg.grid.levels)} levels x {cfg.grid.blocks_per_level} blocks, vocab 257 (bytes), "
        f"{params:,} parameters; batch {sides.batch} x {sides.context} tokens = "
        f"{sides.batch * sides.context:,} tokens/step; CPU, fp32, same batches on both sides",
        f"optimizer: bitsandbytes AdamW8bit, lr {cfg.inner.lr} (warm-up {cfg.inner.warmup_steps} + cosine), "
        f"betas {tuple(cfg.inner.betas)}, weight decay {cfg.inner.weight_decay} on >=2-D params, "
        f"clip {cfg.inner.grad_clip}",
        f"{corpus_note(args.quick, docs)}; path shard {session.stream.num_docs:,} documents, "
        f"{len(session.stream):,} tokens; setup {setup.wall:.1f} s",
        f"timing: {warmup} untimed step pairs, then {len(blocks)} blocks of {steps} interleaved step pairs "
        f"(order p2ptrain/plain alternates every step{stopped}); ratio = p2ptrain speed / plain speed "
        "= plain step time / p2ptrain step time",
    ])
    print(markdown_table(
        ["block", "p2ptrain tok/s", "plain tok/s", "block ratio (wall)", "median pair ratio (wall)",
         "median pair ratio (CPU)", "loss (last step)", "max abs loss diff"],
        [[i + 1, f"{b['p2ptrain_tps']:,.0f}", f"{b['plain_tps']:,.0f}", f"{r:.3f}",
          f"{statistics.median(b['pair_ratios']):.3f}", f"{statistics.median(b['pair_cpu_ratios']):.3f}",
          f"{b['loss']:.4f}", f"{b['max_abs_loss_diff']:.1e}"]
         for i, (b, r) in enumerate(zip(blocks, block_stats["ratios"]))]))
    print()
    meets = ratio >= TARGET
    print(markdown_table(["metric", "value"], [
        ["p2ptrain tokens/s (median of blocks)", f"{statistics.median(b['p2ptrain_tps'] for b in blocks):,.0f}"],
        ["plain loop tokens/s (median of blocks)", f"{statistics.median(b['plain_tps'] for b in blocks):,.0f}"],
        [f"**ratio p2ptrain/plain, wall (median of {len(pair_ratios)} step pairs)**", f"**{ratio:.3f}**"],
        ["same, CPU time of this process", f"{cpu_ratio:.3f}"],
        [f"block ratios (wall, sums of {steps} steps): median, range",
         f"{block_stats['median_ratio']:.3f}, {block_stats['min_ratio']:.3f} – {block_stats['max_ratio']:.3f}"],
        ["target", f">= {TARGET} ({'met' if meets else 'MISSED'})"],
        ["max abs loss diff, same step and batch", f"{max_loss_diff:.1e}"],
    ]))
    for name, top in profiles.items():
        print(f"\ncProfile, {steps} steps, {name} side (top functions by own time):\n")
        print(markdown_table(["function", "calls", "own s", "cumulative s"],
                             [[f, c, f"{t:.3f}", f"{ct:.3f}"] for f, c, t, ct in top]))
    print()
    write_outputs(__file__, {
        "machine": info, "quick": args.quick, "target": TARGET, "meets_target": meets,
        "config": {"path": list(path), "params": params, "batch_size": sides.batch, "context": sides.context,
                   "steps_per_block": steps, "blocks": len(blocks), "blocks_planned": repeats,
                   "budget_s": budget_s, "warmup_steps": warmup, "docs": len(docs),
                   "shard_tokens": len(session.stream)},
        "blocks": blocks, "ratio_median_of_pairs": ratio, "cpu_ratio_median_of_pairs": cpu_ratio,
        "block_ratios": block_stats["ratios"], "max_abs_loss_diff": max_loss_diff,
        "setup_s": setup.wall, "profiles": {k: [list(row) for row in v] for k, v in profiles.items()},
    }, draw(pair_ratios, pair_cpu_ratios, blocks))


if __name__ == "__main__":
    main()
