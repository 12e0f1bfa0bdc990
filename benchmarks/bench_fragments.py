"""Question: what does averaging.fragments = N (Streaming DiLoCo: each round averages one
of N equal slices of each module, the slices in turn) cost in held-out loss, at equal
tokens and equal rounds, for the 1/N of the all-reduce bytes it moves per round?

Setup (per seed, side by side for N = 1, 2, 4; the same seed gives every N the same
init, router and data order):
- DiLoCo: one path of the default grid's shape (stem + 2 levels of 2 blocks, d_model 32)
  as a grid of one module per level; K = 4 simulated workers on it, each with its own
  data stream (PathSession data_seed 0..3);
- DiPaCo: the 2x2 grid, one worker per path (4 paths): the stem is averaged among 4
  workers, each level module among 2;
- every worker runs the same AdamW8bit inner steps (the preset's lr, warm-up, cosine over
  the run); every H steps, per module, the fragment [start, end) =
  fragment_bounds(numel, N, round) of the token-weighted mean pseudo-gradient
  (ModuleOuterState.pseudo_gradient_flat) gets the outer Nesterov step
  (ModuleOuterState.apply_fragment) and the workers adopt the new globals only there
  (PathSession.adopt_global(module, fragment)) — SwarmNode.outer_step's code path
  (quality_common.SimulatedSwarm(fragments=N)); N = 1 goes through the same path;
- the outer (lr, momentum) is the preset's (0.7, 0.9) for every N: nothing is retuned
  per N (a per-fragment optimum may differ, e.g. since a slice's pseudo-gradient holds N
  rounds of progress), and nothing is tuned at all;
- reported: the TEST half of the held-out documents (quality_common.heldout_split; each
  document scored by its routed path), scored with the modules' GLOBAL weights after the
  last round (what a checkpoint holds; with N > 1 a slice's globals are up to N - 1
  rounds older than its last local progress), and, for reference, the workers' own
  weights (their local progress outside the last round's fragment).

With overlap (averaging.overlap: each slice's average lands one round late while the next
round trains; overlap.FragmentRebase, SimulatedSwarm(overlap=True)): the same N > 1 again,
against the same plain N = 1 baseline; the last round's average lands at the end, as when
run() stops.

Run: python benchmarks/bench_fragments.py [--quick] [--seeds 1 2] [--fragments 1 2 4] [--rounds R] [--H H]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_common import (REPO, SPLITS, RunState, SimulatedSwarm, base_parser, fmt,  # noqa: E402
                            heldout_sequences, load_corpus, machine_info, markdown_table,
                            param_count, plot_curves, print_header, routed_loss, run_jobs, score, small_config,
                            train_with_curve, workers_of, write_json)

from p2ptrain.train.outer import fragment_bounds  # noqa: E402

NAME = "bench_fragments"
K = 4  # DiLoCo's workers on the one path; DiPaCo: the 2x2 grid's 4 paths, one worker each
SETUPS = {"DiLoCo": [1, 1], "DiPaCo": [2, 2]}  # grid levels

# ~23 ms per inner step of 16 x 64 tokens at d_model 32 on one idle core: one run is
# 4 workers x 320 steps; the full benchmark is 12 runs (2 setups x 3 N x 2 seeds): 8.5 CPU-min,
# 6 min wall in 2 processes at load average 3 (--quick: under a minute)
FULL = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=16, H=10, rounds=32,
            fragments=[1, 2, 4], eval_tokens=65_536, curve_tokens=4_096, seeds=[1, 2])
QUICK = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=8, H=5, rounds=8,
             fragments=[1, 2, 4], eval_tokens=4_096, curve_tokens=1_024, seeds=[1])


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--fragments", type=int, nargs="+", help="the N to compare (must hold 1)")
    parser.add_argument("--rounds", type=int, help="outer rounds (overrides the preset)")
    parser.add_argument("--H", type=int, help="inner steps per round (overrides the preset)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["fragments"] = sorted(set(args.fragments or p["fragments"]))
    p["rounds"], p["H"] = args.rounds or p["rounds"], args.H or p["H"]
    if 1 not in p["fragments"]:
        parser.error("--fragments must hold 1 (the baseline of every ratio)")
    seeds = args.seeds or p["seeds"]
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few rounds; its numbers say nothing"
    print_header("averaging.fragments: held-out loss of averaging 1/N of each module per round", info)

    t_start = time.perf_counter()
    docs = load_corpus()
    H, rounds, ns = p["H"], p["rounds"], p["fragments"]
    cfg = small_config(0, **model_kwargs(p, SETUPS["DiPaCo"]))
    steps = H * rounds
    print(f"- budget, every N: {rounds} rounds x H = {H} inner steps = {steps} steps of {p['batch_size']} x "
          f"{p['context']} tokens per worker, {K} workers ({K * steps * p['batch_size'] * p['context']:,} "
          f"tokens per run): equal tokens and equal rounds")
    print(f"- DiLoCo: {K} workers on one path (data streams 0..{K - 1}); DiPaCo: 2x2 grid, one worker per path")
    print(f"- inner: AdamW8bit, lr {cfg.inner.lr:g}, {cfg.inner.warmup_steps} warm-up steps, cosine to "
          f"{cfg.inner.min_lr_ratio:g} x lr over the run; outer: Nesterov, lr {cfg.outer.lr:g}, momentum "
          f"{cfg.outer.momentum:g} (the preset's) for every N, not retuned per N")
    print(f"- N = {ns}: round r averages fragment_bounds(numel, N, r) of each module (r = 0, 1, ...); "
          "SimulatedSwarm(fragments=N), the node's code path")
    print(f"- reported: TEST half of the held-out documents (nothing is tuned); seeds {seeds} "
          f"(run.seed: init, router, data order); corpus: {len(docs)} documents")
    variants = [(n, False) for n in ns] + [(n, True) for n in ns if n > 1]
    jobs = [(p, seed, setup, n, overlap) for setup in SETUPS for n, overlap in variants for seed in seeds]
    print(f"- {len(jobs)} training runs in {min(args.jobs, len(jobs))} parallel processes\n", flush=True)
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(
                           f"({job[2]}, N = {job[3]}{' overlapped' if job[4] else ''}, seed {job[1]}: test "
                           f"{out['loss']['test']:.4f}, own weights {out['own_loss']['test']:.4f}, done at "
                           f"{time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(setup, n, overlap, seed): out for (_, seed, setup, n, overlap), out in zip(jobs, outputs)}

    # ------------------------------------------------------------------ report
    rows, results = [], []
    for setup in SETUPS:
        base = [by_job[(setup, 1, False, s)]["loss"]["test"] for s in seeds]
        numels = by_job[(setup, 1, False, seeds[0])]["modules"]
        for n, overlap in variants:
            test = [by_job[(setup, n, overlap, s)]["loss"]["test"] for s in seeds]
            own = [by_job[(setup, n, overlap, s)]["own_loss"]["test"] for s in seeds]
            ratios = [a / b for a, b in zip(test, base)]
            ppl_ratios = [math.exp(a - b) for a, b in zip(test, base)]
            held = by_job[(setup, 1, False, seeds[0])]["worker_modules"]  # the same for every worker
            per_round = sum(buffer_numel(numels[m]["numel"], n) for m in held)
            total = sum(numels[m]["numel"] for m in held)
            results.append({"setup": setup, "fragments": n, "overlap": overlap, "test": test, "own_test": own,
                            "ratios": ratios, "ppl_ratios": ppl_ratios, "mean_test": mean(test),
                            "mean_ratio": mean(ratios), "mean_ppl_ratio": mean(ppl_ratios),
                            "values_per_round": per_round, "byte_fraction": per_round / total})
            rows.append((setup, f"{n}{', overlapped' if overlap else ''}", f"{per_round:,} ({per_round / total:.3f})",
                         " / ".join(fmt(x) for x in test), f"**{fmt(mean(test))}**", fmt(math.exp(mean(test)), 3),
                         " / ".join(fmt(x, 3) for x in ratios), f"**{fmt(mean(ratios), 3)}**",
                         fmt(mean(ppl_ratios), 3), fmt(mean(own))))
    seed_list = ", ".join(str(s) for s in seeds)
    first = {setup: by_job[(setup, 1, False, seeds[0])] for setup in SETUPS}
    print(f"\n- one path: {first['DiPaCo']['path_params']:,} parameters (d_model {p['d_model']}, context "
          f"{p['context']}); TEST tokens scored (seed {seeds[0]}): "
          + ", ".join(f"{setup} {out['heldout_tokens']['test']:,}" for setup, out in first.items()))
    print("\n### TEST loss with N fragments, equal tokens and rounds\n")
    print(f"Columns: *values/round* = pseudo-gradient values each worker all-reduces per round over the "
          f"modules of its path (the averager's buffer, ⌈numel/N⌉ per module; in parentheses: the fraction of "
          f"N = 1, i.e. of the bytes); *test loss* = final TEST loss, nats per byte-token, of the modules' "
          f"global weights, seeds {seed_list}, and their mean; *ppl* = exp(mean loss); *loss ratio* = test "
          f"loss / the same seed's N = 1 test loss, per seed and mean; *ppl ratio* = mean over seeds of "
          f"exp(loss − N = 1 loss); "
          f"*own weights* = mean TEST loss of the workers' own (local) weights after the last round.\n")
    print(markdown_table(["setup", "N", "values/round (fraction)", f"test loss (seeds {seed_list})", "mean",
                          "ppl", "loss ratio vs N=1 per seed", "mean loss ratio", "mean ppl ratio",
                          "own weights, mean"], rows))

    print(f"\n### All-reduce size per round, per module ({rounds} rounds; every worker, every round)\n")
    module_rows = []
    for setup in SETUPS:
        for module_id, m in by_job[(setup, 1, False, seeds[0])]["modules"].items():
            module_rows.append((setup, module_id, m["holders"], f"{m['numel']:,}",
                                *[f"{buffer_numel(m['numel'], n):,} ({buffer_numel(m['numel'], n) / m['numel']:.3f})"
                                  for n in ns]))
    print("Columns: *holders* = workers averaging the module; *numel* = its parameters; *N = n* = values "
          "all-reduced per round, ⌈numel/n⌉ (the last slice is zero-padded to it), and the fraction of numel. "
          "Bytes on the wire are these x 2 at the preset's fp16 compression.\n")
    print(markdown_table(["setup", "module", "holders", "numel", *[f"N = {n}" for n in ns]], module_rows))

    print()
    for setup in SETUPS:
        line = ", ".join(f"N = {r['fragments']}{' overlapped' if r['overlap'] else ''}: {r['mean_ratio']:.3f} (per seed "
                         f"{' / '.join(f'{x:.3f}' for x in r['ratios'])}) for {r['byte_fraction']:.2f} of the bytes"
                         for r in results if r["setup"] == setup and r["fragments"] != 1)
        print(f"Result, {setup}: TEST loss vs N = 1, equal tokens and rounds, outer step not retuned: {line}.")

    # ------------------------------------------------------------------ files
    xs = by_job[(next(iter(SETUPS)), 1, False, seeds[0])]["curve"][0]
    png = plot_curves(NAME, {f"{setup}, N = {n}{' overlapped' if o else ''}":
                             (xs, [mean([by_job[(setup, n, o, s)]["curve"][1][i] for s in seeds]) for i in range(len(xs))])
                             for setup in SETUPS for n, o in variants},
                      "inner steps per worker", "TEST loss, global weights (a subset; nats/byte-token)",
                      f"fragments: mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    out = write_json(NAME, {
        "machine": info, "params": p, "K": K, "setups": SETUPS, "seeds": seeds,
        "outer": {"lr": cfg.outer.lr, "momentum": cfg.outer.momentum}, "results": results,
        "runs": [{"setup": setup, "fragments": n, "overlap": ov, "seed": s, **o}
                 for (setup, n, ov, s), o in by_job.items()],
        "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def mean(values) -> float:
    return float(statistics.fmean(values))


def buffer_numel(numel: int, n: int) -> int:
    """Values a round all-reduces for a module of numel values: the largest fragment."""
    start, end = fragment_bounds(numel, n, 0)
    return end - start


def model_kwargs(p: dict, levels: list[int]) -> dict:
    return {"levels": levels, **{k: p[k] for k in ("d_model", "n_heads", "context", "blocks_per_level",
                                                      "batch_size")},
            "steps_per_round": p["H"], "rounds": p["rounds"]}


def train_and_score(p: dict, seed: int, setup: str, fragments: int, overlap: bool = False) -> dict:
    """One run: final validation and test losses (global and own weights) and a test curve."""
    docs = load_corpus()
    H, context = p["H"], p["context"]
    state = RunState.create(small_config(seed, **model_kwargs(p, SETUPS[setup])), docs)
    held = {split: heldout_sequences(state, docs, p["eval_tokens"], split) for split in SPLITS}
    curve_held = heldout_sequences(state, docs, p["curve_tokens"], "test")
    sessions = workers_of(state, docs, K if setup == "DiLoCo" else None)
    swarm = SimulatedSwarm(sessions, fragments=fragments, overlap=overlap)

    def own_loss(sequences: dict) -> float:
        """Each path's docs scored by each of its workers' own weights, averaged over them."""
        total = count = 0
        for path, seqs in sequences.items():
            scored = [score(s.model, seqs, context) for s in sessions if s.path == path]
            total += sum(t for t, _ in scored) / len(scored)
            count += scored[0][1]
        return total / count

    xs, ys = train_with_curve(swarm, p["rounds"], H, curve_held, context)
    final = {split: routed_loss(swarm.global_models(), held[split], context) for split in SPLITS}
    modules = {}
    for module_id, outer in sorted(swarm.globals.items(), key=lambda kv: (kv[0] != "stem", kv[0])):
        modules[module_id] = {"numel": sum(g.numel() for g in outer.global_params),
                              "holders": len(swarm.holders(module_id))}
    return {"loss": {split: final[split][0] for split in SPLITS},
            "own_loss": {split: own_loss(held[split]) for split in SPLITS},
            "heldout_tokens": {split: final[split][1] for split in SPLITS},
            "path_params": param_count(sessions[0].model), "modules": modules,
            "worker_modules": list(sessions[0].module_ids), "curve": (xs, ys)}


if __name__ == "__main__":
    main()
