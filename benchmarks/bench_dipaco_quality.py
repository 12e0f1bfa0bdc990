"""Claim: the routed mixture of paths (DiPaCo) beats one dense model of one path's size
at equal per-path compute. DiPaCo (Douillard et al., 2024) reports held-out perplexity
12.39 for the mixture vs 16.09 for the dense model: a ratio of 0.77.

Setup (per seed):
- the default corpus, a 2x2 grid of a shrunk default preset, the router fitted by
  RunState.create;
- DiPaCo: one simulated worker per path, each training its path on its routed shard
  with AdamW8bit inner steps (PathSession); every H steps each module takes a DiLoCo
  outer step with the token-weighted mean of the pseudo-gradients of exactly the workers
  whose path holds it (the stem: all 4; a level module: 2), and every worker continues
  from its modules' new global weights;
- dense: the same PathModel shape (a grid of one module per level, so its one path sees
  ALL training documents), trained for the same steps, batch, optimizer and schedule as
  ONE path worker — equal per-path compute;
- evaluation: every held-out document is routed; the mixture scores it with its path,
  the dense model scores the very same documents (evaluate.document_loss).
Extras: outer.rescale_by_sharing on vs off; "dense+outer" controls (the dense model also
taking the outer step as a lone worker), which separate the effect of routing from that
of the outer optimizer; and the short-run outer setting of bench_diloco_quality.

Run: python benchmarks/bench_dipaco_quality.py [--quick] [--seeds N]
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

# the shrunk default preset: a 2x2 grid, 2 blocks per level, d_model 64 — ~40 ms per inner
# step on one core, so one seed (6 models, 3000 steps in all) takes about 2 minutes
FULL = dict(d_model=64, n_heads=4, context=64, levels=[2, 2], blocks_per_level=2, batch_size=16,
            steps_per_round=20, rounds=10, eval_tokens=32_768, curve_tokens=4_096, seeds=3)
QUICK = dict(d_model=32, n_heads=2, context=64, levels=[2, 2], blocks_per_level=2, batch_size=8,
             steps_per_round=10, rounds=3, eval_tokens=4_096, curve_tokens=2_048, seeds=1)

# outer optimizers: DiLoCo's, and the short-run setting that bench_diloco_quality found
# better when a run has only ~10 outer rounds (momentum 0.9 then overshoots)
PAPER_OUTER = (0.7, 0.9)
SHORT_OUTER = (1.0, 0.5)

# label -> (routed mixture?, outer (lr, momentum) or None for none, rescale_by_sharing)
RUNS = {
    "mixture": (True, PAPER_OUTER, False),
    "mixture+rescale": (True, PAPER_OUTER, True),
    "mixture, short-run outer": (True, SHORT_OUTER, False),
    "dense": (False, None, False),
    "dense+outer": (False, PAPER_OUTER, False),
    "dense+outer, short-run outer": (False, SHORT_OUTER, False),
}
# (numerator, denominator, what it measures)
RATIOS = [
    ("mixture", "dense", "**the claim**: mixture (DiLoCo outer) vs plain dense"),
    ("mixture", "dense+outer", "routing alone: both take the same outer step"),
    ("mixture+rescale", "dense", "with rescale_by_sharing"),
    ("mixture+rescale", "mixture", "rescale_by_sharing on / off"),
    ("mixture, short-run outer", "dense", "mixture (short-run outer) vs plain dense"),
    ("mixture, short-run outer", "dense+outer, short-run outer", "routing alone, short-run outer"),
]


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="outer rounds (overrides the preset)")
    parser.add_argument("--no-rescale", action="store_true", help="skip the outer.rescale_by_sharing variant")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["rounds"] = args.rounds or p["rounds"]
    seeds = list(range(args.seeds if args.seeds is not None else p["seeds"]))
    runs = {k: v for k, v in RUNS.items() if not (args.no_rescale and v[2])}
    ratios = [r for r in RATIOS if r[0] in runs and r[1] in runs]
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few steps; its numbers say nothing about the claim"
    print_header("DiPaCo: routed mixture vs dense model of one path's size (equal per-path compute)", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    model_kw = {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level",
                                  "batch_size", "steps_per_round", "rounds")}
    H, rounds, context = p["steps_per_round"], p["rounds"], p["context"]
    steps = H * rounds
    inner = small_config(0, **model_kw).inner
    print(f"- budget: {rounds} rounds x H={H} inner steps = {steps} steps of {p['batch_size']} x {context} tokens "
          f"per path worker ({steps * p['batch_size'] * context:,} tokens); each dense model gets the same")
    print(f"- inner: AdamW8bit, lr {inner.lr:g}, {inner.warmup_steps} warm-up steps, cosine to "
          f"{inner.min_lr_ratio:g} x lr "
          f"over the run; outer: Nesterov, DiLoCo's lr {PAPER_OUTER[0]} / momentum {PAPER_OUTER[1]}, or the short-run "
          f"lr {SHORT_OUTER[0]} / momentum {SHORT_OUTER[1]}")
    print(f"- seeds: {seeds} (run.seed: initialisation, router fit, data order); corpus: {len(docs)} documents")
    n_runs = len(seeds) * len(runs)
    print(f"- {n_runs} training runs ({len(runs)} per seed) in {min(args.jobs, n_runs)} parallel processes\n",
          flush=True)

    # mixtures cost 4x a dense run: start them first so the processes finish together
    jobs = sorted(((p, seed, label) for seed in seeds for label in runs), key=lambda j: not runs[j[2]][0])
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, _: print(f"(seed {job[1]}, {job[2]}: done at "
                                                    f"{time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(job[1], job[2]): out for job, out in zip(jobs, outputs)}
    sizes = {**by_job[(seeds[0], "mixture")]["sizes"], **by_job[(seeds[0], "dense")]["sizes"]}
    results, curves = [], []
    for seed in seeds:
        row = {"seed": seed}
        curve = {"steps": [H * (r + 1) for r in range(rounds)]}
        for label in runs:
            out = by_job[(seed, label)]
            row[label], row[f"per_path {label}"], curve[label] = out["loss"], out["per_path"], out["curve"]
        for num, den, _ in ratios:
            row[f"{num} / {den}"] = math.exp(row[num]) / math.exp(row[den])
        results.append(row)
        curves.append(curve)
    grid = Grid.from_config(small_config(0, **model_kw).grid)

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
                         [(label, outer_text(outer, rescale), *[fmt(r[label]) for r in results],
                           f"**{fmt(summary[label])}**", fmt(math.exp(summary[label]), 2))
                          for label, (_, outer, rescale) in runs.items()]))
    print("\n### Perplexity ratios (< 1: the numerator is better)\n")
    print(markdown_table(["ratio", "measures", *[f"seed {s}" for s in seeds], "median"],
                         [(f"{num} / {den}", what, *[fmt(r[f"{num} / {den}"], 3) for r in results],
                           f"**{fmt(summary[f'{num} / {den}'], 3)}**") for num, den, what in ratios]))
    print(f"\n### Per path (seed {seeds[0]}): loss on each path's routed held-out docs\n")
    print(markdown_table(["path", *runs], [(path_name(path), *[fmt(results[0][f"per_path {label}"][path_name(path)])
                                                                for label in runs]) for path in grid.paths()]))

    claim = summary["mixture / dense"]
    print(f"\nResult: with DiLoCo's outer step the mixture {'beats' if claim < 1 else 'does not beat'} the dense "
          f"model: median perplexity ratio {claim:.3f} (DiPaCo paper: {PAPER_RATIO:.2f}; perplexity here is per "
          f"byte, not per subword). Routing alone (both with the same outer step): "
          f"{summary['mixture / dense+outer']:.3f}.")
    if "mixture, short-run outer / dense" in summary:
        print(f"With the short-run outer step the mixture vs dense ratio is "
              f"{summary['mixture, short-run outer / dense']:.3f}.")
    if "mixture+rescale / mixture" in summary:
        helps = summary["mixture+rescale / mixture"] < 1
        wins = sum(r["mixture+rescale / mixture"] < 1 for r in results)
        print(f"rescale_by_sharing {'helps' if helps else 'does not help'} here: perplexity x"
              f"{summary['mixture+rescale / mixture']:.3f} vs off (better on {wins} of {len(results)} seeds).")

    # ------------------------------------------------------------------ files
    medians = {k: [median([c[k][i] for c in curves]) for i in range(rounds)] for k in runs}
    png = plot_curves(NAME, {k: (curves[0]["steps"], v) for k, v in medians.items()},
                      "inner steps per worker (= per-path compute)", "held-out loss (nats/token)",
                      f"DiPaCo mixture vs dense, median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    out = write_json(NAME, {"machine": info, "params": p, "seeds": seeds, "sizes": sizes,
                            "runs": {k: {"routed": v[0], "outer": v[1], "rescale_by_sharing": v[2]}
                                     for k, v in runs.items()},
                            "results": results, "median": summary, "curves": curves, "paper_ratio": PAPER_RATIO,
                            "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def train_and_score(p: dict, seed: int, label: str) -> dict:
    """One training run of RUNS[label] for one seed: final and per-round held-out losses."""
    routed, outer, rescale = RUNS[label]
    docs = load_corpus()
    model_kw = {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level",
                                  "batch_size", "steps_per_round", "rounds")}
    H, rounds, context = p["steps_per_round"], p["rounds"], p["context"]
    state = RunState.create(small_config(seed, **model_kw), docs)
    grid = state.grid
    held = heldout_sequences(state, docs, p["eval_tokens"])
    curve_held = heldout_sequences(state, docs, p["curve_tokens"])
    if not routed:
        # a grid of one module per level: the same PathModel shape (and init), and its one
        # path gets every training document
        state = RunState.create(small_config(seed, **{**model_kw, "levels": [1] * len(p["levels"])}), docs)
    if outer is not None:
        state = with_config(state, outer={"lr": outer[0], "momentum": outer[1], "rescale_by_sharing": rescale})
    sessions = [make_session(state, path, docs) for path in (grid.paths() if routed else state.grid.paths())]
    swarm = SimulatedSwarm(sessions, sharing_scale=(lambda m: 1.0 / len(grid.paths_containing(m)))
                           if rescale else None)  # as SwarmNode._sharing_scale does
    # each held-out doc is scored by its routed path; the dense model scores all of them
    models = {s.path: s.model for s in sessions} if routed else {path: sessions[0].model for path in grid.paths()}

    def routed_loss(sequences: dict) -> tuple[float, dict]:
        per_path = {path: score(models[path], seqs, context) for path, seqs in sequences.items()}
        return sum(t for t, _ in per_path.values()) / sum(c for _, c in per_path.values()), per_path

    curve = []
    for _ in range(rounds):
        if outer is None:  # the plain dense baseline: inner optimizer only
            sessions[0].inner_steps(H, log_every=H)
        else:
            swarm.round(H)
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


def outer_text(outer: tuple[float, float] | None, rescale: bool) -> str:
    if outer is None:
        return "none"
    return f"lr {outer[0]}, mom {outer[1]}" + (", rescaled by sharing" if rescale else "")


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
