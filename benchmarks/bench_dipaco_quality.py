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
Optionally the same mixture again with outer.rescale_by_sharing on.

Run: python benchmarks/bench_dipaco_quality.py [--quick] [--seeds N]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_common import (RunState, SimulatedSwarm, base_parser, fmt, heldout_sequences, load_corpus,  # noqa: E402
                            machine_info, make_session, markdown_table, median, param_count, plot_curves,
                            print_header, score, small_config, with_config, write_json)

from p2ptrain.model.grid import path_name  # noqa: E402

NAME = "bench_dipaco_quality"
PAPER_RATIO = 12.39 / 16.09  # DiPaCo, Table 1: mixture vs dense of one path's size

# the shrunk default preset: a 2x2 grid, 2 blocks per level, d_model 64 — about 40 ms per
# inner step on 2 CPU cores, so 5 models x 240 steps take ~1 min per seed
FULL = dict(d_model=64, n_heads=4, context=64, levels=[2, 2], blocks_per_level=2, batch_size=16,
            steps_per_round=20, rounds=12, eval_tokens=32_768, curve_tokens=8_192, seeds=3)
QUICK = dict(d_model=32, n_heads=2, context=64, levels=[2, 2], blocks_per_level=2, batch_size=8,
             steps_per_round=10, rounds=3, eval_tokens=4_096, curve_tokens=2_048, seeds=1)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="outer rounds (overrides the preset)")
    parser.add_argument("--steps-per-round", type=int, help="inner steps H per round (overrides the preset)")
    parser.add_argument("--no-rescale", action="store_true", help="skip the outer.rescale_by_sharing variant")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["rounds"] = args.rounds or p["rounds"]
    p["steps_per_round"] = args.steps_per_round or p["steps_per_round"]
    seeds = list(range(args.seeds if args.seeds is not None else p["seeds"]))
    info = machine_info()
    print_header("DiPaCo: routed mixture vs dense model of one path's size (equal per-path compute)", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    model_kw = {k: p[k] for k in ("d_model", "n_heads", "context", "levels", "blocks_per_level",
                                  "batch_size", "steps_per_round", "rounds")}
    H, rounds = p["steps_per_round"], p["rounds"]
    steps = H * rounds
    tokens_per_path = steps * p["batch_size"] * p["context"]
    print(f"- budget: {rounds} rounds x H={H} inner steps = {steps} steps of {p['batch_size']} x {p['context']} "
          f"tokens per path worker ({tokens_per_path:,} tokens); the dense model gets the same")
    print(f"- inner: AdamW8bit, lr {small_config(0, **model_kw).inner.lr:g}, warm-up + cosine over the run; "
          f"outer: Nesterov lr {small_config(0, **model_kw).outer.lr:g}, momentum "
          f"{small_config(0, **model_kw).outer.momentum:g}")
    print(f"- seeds: {seeds} (run.seed: initialisation, router fit, data order); corpus: {len(docs)} documents\n")

    results, curves, sizes, per_path_first = [], [], None, None
    for seed in seeds:
        cfg = small_config(seed, **model_kw)
        state = RunState.create(cfg, docs)
        dense_cfg = small_config(seed, **{**model_kw, "levels": [1] * len(cfg.grid.levels)})
        dense_state = RunState.create(dense_cfg, docs)  # one path: every training document
        grid = state.grid
        held = heldout_sequences(state, docs, p["eval_tokens"])
        curve_held = heldout_sequences(state, docs, p["curve_tokens"])
        context = cfg.model.context

        def mixture_loss(swarm: SimulatedSwarm, sequences: dict) -> tuple[float, dict]:
            total, count, per_path = 0.0, 0, {}
            for session in swarm.sessions:
                t, c = score(session.model, sequences[session.path], context)
                per_path[session.path] = (t, c)
                total, count = total + t, count + c
            return total / count, per_path

        def dense_loss(model, sequences: dict) -> tuple[float, dict]:
            per_path = {path: score(model, seqs, context) for path, seqs in sequences.items()}
            return sum(t for t, _ in per_path.values()) / sum(c for _, c in per_path.values()), per_path

        # --- DiPaCo: one worker per path, outer step per module over the paths holding it
        variants = {"mixture": state}
        if not args.no_rescale:
            variants["mixture (rescale_by_sharing)"] = with_config(state, outer={"rescale_by_sharing": True})
        run, curve = {}, {"steps": [H * (r + 1) for r in range(rounds)]}
        for label, vstate in variants.items():
            rescale = vstate.config.outer.rescale_by_sharing
            swarm = SimulatedSwarm([make_session(vstate, path, docs) for path in grid.paths()],
                                   sharing_scale=(lambda m: 1.0 / len(grid.paths_containing(m))) if rescale else None)
            curve[label] = []
            for _ in range(rounds):
                swarm.round(H)
                curve[label].append(mixture_loss(swarm, curve_held)[0])
            run[label] = mixture_loss(swarm, held)
            if sizes is None:
                sizes = model_sizes(swarm, grid)
                sizes["shard_tokens"] = {path_name(s.path): len(s.stream) for s in swarm.sessions}
                sizes["shard_docs"] = {path_name(s.path): s.stream.num_docs for s in swarm.sessions}

        # --- dense: one path's shape, all training documents, one path worker's budget
        dense = make_session(dense_state, (0,) * len(cfg.grid.levels), docs)
        curve["dense"] = []
        for _ in range(rounds):
            dense.inner_steps(H, log_every=H)
            curve["dense"].append(dense_loss(dense.model, curve_held)[0])
        run["dense"] = dense_loss(dense.model, held)
        if sizes is not None and "dense_params" not in sizes:
            sizes["dense_params"] = param_count(dense.model)
            sizes["dense_train_tokens"] = len(dense.stream)

        row = {"seed": seed, **{f"{k}_loss": v[0] for k, v in run.items()}}
        row["ratio"] = math.exp(row["mixture_loss"]) / math.exp(row["dense_loss"])
        if "mixture (rescale_by_sharing)_loss" in row:
            row["ratio_rescale"] = math.exp(row["mixture (rescale_by_sharing)_loss"]) / math.exp(row["dense_loss"])
        row["per_path"] = {path_name(path): {"heldout_docs": len(held[path]), "tokens": run["mixture"][1][path][1],
                                             "mixture_loss": run["mixture"][1][path][0] / max(run["mixture"][1][path][1], 1),
                                             "dense_loss": run["dense"][1][path][0] / max(run["dense"][1][path][1], 1)}
                           for path in grid.paths()}
        results.append(row)
        curves.append(curve)
        per_path_first = per_path_first or row["per_path"]
        print(f"(seed {seed} done at {time.perf_counter() - t_start:.0f} s)", flush=True)

    # ------------------------------------------------------------------ report
    print("\n### Model sizes (parameters)\n")
    print(markdown_table(["what", "parameters"], [
        *[(f"module {m}", f"{n:,}") for m, n in sizes["modules"].items()],
        ("one path (stem + one module per level)", f"{sizes['path_params']:,}"),
        (f"whole mixture ({len(sizes['modules'])} modules, {sizes['paths']} paths)", f"{sizes['mixture_params']:,}"),
        ("dense model (one path's shape)", f"{sizes['dense_params']:,}"),
    ]))
    print("\n### Shards (seed 0 router; training split)\n")
    print(markdown_table(["path", "docs", "tokens"],
                         [(k, sizes["shard_docs"][k], f"{v:,}") for k, v in sizes["shard_tokens"].items()]
                         + [("dense (all)", "", f"{sizes['dense_train_tokens']:,}")]))

    has_rescale = "ratio_rescale" in results[0]
    headers = ["seed", "mixture loss", "dense loss", "mixture ppl", "dense ppl", "ppl ratio mix/dense"]
    if has_rescale:
        headers += ["mixture+rescale loss", "ppl ratio (rescale)"]
    rows = []
    for r in results:
        row = [r["seed"], fmt(r["mixture_loss"]), fmt(r["dense_loss"]), fmt(math.exp(r["mixture_loss"]), 3),
               fmt(math.exp(r["dense_loss"]), 3), fmt(r["ratio"], 3)]
        if has_rescale:
            row += [fmt(r["mixture (rescale_by_sharing)_loss"]), fmt(r["ratio_rescale"], 3)]
        rows.append(row)
    summary = {k: median([r[k] for r in results]) for k in results[0] if k not in ("seed", "per_path")}
    row = ["**median**", fmt(summary["mixture_loss"]), fmt(summary["dense_loss"]),
           fmt(math.exp(summary["mixture_loss"]), 3), fmt(math.exp(summary["dense_loss"]), 3),
           f"**{fmt(summary['ratio'], 3)}**"]
    if has_rescale:
        row += [fmt(summary["mixture (rescale_by_sharing)_loss"]), f"**{fmt(summary['ratio_rescale'], 3)}**"]
    rows.append(row)
    print("\n### Held-out loss (nats per byte-token) and perplexity\n")
    print(markdown_table(headers, rows))

    print("\n### Per path (seed 0): the same routed held-out documents, scored by their path and by dense\n")
    print(markdown_table(["path", "held-out docs", "tokens scored", "path loss", "dense loss"],
                         [(k, v["heldout_docs"], f"{v['tokens']:,}", fmt(v["mixture_loss"]), fmt(v["dense_loss"]))
                          for k, v in per_path_first.items()]))

    verdict = "beats" if summary["ratio"] < 1 else "does not beat"
    print(f"\nResult: the mixture {verdict} the dense model: median perplexity ratio {summary['ratio']:.3f} "
          f"(DiPaCo paper: {PAPER_RATIO:.2f}; perplexities here are per byte, not per subword).")
    if has_rescale:
        better = summary["ratio_rescale"] < summary["ratio"]
        wins = sum(r["ratio_rescale"] < r["ratio"] for r in results)
        print(f"rescale_by_sharing: median ratio {summary['ratio_rescale']:.3f} vs {summary['ratio']:.3f} without; "
              f"it {'helps' if better else 'does not help'} here (better on {wins} of {len(results)} seeds).")

    # ------------------------------------------------------------------ files
    curve_labels = [k for k in curves[0] if k != "steps"]
    medians = {k: [median([c[k][i] for c in curves]) for i in range(rounds)] for k in curve_labels}
    png = plot_curves(NAME, {k: (curves[0]["steps"], v) for k, v in medians.items()},
                      "inner steps per path worker", "held-out loss (nats/token)",
                      f"DiPaCo mixture vs dense (median of {len(seeds)} seeds)")
    out = write_json(NAME, {"machine": info, "params": p, "seeds": seeds, "sizes": sizes, "results": results,
                            "median": summary, "curves": curves, "paper_ratio": PAPER_RATIO,
                            "elapsed_s": time.perf_counter() - t_start})
    print(f"\nwrote {out.relative_to(out.parent.parent)}" + (f" and {png.relative_to(png.parent.parent)}" if png else "")
          + f" in {time.perf_counter() - t_start:.0f} s")


def model_sizes(swarm: SimulatedSwarm, grid) -> dict:
    modules = {}
    for session in swarm.sessions:
        for module_id, module in session.model.parts().items():
            modules.setdefault(module_id, param_count(module))
    modules = {m: modules[m] for m in grid.all_modules()}
    return {"modules": modules, "paths": grid.num_paths, "path_params": param_count(swarm.sessions[0].model),
            "mixture_params": sum(modules.values())}


if __name__ == "__main__":
    main()
