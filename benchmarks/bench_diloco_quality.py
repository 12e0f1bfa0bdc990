"""Claim: DiLoCo training reaches about the loss of synchronous data-parallel training at
equal tokens (target: final held-out loss of DiLoCo <= 1.02 x that of data-parallel).

Setup (per seed):
- one path of the default grid's shape (stem + 2 levels of 2 blocks, shrunk to
  d_model 64), as a grid of one module per level, so its path sees every training
  document and is scored on the held-out split;
- DiLoCo: K = 4 simulated workers on that shard, each with its own data stream
  (PathSession data_seed), AdamW8bit inner steps, and every H steps an outer
  Nesterov step with the exact token-weighted mean of the 4 pseudo-gradients;
- synchronous data-parallel (DP): one model whose every step takes a batch K x larger
  (= the averaged gradient of K workers), same inner optimizer and schedule, for the
  same number of steps — the same total tokens. A K x batch usually wants a larger lr,
  so DP also runs with the inner lr x sqrt(K); the ratio is taken against the better
  of the two DP runs of each seed, so DiLoCo is not flattered by an untuned baseline.

Two protocols, both reported:
- warm start (main; the paper's): DiLoCo's workers start from a model pretrained for
  24k of its ~88k steps (27 %). Here the first 50 of 200 steps (25 %) are one DP run at
  the base lr, shared by all methods; from that checkpoint (weights, the AdamW8bit
  state and the schedule's step, so the cosine continues; DP also keeps its data
  stream) DP continues at x1 and x sqrt(K) lr and the K workers continue with fresh
  data streams and zero outer momentum, for the remaining 150 steps. That the x1 DP
  continuation ends exactly at the from-scratch DP loss checks the resume.
- from scratch: every method from the same random init for all 200 steps.
Settings were chosen on seed 0; the reported seeds are 1-3.

Warm-start sweep, seed 0 (DP 2.1843, DP lr x2 2.0982; DiLoCo loss and ratio to DP lr x2):
  inner lr x1: H=10 outer (0.7, mom 0.9) 2.2482 1.071 | H=10 (1.0, 0.5) 2.2285 1.062 |
  H=25 (0.7, 0.9) 2.2797 1.087 | H=25 (1.0, 0.5) 2.2398 1.067 | H=5 (1.0, 0.5) 2.2509 1.073 |
  H=5 (0.7, 0.9) 2.2953 1.094 | H=10 (1.0, 0.0) 2.2723 1.083 | H=10 (1.4, 0.5) 2.3727 1.131;
  inner lr x2: H=10 (1.0, 0.5) 2.1723 1.035 | H=10 (0.7, 0.9) 2.2254 1.061 |
  H=25 (1.0, 0.5) 2.1953 1.046; x2.83: H=10 (1.0, 0.5) 2.1680 1.033 (not taken: DP only
  gets the grid x1, x2, and so do the workers).
The base inner lr is too low for this tiny model: DP gains most from x2, and so do the
DiLoCo workers; their remaining gap is the one explained below, only smaller.

Result (2026-11-24, seeds 1-3, `--jobs 1`, 742 s): the target is missed under both
protocols. Warm start: 1.039 (1.038-1.044) x the better DP run with the tuned
variant, 1.073 with the paper's outer settings; against DP at the base lr the tuned
variant is 0.997 (0.994-0.999), i.e. it beats that DP. From scratch: 1.111 (short-run
fix) and 1.166 (paper's settings). In the warm start the better DP is DP at x2 lr after
the warm-up, which ends below DP at x2 lr from scratch (2.1032 vs 2.1537 on seed 1).
The likely cause (reasoned; no run with larger worker batches isolated it): each
worker's batch is 16 x 64 = 1,024 tokens, far below the critical batch of this
task: the gradient noise is large, and Adam, which divides by the gradient's RMS, then
takes short steps along the true descent direction. DP's 4 x batch cuts that noise at
every step; averaging 4 workers every H steps cancels their noise in the displacement
but cannot recover the progress each noisy worker did not make. The DiLoCo paper's
workers had 512 x 1024-token batches, where a larger batch buys little, so there DiLoCo
matched DP. A warm start probably helps because the early, fast-moving phase — where
the workers' trajectories diverge most within a round — is done by DP. A longer run does
not close the from-scratch gap to a DP run with a sqrt(K) x lr (seed 0, 1000 steps,
H = 25: short-run fix 1.6049, DP 1.5253, DP lr x2 1.4417: 1.05 and 1.11 x), and a
per-worker batch near the critical one would not fit this benchmark's CPU budget.
The simulation applies the swarm's own outer step (ModuleOuterState), so this is the
method's behaviour at this scale, not an artefact of simulating it.

Run: python benchmarks/bench_diloco_quality.py [--quick] [--seeds 1 2 3] [--protocols 'warm start']
(full run: 742 s with --jobs 1 on this 2-core machine; --quick: ~20 s)
"""

