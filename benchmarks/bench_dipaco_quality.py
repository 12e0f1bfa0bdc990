"""Claim: the routed mixture of paths (DiPaCo) beats one dense model of one path's size
at equal per-path compute. DiPaCo (Douillard et al., 2024) reports held-out perplexity
12.39 for the mixture vs 16.09 for the dense model: a ratio of 0.77.

Setup (per seed):
- the default corpus, a 2x2 grid of a shrunk default preset, the router fitted by
  RunState.create;
- mixture: one simulated worker per path, each training its path on its routed shard
  with AdamW8bit inner steps (PathSession); every H steps each module takes an outer
  Nesterov step (OUTER) with the token-weighted mean of the pseudo-gradients of exactly
  the workers whose path holds it (the stem: all 4; a level module: 2), and every
  worker continues from its modules' new global weights;
- dense: the same PathModel shape (a grid of one module per level, so its one path sees
  ALL training documents), trained for the same steps, batch, optimizer and schedule as
  ONE path worker — equal per-path compute;
- dense+outer: the dense model also taking the same outer step as a lone worker. The
  outer step alone changes the loss (it is a lookahead optimizer), so mixture vs
  dense+outer isolates what routing and specialisation add;
- evaluation: every held-out document is routed; the mixture scores it with its path,
  the dense models score the very same documents (evaluate.document_loss).

Budget and outer step, chosen on seed 0 (the reported seeds are 1-3):
- 40 rounds of H = 25 (1000 inner steps per path). With 10 rounds (200 steps) the dense
  model was ahead (ratio 1.05): specialisation only pays once a path has learnt what all
  shards share, and the outer momentum needs many rounds to settle;
- outer lr 1.0, momentum 0.5 instead of DiLoCo's 0.7 / 0.9 (tuned for H = 500 over ~180
  rounds). At H = 25 the paper's step made even a lone dense worker worse (loss 1.902 vs
  1.817 without it): momentum 0.9 extrapolates ~lr/(1-mu) = 7x the averaged pseudo-
  gradient and keeps pushing after the cosine schedule has slowed the inner steps. With
  lr 1.0 and no momentum a lone worker's outer step is the identity (it adopts its own
  weights) and a shared module becomes the average of its holders; momentum 0.5 adds a
  mild 2x extrapolation. Seed 0, 1000 steps: mixture / dense 0.992 with 0.7 / 0.9, 0.890
  with 1.0 / 0.5.

Run: python benchmarks/bench_dipaco_quality.py [--quick] [--seeds 1 2 3]
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

from p2ptrain.model.grid import Grid, path_name  # noqa: E402

NAME = "bench_dipaco_quality"
PAPER_RATIO = 12.39 / 16.09  # DiPaCo: mixture vs dense of one path's size

# the shrunk default preset: a 2x2 grid, 2 blocks per level, d_model 64 — ~40-50 ms per
# inner step on one core, so one seed (6 models' worth of 1000 steps) takes ~4-5 CPU minutes;
# the 3-seed run took 26 min of wall time with --jobs 1 on a shared machine loaded 5-30
FULL = dict(d_model=64, n_heads=4, context=64, levels=[2, 2], blocks_per_level=2, batch_size=16,
            steps_per_round=25, rounds=40, eval_tokens=32_768, curve_tokens=4_096, seeds=[1, 2, 3])
QUICK = dict(d_model=32, n_heads=2, context=64, levels=[2, 2], blocks_per_level=2, batch_size=8,
             steps_per_round=10, rounds=3, eval_tokens=4_096, curve_tokens=2_048, seeds=[0])
OUTER = (1.0, 0.5)  # outer lr and Nesterov momentum; why not DiLoCo's 0.7 / 0.9: see the docstring

# label -> (routed mixture?, takes the outer step?)
RUNS = {
    "mixture": (True, True),
    "dense": (False, False),
    "dense+outer": (False, True),
}
# (numerator, denominator, what it measures)
RATIOS = [
    ("mixture", "dense", "**the claim**: mixture vs dense of one path's size"),
    ("mixture", "dense+outer", "routing alone: both take the same outer step"),
    ("dense+outer", "dense", "the outer step alone, no routing"),
]


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="outer rounds (overrides the preset)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["rounds"] = args.rounds or p["rounds"]
    seeds = args.seeds or p["seeds"]
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few steps; its numbers say nothing about the claim"
    print_header("DiPaCo: routed mixture vs dense model of one path's size (equal per-path compute)", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    H, rounds, context = p["steps_per_round"], p["rounds"], p["context"]
    steps = H * rounds
    inner = small_config(0, **model_kwargs(p)).inner
    print(f"- budget: {rounds} rounds x H={H} inner steps = {steps} steps of {p['batch_size']} x {context} tokens "
          f"per path worker ({steps * p['batch_size'] * context:,} tokens); each dense model gets the same")
    print(f"- inner: AdamW8bit, lr {inner.lr:g}, {inner.warmup_steps} warm-up steps, cosine to "
          f"{inner.min_lr_ratio:g} x lr over the run; outer: Nesterov, lr {OUTER[0]}, momentum {OUTER[1]} "
          f"(DiLoCo: 0.7 / 0.9; why: see the docstring)")
    print(f"- seeds: {seeds} (run.seed: initialisation, router fit, data order; settings were chosen on seed 0); "
          f"corpus: {len(docs)} documents")
    n_runs = len(seeds) * len(RUNS)
    print(f"- {n_runs} training runs ({len(RUNS)} per seed) in {min(args.jobs, n_runs)} parallel processes\n",
          flush=True)

    # a mixture costs 4x a dense run: start them first so the processes finish together
    jobs = sorted(((p, seed, label) for seed in seeds for label in RUNS), key=lambda j: not RUNS[j[2]][0])
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(f"(seed {job[1]}, {job[2]}: loss {out['loss']:.4f}, "
                                                      f"done at {time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(job[1], job[2]): out for job, out in zip(jobs, outputs)}
    sizes = {**by_job[(seeds[0], "mixture")]["sizes"], **by_job[(seeds[0], "dense")]["sizes"]}
    results, curves = [], []
    for seed in seeds:
        row = {"seed": seed}
        curve = {"steps": [H * (r + 1) for r in range(rounds)]}
        for label in RUNS:
            out = by_job[(seed, label)]
            row[label], row[f"per_path {label}"], curve[label] = out["loss"], out["per_path"], out["curve"]
        for num, den, _ in RATIOS:
            row[f"{num} / {den}"] = math.exp(row[num] - row[den])  # perplexity ratio
        results.append(row)
        curves.append(curve)
    grid = Grid.from_config(small_config(0, **model_kwargs(p)).grid)

    # ------------------------------------------------------------------ report
    print("\n### Model sizes (parameters)\n")
    print(markdown_table(["what", "parameters"], [
        *[(f"module {m}", f"{n:,}") for m, n in sizes["modules"].items()],
        ("one path (stem + one module per level)", f"{sizes['path_params']:,}"),
        (f"whole mixture ({len(sizes['modules'])} modules, {sizes['paths']} paths)", f"{sizes['mixture_params']:,}"),
        ("dense model (one path's shape)", f"{sizes['dense_params']:,}"),
    ]))
    print(f"\n### Data (seed {seeds[0]} router): training shards and held-out documents scored\n")
    print(markdown_table(["path", "train docs", "train tokens", "held-out docs", "held-out tokens scored"],
                         [(k, sizes["shard_docs"][k], f"{sizes['shard_tokens'][k]:,}", sizes["heldout_docs"][k],
                           f"{sizes['heldout_tokens'][k]:,}") for k in sizes["shard_tokens"]]
                         + [("dense (all)", sizes["dense_train_docs"], f"{sizes['dense_train_tokens']:,}",
                             sum(sizes["heldout_docs"].values()), f"{sum(sizes['heldout_tokens'].values()):,}")]))

    summary = {k: median([r[k] for r in results]) for k in results[0] if k != "seed" and not k.startswith("per_path")}
    print("\n### Held-out loss, nats per byte-token (routed docs; the dense models score the same docs)\n")
    print(markdown_table(["model", "outer step", *[f"seed {s}" for s in seeds], "median", "median ppl"],
                         [(label, f"lr {OUTER[0]}, mom {OUTER[1]}" if outer else "none",
                           *[fmt(r[label]) for r in results], f"**{fmt(summary[label])}**",
                           fmt(math.exp(summary[label]), 3))
                          for label, (_, outer) in RUNS.items()]))
    print("\n### Perplexity ratios (< 1: the numerator is better)\n")
    print(markdown_table(["ratio", "measures", *[f"seed {s}" for s in seeds], "median"],
                         [(f"{num} / {den}", what, *[fmt(r[f"{num} / {den}"], 3) for r in results],
                           f"**{fmt(summary[f'{num} / {den}'], 3)}**") for num, den, what in RATIOS]))
    print(f"\n### Per path (seed {seeds[0]}): loss on each path's routed held-out docs\n")
    print(markdown_table(["path", *RUNS], [(path_name(path), *[fmt(results[0][f"per_path {label}"][path_name(path)])
                                                                for label in RUNS]) for path in grid.paths()]))

    claim = summary["mixture / dense"]
    wins = sum(r["mixture / dense"] < 1 for r in results)
    print(f"\nResult: the mixture {'beats' if claim < 1 else 'does not beat'} the dense model: median perplexity "
          f"ratio {claim:.3f}, better on {wins} of {len(results)} seeds (DiPaCo paper: {PAPER_RATIO:.2f}, with "
          f"256 paths of 150M parameters; perplexity here is per byte, not per subword). Routing alone (both with "
          f"the outer step): {summary['mixture / dense+outer']:.3f}.")

    # ------------------------------------------------------------------ files
    medians = {k: [median([c[k][i] for c in curves]) for i in range(rounds)] for k in RUNS}
    png = plot_curves(NAME, {k: (curves[0]["steps"], v) for k, v in medians.items()},
                      "inner steps per worker (= per-path compute)", "held-out loss (nats/token)",
                      f"DiPaCo mixture vs dense, median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    out = write_json(NAME, {"machine": info, "params": p, "seeds": seeds, "sizes": sizes, "outer": OUTER,
                            "runs": {k: {"routed": v[0], "outer_step": v[1]} for k, v in RUNS.items()},
                            "results": results, "median": summary, "curves": curves, "paper_ratio": PAPER_RATIO,
                            "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def model_kwargs(p: dict) -> dict:
    return {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level",
                              "batch_size", "steps_per_round", "rounds")}


def train_and_score(p: dict, seed: int, label: str) -> dict:
    """One training run of RUNS[label] for one seed: final and per-round held-out losses."""
    routed, outer_step = RUNS[label]
    docs = load_corpus()
    model_kw = model_kwargs(p)
    H, rounds, context = p["steps_per_round"], p["rounds"], p["context"]
    state = RunState.create(small_config(seed, **model_kw), docs)  # fits the router on this seed
    grid = state.grid
    held = heldout_sequences(state, docs, p["eval_tokens"])
    curve_held = heldout_sequences(state, docs, p["curve_tokens"])
    if not routed:
        # a grid of one module per level: the same PathModel shape (and init), and its one
        # path gets every training document
        state = RunState.create(small_config(seed, **{**model_kw, "levels": [1] * len(p["levels"])}), docs)
    state = with_config(state, outer={"lr": OUTER[0], "momentum": OUTER[1]})  # used only if outer_step
    sessions = [make_session(state, path, docs) for path in state.grid.paths()]
    swarm = SimulatedSwarm(sessions)
    # each held-out doc is scored by its routed path; the dense model scores all of them
    models = {s.path: s.model for s in sessions} if routed else {path: sessions[0].model for path in grid.paths()}

    def routed_loss(sequences: dict) -> tuple[float, dict]:
        per_path = {path: score(models[path], seqs, context) for path, seqs in sequences.items()}
        return sum(t for t, _ in per_path.values()) / sum(c for _, c in per_path.values()), per_path

    curve = []
    for _ in range(rounds):
        if outer_step:
            swarm.round(H)
        else:  # the plain dense baseline: inner optimizer only
            sessions[0].inner_steps(H, log_every=H)
        curve.append(routed_loss(curve_held)[0])
    loss, per_path = routed_loss(held)  # after the last outer step: the modules' global weights
    out = {"loss": loss, "curve": curve, "per_path": {path_name(k): t / max(c, 1) for k, (t, c) in per_path.items()}}
    if label == "mixture":
        out["sizes"] = model_sizes(sessions, grid)
        out["sizes"].update(shard_docs={path_name(s.path): s.stream.num_docs for s in sessions},
                            shard_tokens={path_name(s.path): len(s.stream) for s in sessions},
                            heldout_docs={path_name(k): len(v) for k, v in held.items()},
                            heldout_tokens={path_name(k): c for k, (_, c) in per_path.items()})
    elif label == "dense":
        out["sizes"] = {"dense_params": param_count(sessions[0].model), "dense_train_docs": sessions[0].stream.num_docs,
                        "dense_train_tokens": len(sessions[0].stream)}
    return out


def model_sizes(sessions, grid) -> dict:
    modules = {}
    for session in sessions:
        for module_id, module in session.model.parts().items():
            modules.setdefault(module_id, param_count(module))
    modules = {m: modules[m] for m in grid.all_modules()}
    return {"modules": modules, "paths": grid.num_paths, "path_params": param_count(sessions[0].model),
            "mixture_params": sum(modules.values())}


if __name__ == "__main__":
    main()
