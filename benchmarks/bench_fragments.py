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
- by default the outer (lr, momentum) is DiLoCo's (0.7, 0.9) for every N (common.DILOCO_OUTER,
  the presets' until 2026-12-06; the `default` preset now has (1.0, 0.5)): nothing is
  retuned per N (a per-fragment optimum may differ, e.g. since a slice's pseudo-gradient
  holds N rounds of progress), and nothing is tuned at all (see Retuned below);
- reported: the TEST half of the held-out documents (quality_common.heldout_split; each
  document scored by its routed path), scored with the modules' GLOBAL weights after the
  last round (what a checkpoint holds; with N > 1 a slice's globals are up to N - 1
  rounds older than its last local progress), and, for reference, the workers' own
  weights (their local progress outside the last round's fragment).

With overlap (averaging.overlap: each slice's average lands one round late while the next
round trains; overlap.FragmentRebase, SimulatedSwarm(overlap=True)): the same N > 1 again,
against the same plain N = 1 baseline; the last round's average lands at the end, as when
run() stops.

Retuned (--outer-grid LR,MOMENTUM ...): every variant, N = 1 included, runs at each outer
(lr, momentum) of the grid; each variant's setting is the one with the lowest median
VALIDATION loss over the seeds (quality_common.heldout_split: disjoint from the TEST half),
and its TEST loss is reported against N = 1 at N = 1's own chosen setting, so a retuned
variant is never compared with an untuned baseline. DiLoCo's setting, when in the grid,
is reported beside it (the untuned ratio, from the same run). --only-overlapped drops the
plain N > 1 variants.

With a last whole average (--final-average): every N > 1 variant runs again with, after its
last round, every module's globals set to the token-weighted mean of its workers' latest
weights, all slices at once (SimulatedSwarm(final_average=True); a plain mean, no outer
step), so no slice's globals are rounds older than its workers' progress. This measures
what such a closing round would recover; p2ptrain's node does not run one.

Run: python benchmarks/bench_fragments.py [--quick] [--seeds 1 2] [--fragments 1 2 4] [--rounds R] [--H H]
     [--outer-grid 0.7,0.9 0.5,0.9 ...] [--only-overlapped] [--final-average]
     [--setups DiLoCo DiPaCo] [--preset-model]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_common import (REPO, SPLITS, RunState, SimulatedSwarm, base_parser, fmt,  # noqa: E402
                            heldout_sequences, load_corpus, machine_info, markdown_table,
                            param_count, plot_curves, print_header, routed_loss, run_jobs, score, small_config,
                            train_with_curve, workers_of, write_json)

from p2ptrain.train.outer import fragment_bounds  # noqa: E402

NAME = "bench_fragments"
K = 4  # DiLoCo's workers on the one path; DiPaCo: the 2x2 grid's 4 paths, one worker each


class Variant(NamedTuple):
    """How a run averages: N fragments, overlapped or not, and (final_average) its globals set
    to the workers' mean weights, whole modules, after the last round."""
    fragments: int
    overlap: bool = False
    final_average: bool = False

    @property
    def label(self) -> str:
        return (f"{self.fragments}{', overlapped' if self.overlap else ''}"
                f"{', last round whole' if self.final_average else ''}")


BASE = Variant(1)  # whole modules every round: every ratio's denominator
SETUPS = {"DiLoCo": [1, 1], "DiPaCo": [2, 2]}  # grid levels

# ~23 ms per inner step of 16 x 64 tokens at d_model 32 on one idle core: one run is
# 4 workers x 320 steps; the full benchmark is 12 runs (2 setups x 3 N x 2 seeds): 8.5 CPU-min,
# 6 min wall in 2 processes at load average 3 (--quick: under a minute)
FULL = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=16, H=10, rounds=32,
            fragments=[1, 2, 4], eval_tokens=65_536, curve_tokens=4_096, seeds=[1, 2])
# --preset-model: the default preset's model, batch and schedule (its inner lr and warm-up
# too, as every size here): ~0.2 CPU-s a step, ~28 CPU-min for one run of 4 x 2,000 steps (measured)
PRESET_MODEL = dict(d_model=128, n_heads=4, context=128, blocks_per_level=2, batch_size=16, H=50, rounds=40,
                    fragments=[1, 4], eval_tokens=65_536, curve_tokens=4_096, seeds=[1])