from __future__ import annotations

import copy
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
WARM, SCRATCH = "warm start", "from scratch"

# warm_steps: the shared DP warm-up of the main protocol, 50 of 200 steps = 25 % of the run
# (the paper: 24k of ~88k steps, 27 %); eval_every: DP has no rounds, it is scored this often
FULL = dict(d_model=64, n_heads=4, context=64, levels=[1, 1], blocks_per_level=2, batch_size=16,
            steps=200, warm_steps=50, eval_every=25, eval_tokens=65_536, curve_tokens=8_192, seeds=[1, 2, 3])
QUICK = dict(d_model=32, n_heads=2, context=64, levels=[1, 1], blocks_per_level=2, batch_size=8,
             steps=40, warm_steps=10, eval_every=10, eval_tokens=4_096, curve_tokens=2_048, seeds=[0])
QUICK_H = 10  # --quick: every variant's H, so its few steps still hold rounds

# data-parallel baselines: label -> inner lr multiplier (after the warm-up, in the warm-start protocol)
DP_RUNS = {"DP": 1.0, f"DP, lr x{math.sqrt(K):g}": math.sqrt(K)}

VARIANT_FIELDS = ("label", "H", "outer_lr", "outer_momentum", "worker_lr_scale", "why")
# protocol -> [(label, H, outer lr, outer momentum, workers' inner lr multiplier, why)].
# DiLoCo used H = 500 on models of 60M-400M parameters over ~88k steps (~130 rounds after
# its warm start); this run has 200 steps, so H is 10-20 and there are 10-15 outer rounds.
VARIANTS = {
    # chosen on seed 0 (the sweep is in the docstring)
    WARM: [
        ("paper outer: H=10, outer lr 0.7, mom 0.9", 10, 0.7, 0.9, 1.0, "the paper's outer optimizer"),
        (f"tuned: H=10, outer lr 1.0, mom 0.5, inner lr x{math.sqrt(K):g}", 10, 1.0, 0.5, math.sqrt(K),
         f"best on seed 0; the workers get the inner lr grid DP gets (x1, x{math.sqrt(K):g})"),
    ],
    # picked by a one-seed sweep (seed 0, 200 steps) over H in {10, 20, 50}, outer lr in
    # {0.7, 1.0, 1.5, 2.0} and momentum in {0, 0.5, 0.7, 0.9}; larger outer steps than the
    # fix's were all worse there
    SCRATCH: [
        ("paper outer: H=20, outer lr 0.7, mom 0.9", 20, 0.7, 0.9, 1.0, "the paper's outer optimizer"),
        ("short-run fix: H=20, outer lr 1.0, mom 0.5", 20, 1.0, 0.5, 1.0,
         "momentum 0.9 averages over ~10 rounds, i.e. this whole run, and overshoots; the mean of K Adam "
         "trajectories is shorter than one (their noise cancels), so the outer lr should be >= 1"),
    ],
}


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="inner steps per worker = DP steps (overrides the preset)")
    parser.add_argument("--protocols", nargs="+", choices=[WARM, SCRATCH], default=[WARM, SCRATCH],
                        help="which comparisons to run")
    parser.add_argument("--variant", nargs=5, action="append",
                        metavar=("PROTOCOL", "H", "LR", "MOMENTUM", "WORKER_LR_SCALE"),
                        help="replace the preset's DiLoCo variants (repeatable; for sweeps on seed 0)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["steps"] = args.steps or p["steps"]
    seeds = args.seeds or p["seeds"]
    steps, warm, every = p["steps"], p["warm_steps"], p["eval_every"]
    variants = {proto: [(label, QUICK_H if args.quick else H, *rest) for label, H, *rest in VARIANTS[proto]]
                for proto in args.protocols}
    if args.variant:
        variants = {proto: [] for proto in args.protocols}
        for proto, H, lr, mu, scale in args.variant:
            variants[proto].append((f"H={H}, outer lr {lr}, mom {mu}, inner lr x{scale}", int(H), float(lr),
                                    float(mu), float(scale), "--variant"))
    spans = {WARM: steps - warm, SCRATCH: steps}
    if warm % every or steps % every or any(spans[proto] % v[1] for proto in variants for v in variants[proto]):
        parser.error(f"eval_every ({every}) must divide the warm-up and the steps, and every variant's H its span "
                     f"({spans})")
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few steps; its numbers say nothing about the claim"
    print_header(f"DiLoCo ({K} workers) vs synchronous data-parallel at equal tokens", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    batch, context = p["batch_size"], p["context"]
    inner = small_config(0, **model_kwargs(p), steps_per_round=every, rounds=steps // every).inner
    tokens_total = K * steps * batch * context
    print(f"- budget: {steps} inner steps per worker x {K} workers x {batch} x {context} tokens = {tokens_total:,} "
          f"tokens; DP: {steps} steps of {K * batch} x {context} (the same tokens)")
    print(f"- **{WARM}** (the DiLoCo paper's protocol, main comparison): the first {warm} of the {steps} steps "
          f"({warm / steps:.0%}; the paper: 24k of ~88k, 27 %) are one DP run at the base lr, shared; from its "
          f"checkpoint — weights, AdamW8bit state, schedule step; DP also its data stream — DP continues "
          f"(at the base lr and at x{math.sqrt(K):g}) and {K} DiLoCo workers continue (fresh data streams "
          f"1..{K}, outer momentum 0) for the remaining {steps - warm} steps. The warm-up is computed once per "
          f"seed and process (it is deterministic)")
    print(f"- **{SCRATCH}**: every method from the same random init for all {steps} steps")
    print(f"- inner (all): AdamW8bit, lr {inner.lr:g} (DP also {inner.lr * math.sqrt(K):g}), {inner.warmup_steps} "
          f"warm-up steps, cosine to {inner.min_lr_ratio:g} x lr over the {steps} steps, clip {inner.grad_clip:g}")
    print(f"- seeds: {seeds} (run.seed: initialisation and data order; settings were chosen on seed 0); "
          f"corpus: {len(docs)} documents")

    jobs = [(p, seed, proto, label, H, lr, mu, scale) for proto in variants for seed in seeds
            for label, H, lr, mu, scale, _ in variants[proto]]
    # a DP run costs less than a K-worker run: last, so parallel processes finish together
    jobs += [(p, seed, proto, label, every, 0.0, 0.0, lr_scale) for proto in variants for seed in seeds
             for label, lr_scale in DP_RUNS.items()]
    print(f"- {len(jobs)} training runs in {min(args.jobs, len(jobs))} parallel processes\n", flush=True)
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(f"({job[2]}, seed {job[1]}, {job[3]}: loss {out['loss']:.4f}, "
                                                      f"done at {time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(job[2], job[1], job[3]): out for job, out in zip(jobs, outputs)}
    sizes = by_job[(next(iter(variants)), seeds[0], "DP")]["sizes"]

    # ------------------------------------------------------------------ report
    print("\n### Model and data\n")
    print(markdown_table(["what", "value"], [
        ("model (one path: stem + 2 levels x 2 blocks)", f"{sizes['path_params']:,} parameters, d_model "
                                                         f"{p['d_model']}, context {context}"),
        ("training tokens in the shard", f"{sizes['train_tokens']:,}"),
        ("held-out tokens scored", f"{sizes['heldout_tokens_scored']:,}"),
        ("tokens trained on, each method (warm start: incl. the shared warm-up)", f"{tokens_total:,}"),
    ]))
    results, summaries, series = {}, {}, {}
    for proto, vs in variants.items():
        results[proto], summaries[proto] = report(proto, vs, seeds, by_job, steps - (warm if proto == WARM else 0))
        curves = [{label: by_job[(proto, seed, label)]["curve"] for label in [*DP_RUNS, *(v[0] for v in vs)]}
                  for seed in seeds]
        for label in curves[0]:
            xs = curves[0][label][0]
            series[f"{proto}: {label}"] = (xs, [median([c[label][1][i] for c in curves]) for i in range(len(xs))])

    print()
    for proto, vs in variants.items():
        summary = summaries[proto]
        best = min(vs, key=lambda v: summary[f"ratio {v[0]}"])
        print(f"Result, {proto}: best variant '{best[0]}' ends at {summary[f'ratio {best[0]}']:.3f} x the loss of "
              f"the better DP run ({summary[f'ratio to same-lr DP {best[0]}']:.3f} x DP at the base inner lr); "
              f"target <= {TARGET}: {'met' if summary[f'ratio {best[0]}'] <= TARGET else 'missed'}.")

    # ------------------------------------------------------------------ files
    png = plot_curves(NAME, series, "tokens trained on (all workers)", "held-out loss (nats/token)",
                      f"DiLoCo (K={K}) vs data-parallel, median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    out = write_json(NAME, {"machine": info, "params": p, "K": K, "target": TARGET, "seeds": seeds,
                            "dp_lr_scales": DP_RUNS,
                            "variants": {proto: [dict(zip(VARIANT_FIELDS, v)) for v in vs]
                                         for proto, vs in variants.items()},
                            "sizes": sizes, "results": results, "median": summaries,
                            "curves": {proto: {seed: {label: run["curve"] for (pr, s, label), run in by_job.items()
                                                      if pr == proto and s == seed} for seed in seeds}
                                       for proto in variants},
                            "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def report(proto: str, variants: list, seeds: list[int], by_job: dict, span: int) -> tuple[list[dict], dict]:
    """Prints one protocol's tables; returns its per-seed rows and their medians."""
    labels = [label for label, *_ in variants]
    results = []
    for seed in seeds:
        row = {"seed": seed, **{label: by_job[(proto, seed, label)]["loss"] for label in [*DP_RUNS, *labels]}}
        row["best DP"] = min(row[label] for label in DP_RUNS)
        for label in labels:
            row[f"ratio {label}"] = row[label] / row["best DP"]
            row[f"ratio to same-lr DP {label}"] = row[label] / row["DP"]
        results.append(row)
    summary = {k: median([r[k] for r in results]) for k in results[0] if k != "seed"}
    print(f"\n### {proto[0].upper() + proto[1:]}: final held-out loss (nats per byte-token); "
          f"ratio = DiLoCo / best DP of the seed\n")
    headers = ["seed", *[f"{label} loss" for label in DP_RUNS]] + [f"{label}: loss (ratio)" for label in labels]
    rows = [[r["seed"], *[fmt(r[label]) for label in DP_RUNS]]
            + [f"{fmt(r[label])} ({fmt(r[f'ratio {label}'], 3)})" for label in labels] for r in results]
    rows.append(["**median**", *[fmt(summary[label]) for label in DP_RUNS]]
                + [f"{fmt(summary[label])} (**{fmt(summary[f'ratio {label}'], 3)}**)" for label in labels])
    print(markdown_table(headers, rows))
    print(f"\n### {proto[0].upper() + proto[1:]}: variants\n")
    print(markdown_table(["variant", "H", "outer rounds", "outer lr", "outer momentum", "worker inner lr",
                          "median ratio to DP at the base inner lr", "median ratio to best DP", f"<= {TARGET}?", "why"],
                         [(label, H, span // H, lr, mu, f"x{scale:g}", fmt(summary[f"ratio to same-lr DP {label}"], 3),
                           fmt(summary[f"ratio {label}"], 3), "yes" if summary[f"ratio {label}"] <= TARGET else "no",
                           why) for label, H, lr, mu, scale, why in variants]))
    return results, summary


def model_kwargs(p: dict) -> dict:
    return {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level", "batch_size")}


def base_state(p: dict, seed: int, outer_lr: float | None = None, momentum: float | None = None) -> RunState:
    """The run of a seed; every run's schedule spans the same p['steps'] inner steps."""
    cfg = small_config(seed, **model_kwargs(p), steps_per_round=p["eval_every"], rounds=p["steps"] // p["eval_every"],
                       outer_lr=outer_lr, outer_momentum=momentum)
    return RunState.create(cfg, load_corpus())


def dp_state(state: RunState, p: dict, lr_scale: float = 1.0) -> RunState:
    """One model, K x the batch: the averaged gradient of K workers at every step."""
    return with_config(state, inner={"batch_size": K * p["batch_size"], "lr": state.config.inner.lr * lr_scale})


_WARM_CACHE: dict = {}


def warm_checkpoint(p: dict, seed: int) -> dict:
    """The shared warm-up: p['warm_steps'] DP steps at the base lr from the seed's init.
    Computed once per (seed, preset) in this process; deterministic, so every process
    that computes it gets the same weights."""
    key = (seed, repr(sorted(p.items())))
    if key not in _WARM_CACHE:
        docs = load_corpus()
        state = base_state(p, seed)
        path = (0,) * len(state.config.grid.levels)
        session = make_session(dp_state(state, p), path, docs)
        curve_held = heldout_sequences(state, docs, p["curve_tokens"])[path]
        xs, ys = [], []
        for step in range(p["eval_every"], p["warm_steps"] + 1, p["eval_every"]):
            session.inner_steps(p["eval_every"], log_every=p["eval_every"])
            xs.append(step * K * p["batch_size"] * p["context"])
            ys.append(loss_of(session.model, curve_held, p["context"]))
        _WARM_CACHE[key] = {"model": copy.deepcopy(session.model.state_dict()),
                            "optimizer": copy.deepcopy(session.inner.optimizer.state_dict()),
                            "step": session.inner.step_count, "generator": session.generator.get_state(),
                            "curve": (xs, ys)}
    return _WARM_CACHE[key]


def resume(session, ckpt: dict, data_stream: bool) -> None:
    """Continue session from the warm-up checkpoint: weights (local and global), inner
    optimizer state, schedule step, and (data_stream) the warm-up's data order."""
    session.model.load_state_dict(ckpt["model"])
    session.inner.optimizer.load_state_dict(copy.deepcopy(ckpt["optimizer"]))
    session.inner.step_count = ckpt["step"]
    if data_stream:
        session.generator.set_state(ckpt["generator"])
    session.make_local_global()


def train_and_score(p: dict, seed: int, proto: str, label: str, H: int, outer_lr: float, momentum: float,
                    lr_scale: float) -> dict:
    """One run: a DP baseline (label in DP_RUNS) or DiLoCo with K workers; final and per-round losses."""
    docs = load_corpus()
    steps, batch, context = p["steps"], p["batch_size"], p["context"]
    state = base_state(p, seed, outer_lr, momentum)
    path = (0,) * len(state.config.grid.levels)
    held = heldout_sequences(state, docs, p["eval_tokens"])[path]
    curve_held = heldout_sequences(state, docs, p["curve_tokens"])[path]
    ckpt = warm_checkpoint(p, seed) if proto == WARM else None
    start = p["warm_steps"] if ckpt else 0
    xs, ys = list(ckpt["curve"][0]) if ckpt else [], list(ckpt["curve"][1]) if ckpt else []
    out = {}

    def point(step: int, model) -> None:
        xs.append(step * K * batch * context)
        ys.append(loss_of(model, curve_held, context))

    if label in DP_RUNS:
        session = make_session(dp_state(state, p, lr_scale), path, docs)
        if ckpt:
            resume(session, ckpt, data_stream=True)
        for step in range(start + H, steps + 1, H):
            session.inner_steps(H, log_every=H)
            point(step, session.model)
        model = session.model
        out["sizes"] = {"path_params": param_count(model), "train_tokens": len(session.stream),
                        "heldout_tokens_scored": score(model, held, context)[1]}
    else:
        # after a warm start the workers draw fresh streams (1..K), not the warm-up's (0)
        state = with_config(state, inner={"lr": state.config.inner.lr * lr_scale})
        sessions = [make_session(state, path, docs, data_seed=k + (1 if ckpt else 0)) for k in range(K)]
        for session in sessions if ckpt else []:
            resume(session, ckpt, data_stream=False)
        swarm = SimulatedSwarm(sessions)
        for step in range(start + H, steps + 1, H):
            swarm.round(H)
            point(step, swarm.sessions[0].model)
        model = swarm.sessions[0].model  # after the last outer step: the global weights
    out.update(loss=loss_of(model, held, context), curve=(xs, ys))
    return out


def loss_of(model, sequences, context: int) -> float:
    total, count = score(model, sequences, context)
    return total / count


if __name__ == "__main__":
    main()
