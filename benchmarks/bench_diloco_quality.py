"""Claim: DiLoCo training reaches about the loss of synchronous data-parallel training at
equal tokens (target: final held-out loss of DiLoCo <= 1.02 x that of data-parallel).

Setup (per seed):
- one path of the default grid's shape (stem + 2 levels of 2 blocks, shrunk to
  d_model 64), as a grid of one module per level, so its path sees every training
  document and is scored on the held-out split;
- DiLoCo: K = 4 simulated workers on that shard, each with its own data stream
  (PathSession data_seed 0..3), AdamW8bit inner steps, and every H steps an outer
  Nesterov step with the exact token-weighted mean of the 4 pseudo-gradients;
- synchronous data-parallel (DP): one model whose every step takes a batch K x larger
  (= the averaged gradient of K workers), same inner optimizer and schedule, for the
  same number of steps — the same total tokens. A K x batch usually wants a larger lr,
  so DP also runs with the inner lr x sqrt(K); the ratio is taken against the better
  of the two DP runs of each seed, so DiLoCo is not flattered by an untuned baseline.
Variants: the DiLoCo paper's outer settings, then a fix for a run this short (see
VARIANTS); both are reported. The fix was chosen on seed 0; the reported seeds are 1-3.

Why DiLoCo misses the target here (3 seeds, 200 steps: 1.11-1.17 x the better DP run).
The likely cause (reasoned; no run with larger worker batches isolated it): each
worker's batch is 16 x 64 = 1,024 tokens, far below the critical batch of this
task: the gradient noise is large, and Adam, which divides by the gradient's RMS, then
takes short steps along the true descent direction. DP's 4 x batch cuts that noise at
every step; averaging 4 workers every H steps cancels their noise in the displacement
but cannot recover the progress each noisy worker did not make. The DiLoCo paper's
workers had 512 x 1024-token batches, where a larger batch buys little, so there DiLoCo
matched DP. A longer run does not close the gap to a DP run with a sqrt(K) x lr (seed 0,
1000 steps, H = 25: short-run fix 1.6049, DP 1.5253, DP lr x2 1.4417: 1.05 and 1.11 x),
and a per-worker batch near the critical one would not fit this benchmark's CPU budget.
The simulation applies the swarm's own outer step (ModuleOuterState), so this is the
method's behaviour at this scale, not an artefact of simulating it.

Run: python benchmarks/bench_diloco_quality.py [--quick] [--seeds 1 2 3]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_common import (REPO, RunState, SimulatedSwarm, base_parser, fmt,  # noqa: E402
                            heldout_sequences, load_corpus, machine_info, make_session, markdown_table, median,
                            param_count, plot_curves, print_header, run_jobs, score, small_config, with_config,
                            write_json)

NAME = "bench_diloco_quality"
TARGET = 1.02
K = 4
H_DP = 20  # DP has no rounds; it is scored every H_DP steps for the curve

FULL = dict(d_model=64, n_heads=4, context=64, levels=[1, 1], blocks_per_level=2, batch_size=16,
            steps=200, eval_tokens=65_536, curve_tokens=8_192, seeds=[1, 2, 3])
QUICK = dict(d_model=32, n_heads=2, context=64, levels=[1, 1], blocks_per_level=2, batch_size=8,
             steps=40, eval_tokens=4_096, curve_tokens=2_048, seeds=[0])

# data-parallel baselines: label -> inner lr multiplier
DP_RUNS = {"DP": 1.0, f"DP, lr x{math.sqrt(K):g}": math.sqrt(K)}

# (label, H, outer lr, outer momentum, why). DiLoCo used H = 500 on models of 60M-400M
# parameters over ~88k steps (~180 rounds); this run has 200 steps, so H is 20 and there
# are only 10 outer rounds. The fix was picked by a one-seed sweep (seed 0, 200 steps)
# over H in {10, 20, 50}, outer lr in {0.7, 1.0, 1.5, 2.0} and momentum in
# {0, 0.5, 0.7, 0.9}; larger outer steps than the fix's were all worse there.
VARIANTS = [
    ("DiLoCo paper: H=20, outer lr 0.7, mom 0.9", 20, 0.7, 0.9,
     "the paper's outer optimizer"),
    ("short-run fix: H=20, outer lr 1.0, mom 0.5", 20, 1.0, 0.5,
     "momentum 0.9 averages over ~10 rounds, i.e. this whole run, and overshoots; the mean of K Adam "
     "trajectories is shorter than one (their noise cancels), so the outer lr should be >= 1"),
]


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="inner steps per worker = DP steps (overrides the preset)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["steps"] = args.steps or p["steps"]
    seeds = args.seeds or p["seeds"]
    variants = [(label, min(H, p["steps"] // 2) if args.quick else H, lr, mu, why)
                for label, H, lr, mu, why in VARIANTS]
    if any(p["steps"] % H for H in [H_DP] + [v[1] for v in variants]):
        parser.error(f"--steps must be a multiple of every variant's H and of {H_DP}, so all spans are equal")
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few steps; its numbers say nothing about the claim"
    print_header(f"DiLoCo ({K} workers) vs synchronous data-parallel at equal tokens", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    steps, batch, context = p["steps"], p["batch_size"], p["context"]
    inner = small_config(0, **model_kwargs(p), steps_per_round=H_DP, rounds=max(steps // H_DP, 1)).inner
    tokens_total = K * steps * batch * context
    print(f"- budget: {steps} inner steps per worker x {K} workers x {batch} x {context} tokens = {tokens_total:,} "
          f"tokens; DP: {steps} steps of {K * batch} x {context} (the same tokens)")
    print(f"- inner (all): AdamW8bit, lr {inner.lr:g} (DP also {inner.lr * math.sqrt(K):g}), {inner.warmup_steps} "
          f"warm-up steps, cosine to {inner.min_lr_ratio:g} x lr over the {steps} steps, clip {inner.grad_clip:g}")
    print(f"- seeds: {seeds} (run.seed: initialisation and data order; the fix was chosen on seed 0); "
          f"corpus: {len(docs)} documents")

    labels = [label for label, *_ in variants]
    jobs = [(p, seed, label, H, lr, mu, 1.0) for seed in seeds for label, H, lr, mu, _ in variants]
    # a DP run costs ~1/K of a K-worker run: last, so the processes finish together
    jobs += [(p, seed, label, H_DP, 0.0, 0.0, lr_scale) for seed in seeds for label, lr_scale in DP_RUNS.items()]
    print(f"- {len(jobs)} training runs in {min(args.jobs, len(jobs))} parallel processes\n", flush=True)
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(f"(seed {job[1]}, {job[2]}: loss {out['loss']:.4f}, done at "
                                                      f"{time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(job[1], job[2]): out for job, out in zip(jobs, outputs)}
    sizes = by_job[(seeds[0], "DP")]["sizes"]
    results, curves = [], []
    for seed in seeds:
        row = {"seed": seed, **{label: by_job[(seed, label)]["loss"] for label in [*DP_RUNS, *labels]}}
        row["best DP"] = min(row[label] for label in DP_RUNS)
        for label in labels:
            row[f"ratio {label}"] = row[label] / row["best DP"]
            row[f"ratio to same-lr DP {label}"] = row[label] / row["DP"]
        results.append(row)
        curves.append({label: by_job[(seed, label)]["curve"] for label in [*DP_RUNS, *labels]})

    # ------------------------------------------------------------------ report
    print("\n### Model and data\n")
    print(markdown_table(["what", "value"], [
        ("model (one path: stem + 2 levels x 2 blocks)", f"{sizes['path_params']:,} parameters, d_model "
                                                         f"{p['d_model']}, context {context}"),
        ("training tokens in the shard", f"{sizes['train_tokens']:,}"),
        ("held-out tokens scored", f"{sizes['heldout_tokens_scored']:,}"),
        ("tokens trained on, each method", f"{tokens_total:,}"),
    ]))
    print("\n### Final held-out loss (nats per byte-token); ratio = DiLoCo / best DP of the seed\n")
    headers = ["seed", *[f"{label} loss" for label in DP_RUNS]] + [f"{label}: loss (ratio)" for label in labels]
    rows = [[r["seed"], *[fmt(r[label]) for label in DP_RUNS]]
            + [f"{fmt(r[label])} ({fmt(r[f'ratio {label}'], 3)})" for label in labels] for r in results]
    summary = {k: median([r[k] for r in results]) for k in results[0] if k != "seed"}
    rows.append(["**median**", *[fmt(summary[label]) for label in DP_RUNS]]
                + [f"{fmt(summary[label])} (**{fmt(summary[f'ratio {label}'], 3)}**)" for label in labels])
    print(markdown_table(headers, rows))
    print("\n### Variants\n")
    print(markdown_table(["variant", "H", "outer rounds", "outer lr", "outer momentum", "median ratio to DP at the "
                          "same inner lr", "median ratio to best DP", f"<= {TARGET}?", "why"],
                         [(label, H, steps // H, lr, mu, fmt(summary[f"ratio to same-lr DP {label}"], 3),
                           fmt(summary[f"ratio {label}"], 3), "yes" if summary[f"ratio {label}"] <= TARGET else "no",
                           why) for label, H, lr, mu, why in variants]))
    paper = summary[f"ratio {variants[0][0]}"]
    best = min(variants, key=lambda v: summary[f"ratio {v[0]}"])
    print(f"\nResult: with the paper's outer settings DiLoCo ends at {paper:.3f} x the loss of the better DP run "
          f"(target <= {TARGET}: {'met' if paper <= TARGET else 'missed'}; "
          f"{summary[f'ratio to same-lr DP {variants[0][0]}']:.3f} x DP at the same inner lr); best variant "
          f"'{best[0]}' at {summary[f'ratio {best[0]}']:.3f} x the better DP run."
          + ("" if paper <= TARGET else " Why it is missed: see this script's docstring."))

    # ------------------------------------------------------------------ files
    series = {label: (curves[0][label][0], [median([c[label][1][i] for c in curves])
                                            for i in range(len(curves[0][label][1]))])
              for label in [*DP_RUNS, *labels]}
    png = plot_curves(NAME, series, "tokens trained on (all workers)", "held-out loss (nats/token)",
                      f"DiLoCo (K={K}) vs data-parallel, median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    out = write_json(NAME, {"machine": info, "params": p, "K": K, "target": TARGET, "seeds": seeds,
                            "dp_lr_scales": DP_RUNS,
                            "variants": [dict(zip(("label", "H", "outer_lr", "outer_momentum", "why"), v))
                                         for v in variants],
                            "sizes": sizes, "results": results, "median": summary, "curves": curves,
                            "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def model_kwargs(p: dict) -> dict:
    return {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level", "batch_size")}


def train_and_score(p: dict, seed: int, label: str, H: int, outer_lr: float, momentum: float,
                    lr_scale: float) -> dict:
    """One run: a DP baseline (label in DP_RUNS) or DiLoCo with K workers; final and per-round losses."""
    docs = load_corpus()
    steps, batch, context = p["steps"], p["batch_size"], p["context"]
    cfg = small_config(seed, **model_kwargs(p), steps_per_round=H, rounds=steps // H,
                       outer_lr=outer_lr, outer_momentum=momentum)
    state = RunState.create(cfg, docs)
    path = (0,) * len(cfg.grid.levels)
    held = heldout_sequences(state, docs, p["eval_tokens"])[path]
    curve_held = heldout_sequences(state, docs, p["curve_tokens"])[path]
    xs, ys, out = [], [], {}
    if label in DP_RUNS:
        # one model, K x the batch: the averaged gradient of K workers at every step
        session = make_session(with_config(state, inner={"batch_size": K * batch, "lr": cfg.inner.lr * lr_scale}),
                               path, docs)
        for r in range(steps // H):
            session.inner_steps(H, log_every=H)
            xs.append((r + 1) * H * K * batch * context)
            ys.append(loss_of(session.model, curve_held, context))
        model = session.model
        out["sizes"] = {"path_params": param_count(model), "train_tokens": len(session.stream),
                        "heldout_tokens_scored": score(model, held, context)[1]}
    else:
        swarm = SimulatedSwarm([make_session(state, path, docs, data_seed=k) for k in range(K)])
        for r in range(steps // H):
            swarm.round(H)
            xs.append((r + 1) * H * K * batch * context)
            ys.append(loss_of(swarm.sessions[0].model, curve_held, context))
        model = swarm.sessions[0].model  # after the last outer step: the global weights
    out.update(loss=loss_of(model, held, context), curve=(xs, ys))
    return out


def loss_of(model, sequences, context: int) -> float:
    total, count = score(model, sequences, context)
    return total / count


if __name__ == "__main__":
    main()