QUICK = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=8, H=5, rounds=8,
             fragments=[1, 2, 4], eval_tokens=4_096, curve_tokens=1_024, seeds=[1])


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--fragments", type=int, nargs="+", help="the N to compare (must hold 1)")
    parser.add_argument("--rounds", type=int, help="outer rounds (overrides the preset)")
    parser.add_argument("--H", type=int, help="inner steps per round (overrides the preset)")
    parser.add_argument("--outer-grid", nargs="+", metavar="LR,MOMENTUM", type=outer_setting,
                        help="outer (lr, Nesterov momentum) settings to try for every variant; each "
                             "variant's is chosen on the VALIDATION half (default: DiLoCo's (0.7, 0.9) alone)")
    parser.add_argument("--only-overlapped", action="store_true",
                        help="compare N = 1 with the overlapped N > 1 only (no plain N > 1 runs)")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), help="run only these setups (all by default)")
    parser.add_argument("--preset-model", action="store_true",
                        help="the default preset's own model and schedule (d_model 128, context 128, 40 rounds "
                             "of H = 50) instead of the small one: ~28 CPU-minutes a run")
    parser.add_argument("--final-average", action="store_true",
                        help="also run every N > 1 variant with its globals set to the workers' mean weights, "
                             "whole modules, after its last round (what a closing average would recover)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else PRESET_MODEL if args.preset_model else FULL)
    setups = {name: SETUPS[name] for name in args.setups or SETUPS}
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
    diloco = (cfg.outer.lr, cfg.outer.momentum)  # DiLoCo's: common.DILOCO_OUTER
    grid = list(dict.fromkeys(args.outer_grid or [diloco]))
    tuned = len(grid) > 1
    steps = H * rounds
    print(f"- budget, every N: {rounds} rounds x H = {H} inner steps = {steps} steps of {p['batch_size']} x "
          f"{p['context']} tokens per worker, {K} workers ({K * steps * p['batch_size'] * p['context']:,} "
          f"tokens per run): equal tokens and equal rounds")
    print(f"- DiLoCo: {K} workers on one path (data streams 0..{K - 1}); DiPaCo: 2x2 grid, one worker per path")
    print(f"- inner: AdamW8bit, lr {cfg.inner.lr:g}, {cfg.inner.warmup_steps} warm-up steps, cosine to "
          f"{cfg.inner.min_lr_ratio:g} x lr over the run; outer: Nesterov, (lr, momentum) "
          + (f"chosen per variant from {grid} by the median VALIDATION loss over the seeds (DiLoCo's: "
             f"{diloco})" if tuned else f"{diloco} (DiLoCo's) for every N, not retuned per N"))
    print(f"- N = {ns}: round r averages fragment_bounds(numel, N, r) of each module (r = 0, 1, ...); "
          "SimulatedSwarm(fragments=N), the node's code path")
    tuning = "only the outer setting is tuned, on the VALIDATION half" if tuned else "nothing is tuned"
    print(f"- reported: TEST half of the held-out documents ({tuning}); seeds {seeds} "
          f"(run.seed: init, router, data order); corpus: {len(docs)} documents")
    plain = [] if args.only_overlapped else [Variant(n) for n in ns if n > 1]
    variants = [BASE] + plain + [Variant(n, overlap=True) for n in ns if n > 1]
    if args.final_average:
        variants += [v._replace(final_average=True) for v in variants if v.fragments > 1]
    jobs = [(p, seed, setup, v, outer) for setup in setups for v in variants for outer in grid for seed in seeds]
    print(f"- {len(jobs)} training runs in {min(args.jobs, len(jobs))} parallel processes\n", flush=True)
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(
                           f"({job[2]}, N = {job[3].label}, outer {job[4]}, seed {job[1]}: "
                           f"validation {out['loss']['validation']:.4f}, test {out['loss']['test']:.4f}, own "
                           f"weights {out['own_loss']['test']:.4f}, done at {time.perf_counter() - t_start:.0f} s)",
                           flush=True))
    by_job = {(setup, v, outer, seed): out for (_, seed, setup, v, outer), out in zip(jobs, outputs)}

    # ------------------------------------------------------------ choose on validation
    valid = {(setup, v, outer): statistics.median(by_job[(setup, v, outer, s)]["loss"]["validation"] for s in seeds)
             for setup in setups for v in variants for outer in grid}
    chosen = {(setup, v): min(grid, key=lambda outer: valid[(setup, v, outer)]) for setup in setups for v in variants}

    def run_of(setup: str, v: Variant, seed: int, outer: tuple | None = None) -> dict:
        return by_job[(setup, v, outer or chosen[(setup, v)], seed)]

    # ------------------------------------------------------------------ report
    rows, results = [], []
    for setup in setups:
        base = [run_of(setup, BASE, s)["loss"]["test"] for s in seeds]
        first = run_of(setup, BASE, seeds[0])
        numels, held = first["modules"], first["worker_modules"]  # the same modules for every worker
        for v in variants:
            test = [run_of(setup, v, s)["loss"]["test"] for s in seeds]
            own = [run_of(setup, v, s)["own_loss"]["test"] for s in seeds]
            ratios = [a / b for a, b in zip(test, base)]
            ppl_ratios = [math.exp(a - b) for a, b in zip(test, base)]
            per_round = sum(buffer_numel(numels[m]["numel"], v.fragments) for m in held)
            total = sum(numels[m]["numel"] for m in held)
            result = {"setup": setup, **v._asdict(), "label": v.label, "outer": chosen[(setup, v)],
                      "test": test, "own_test": own, "ratios": ratios, "ppl_ratios": ppl_ratios,
                      "mean_test": mean(test), "mean_ratio": mean(ratios), "mean_ppl_ratio": mean(ppl_ratios),
                      "values_per_round": per_round, "byte_fraction": per_round / total}
            if tuned and diloco in grid:
                at_diloco = [run_of(setup, v, s, diloco)["loss"]["test"]
                             / run_of(setup, BASE, s, diloco)["loss"]["test"] for s in seeds]
                result["diloco_ratios"], result["diloco_mean_ratio"] = at_diloco, mean(at_diloco)
            results.append(result)
            rows.append((setup, v.label,
                         *([describe_outer(result["outer"])] if tuned else []),
                         f"{per_round:,} ({per_round / total:.3f})",
                         " / ".join(fmt(x) for x in test), f"**{fmt(mean(test))}**", fmt(math.exp(mean(test)), 3),
                         " / ".join(fmt(x, 3) for x in ratios), f"**{fmt(mean(ratios), 3)}**",
                         fmt(mean(ppl_ratios), 3), fmt(mean(own)),
                         *([fmt(result["diloco_mean_ratio"], 3)] if "diloco_mean_ratio" in result else [])))
    seed_list = ", ".join(str(s) for s in seeds)
    first = {setup: run_of(setup, BASE, seeds[0]) for setup in setups}
    path_params = next(iter(first.values()))["path_params"]  # every setup's path has the same shape
    print(f"\n- one path: {path_params:,} parameters (d_model {p['d_model']}, context "
          f"{p['context']}); TEST tokens scored (seed {seeds[0]}): "
          + ", ".join(f"{setup} {out['heldout_tokens']['test']:,}" for setup, out in first.items()))
    if tuned:
        print("\n### Outer settings, chosen on the VALIDATION half\n")
        print(f"Columns: *median validation loss* = median over seeds {seed_list} of the final VALIDATION loss "
              f"(global weights); *taken* = the variant's lowest, the setting its TEST loss below is reported at.\n")
        print(markdown_table(["setup", "N", "outer (lr, momentum)", "median validation loss", "taken"],
                             [(setup, v.label, describe_outer(outer), fmt(valid[(setup, v, outer)]),
                               "**yes**" if outer == chosen[(setup, v)] else "")
                              for setup in setups for v in variants for outer in grid]))
    print(f"\n### TEST loss with N fragments, equal tokens and rounds{', outer step retuned' if tuned else ''}\n")
    print(f"Columns: {'*outer* = the (lr, momentum) chosen on validation; ' if tuned else ''}"
          f"*values/round* = pseudo-gradient values each worker all-reduces per round over the "
          f"modules of its path (the averager's buffer, ⌈numel/N⌉ per module; in parentheses: the fraction of "
          f"N = 1, i.e. of the bytes); *test loss* = final TEST loss, nats per byte-token, of the modules' "
          f"global weights, seeds {seed_list}, and their mean; *ppl* = exp(mean loss); *loss ratio* = test "
          f"loss / the same seed's N = 1 test loss{' (N = 1 at its own chosen setting)' if tuned else ''}, per "
          f"seed and mean; *ppl ratio* = mean over seeds of exp(loss − N = 1 loss); "
          f"*own weights* = mean TEST loss of the workers' own (local) weights after the last round"
          + ("; *at DiLoCo's* = the mean loss ratio when every variant, N = 1 too, keeps DiLoCo's "
             f"{diloco}." if tuned and diloco in grid else ".") + "\n")
    print(markdown_table(["setup", "N", *(["outer"] if tuned else []), "values/round (fraction)",
                          f"test loss (seeds {seed_list})", "mean", "ppl", "loss ratio vs N=1 per seed",
                          "mean loss ratio", "mean ppl ratio", "own weights, mean",
                          *(["at DiLoCo's"] if tuned and diloco in grid else [])], rows))

    print(f"\n### All-reduce size per round, per module ({rounds} rounds; every worker, every round)\n")
    module_rows = []
    for setup in setups:
        for module_id, m in first[setup]["modules"].items():
            module_rows.append((setup, module_id, m["holders"], f"{m['numel']:,}",
                                *[f"{buffer_numel(m['numel'], n):,} ({buffer_numel(m['numel'], n) / m['numel']:.3f})"
                                  for n in ns]))
    print("Columns: *holders* = workers averaging the module; *numel* = its parameters; *N = n* = values "
          "all-reduced per round, ⌈numel/n⌉ (the last slice is zero-padded to it), and the fraction of numel. "
          "Bytes on the wire are these x 2 at the preset's fp16 compression.\n")
    print(markdown_table(["setup", "module", "holders", "numel", *[f"N = {n}" for n in ns]], module_rows))

    print()
    for setup in setups:
        line = ", ".join(f"N = {r['label']}"
                         f"{' at ' + describe_outer(r['outer']) if tuned else ''}: {r['mean_ratio']:.3f} (per seed "
                         f"{' / '.join(f'{x:.3f}' for x in r['ratios'])}) for {r['byte_fraction']:.2f} of the bytes"
                         for r in results if r["setup"] == setup and r["fragments"] != 1)
        how = (f"every variant's outer step chosen on validation (N = 1 at {describe_outer(chosen[(setup, BASE)])})"
               if tuned else "outer step not retuned")
        if line:  # N = 1 alone (e.g. a run that only tunes the outer step) has no ratio to report
            print(f"Result, {setup}: TEST loss vs N = 1, equal tokens and rounds, {how}: {line}.")

    # ------------------------------------------------------------------ files
    xs = run_of(next(iter(setups)), BASE, seeds[0])["curve"][0]
    png = plot_curves(NAME, {f"{setup}, N = {v.label}":
                             (xs, [mean([run_of(setup, v, s)["curve"][1][i] for s in seeds]) for i in range(len(xs))])
                             for setup in setups for v in variants},
                      "inner steps per worker", "TEST loss, global weights (a subset; nats/byte-token)",
                      f"fragments: mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
                      + (", outer step chosen on validation" if tuned else ""))
    out = write_json(NAME, {
        "machine": info, "params": p, "K": K, "setups": setups, "seeds": seeds,
        "outer": {"diloco": diloco, "grid": grid,
                  "chosen": [{"setup": setup, **v._asdict(), "outer": c} for (setup, v), c in chosen.items()]},
        "results": results,
        "runs": [{"setup": setup, **v._asdict(), "outer": outer, "seed": s, **o}
                 for (setup, v, outer, s), o in by_job.items()],
        "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def outer_setting(text: str) -> tuple[float, float]:
    """'0.7,0.9' -> (0.7, 0.9): an outer (lr, Nesterov momentum) for --outer-grid."""
    try:
        lr, momentum = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LR,MOMENTUM (e.g. 0.7,0.9)") from None
    if not (lr > 0 and 0 <= momentum < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: the lr must be > 0 and the momentum in [0, 1)")
    return lr, momentum


def describe_outer(outer: tuple[float, float]) -> str:
    return f"({outer[0]:g}, {outer[1]:g})"


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


def train_and_score(p: dict, seed: int, setup: str, variant: Variant, outer: tuple[float, float]) -> dict:
    """One run: final validation and test losses (global and own weights) and a test curve."""
    docs = load_corpus()
    H, context = p["H"], p["context"]
    config = small_config(seed, **model_kwargs(p, SETUPS[setup]), outer_lr=outer[0], outer_momentum=outer[1])
    state = RunState.create(config, docs)
    held = {split: heldout_sequences(state, docs, p["eval_tokens"], split) for split in SPLITS}
    curve_held = heldout_sequences(state, docs, p["curve_tokens"], "test")
    sessions = workers_of(state, docs, K if setup == "DiLoCo" else None)
    swarm = SimulatedSwarm(sessions, fragments=variant.fragments, overlap=variant.overlap,
                           final_average=variant.final_average)

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
