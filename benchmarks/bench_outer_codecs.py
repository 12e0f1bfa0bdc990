"""Question: what do codecs stronger than the swarm's 8-bit (4-bit NF4, chunked top-k as in
SparseLoCo), with and without error feedback, cost in held-out loss when they carry the
outer step's real pseudo-gradients, at equal tokens and rounds, for how many bytes?

Setup (per seed, side by side for every codec; the same seed gives every codec the same
init, router and data order):
- the in-process swarm of bench_fragments (quality_common.SimulatedSwarm with fragments = 1:
  SwarmNode.outer_step's flat code path): DiLoCo, K = 4 workers on one path; DiPaCo, the
  2x2 grid, one worker per path (the stem averaged among 4, each level module among 2);
- every round each worker's flat pseudo-gradient of each module goes through the codec's
  round trip (encode, decode) before the token-weighted mean: the send leg of an
  all-reduce, or an all-gather of the encoded vectors as SparseLoCo does. In the swarm's
  butterfly all-reduce the averaged part is encoded again on the way back; that second
  crossing is not applied here to any codec but nf4-wire (bench_compression replays it for
  fp16 and 8-bit: 8-bit's error over both legs is 7.8e-3 relative RMS);
- nf4-wire is p2ptrain's 4-bit wire codec as the swarm runs it (averaging.compression =
  "4bit"): every worker's pseudo-gradient goes through NF4 on the way in, and the mean goes
  through it again on the way back, where every holder adopts the same decoded average
  (the reducer's own part, which the swarm does not encode on the way in, is encoded here);
- error feedback keeps one residual per (worker, module) (outer_codecs.ErrorFeedback);
- the outer step is DiLoCo's (Nesterov, lr 0.7, momentum 0.9; common.DILOCO_OUTER) for every codec, not
  retuned, except the *sparseloco* rows: SparseLoCo's recipe (error feedback decayed by
  β = 0.95 standing in for outer momentum, plain descent with outer lr 1, values set without
  checking the paper's; its 2-bit quantization of the kept values is not applied: they go
  as float16). Nothing is tuned;
- reported: the TEST half of the held-out documents, scored with the modules' global
  weights after the last round; the codec's relative RMS error on each vector it encoded
  (‖decoded − x‖ / ‖x‖, x the pseudo-gradient, with error feedback plus the carried
  residual), median over every (round, worker, module), and with error feedback also what
  was sent against that round's Δ alone; payload bytes per value (values, indices and
  scales; no framing).

Before the run, "holds loss" was defined as a mean TEST-loss ratio to the exact average of
at most 1.01 in both setups (what averaging.fragments = 4 was found to cost).

Run: python benchmarks/bench_outer_codecs.py [--quick] [--seeds 1 2] [--codecs none 8bit nf4+ef ...]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from outer_codecs import (ErrorFeedback, HivemindCodec, NF4Codec, NoCodec, TopKCodec, WireNF4Codec,  # noqa: E402
                          relative_rms)
from quality_common import (REPO, SPLITS, RunState, SimulatedSwarm, base_parser, fmt,  # noqa: E402
                            heldout_sequences, load_corpus, machine_info, markdown_table,
                            print_header, routed_loss, run_jobs, small_config, train_with_curve, workers_of,
                            write_json, write_plot)

NAME = "bench_outer_codecs"
K = 4
SETUPS = {"DiLoCo": [1, 1], "DiPaCo": [2, 2]}
HOLDS_LOSS = 1.01  # fixed before the first run: the cost accepted for averaging.fragments = 4
# codecs whose average crosses the codec again on its way back to every holder: p2ptrain's
# 4-bit wire codec, whose reducers return the average itself (swarm/wire_codec.py)
RETURN_LEG = {"nf4-wire"}

# SparseLoCo's recipe (arXiv 2508.15706): error feedback decayed by β in place of outer
# momentum, plain averaged descent with outer lr α; β = 0.95 and α = 1 were set without
# checking them against the paper's own settings, and not tuned
SPARSELOCO = dict(decay=0.95, outer_lr=1.0, outer_momentum=0.0)
DILOCO = dict(decay=1.0, outer_lr=None, outer_momentum=None)  # DiLoCo's outer step (small_config's)

CODECS = {  # id -> (codec factory, error feedback, outer settings)
    "none": (NoCodec, False, DILOCO),
    "fp16": (lambda: HivemindCodec("fp16"), False, DILOCO),
    "8bit": (lambda: HivemindCodec("8bit"), False, DILOCO),
    "nf4": (NF4Codec, False, DILOCO),
    "nf4+ef": (NF4Codec, True, DILOCO),
    "nf4-wire": (WireNF4Codec, False, DILOCO),  # both legs, as averaging.compression = "4bit" runs
    "top16+ef": (lambda: TopKCodec(1 / 16), True, DILOCO),
    "none-sparseloco": (NoCodec, False, SPARSELOCO),  # SparseLoCo's outer step alone, exact average
    "top16-sparseloco": (lambda: TopKCodec(1 / 16), True, SPARSELOCO),
    "top64-sparseloco": (lambda: TopKCodec(1 / 64), True, SPARSELOCO),
}

# the same model and budget as bench_fragments (~30 CPU-s a run at d_model 32); 72 runs,
# ~20 min wall in 2 processes. 4 seeds: fp16's rounding alone moved one seed's loss 0.6 %
FULL = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=16, H=10, rounds=32,
            eval_tokens=65_536, curve_tokens=4_096, seeds=[1, 2, 3, 4], codecs=list(CODECS))
QUICK = dict(d_model=32, n_heads=2, context=64, blocks_per_level=2, batch_size=8, H=5, rounds=6,
             eval_tokens=4_096, curve_tokens=1_024, seeds=[1], codecs=["none", "8bit", "nf4+ef", "top16-sparseloco"])


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), help="codecs to compare (must hold none)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["codecs"] = [c for c in CODECS if c in (args.codecs or p["codecs"])]
    if "none" not in p["codecs"]:
        parser.error("--codecs must hold none (the baseline of every ratio)")
    seeds = args.seeds or p["seeds"]
    info = machine_info()
    if args.quick:
        info["note"] = "--quick: a smoke run of a tiny model for a few rounds; its numbers say nothing"
    print_header("outer codecs: held-out loss of 4-bit and top-k pseudo-gradients, with and without error "
                 "feedback", info)
    t_start = time.perf_counter()
    docs = load_corpus()
    cfg = small_config(0, **model_kwargs(p, SETUPS["DiPaCo"]))
    print(f"- budget, every codec: {p['rounds']} rounds x H = {p['H']} inner steps of {p['batch_size']} x "
          f"{p['context']} tokens per worker, {K} workers; outer Nesterov lr {cfg.outer.lr:g}, momentum "
          f"{cfg.outer.momentum:g} (DiLoCo's, not retuned)")
    print(f"- codecs: {', '.join(p['codecs'])}; each worker's pseudo-gradient makes one codec round trip "
          "before the token-weighted mean (the send leg)")
    print(f"- reported: TEST half of the held-out documents; seeds {seeds}; 'holds loss': mean ratio ≤ "
          f"{HOLDS_LOSS} in both setups (fixed before the first run); corpus: {len(docs)} documents")
    jobs = [(p, seed, setup, codec) for setup in SETUPS for codec in p["codecs"] for seed in seeds]
    print(f"- {len(jobs)} training runs in {min(args.jobs, len(jobs))} parallel processes\n", flush=True)
    outputs = run_jobs(train_and_score, jobs, args.jobs,
                       on_done=lambda job, out: print(
                           f"({job[2]}, {job[3]}, seed {job[1]}: test {out['loss']['test']:.4f}, codec error "
                           f"{out['error_median']:.3g}, done at {time.perf_counter() - t_start:.0f} s)", flush=True))
    by_job = {(setup, codec, seed): out for (_, seed, setup, codec), out in zip(jobs, outputs)}

    rows, results = [], []
    for setup in SETUPS:
        base = [by_job[(setup, "none", s)]["loss"]["test"] for s in seeds]
        for codec in p["codecs"]:
            runs = [by_job[(setup, codec, s)] for s in seeds]
            test = [r["loss"]["test"] for r in runs]
            ratios = [a / b for a, b in zip(test, base)]
            bpv = runs[0]["bytes_per_value"]
            error = statistics.median(r["error_median"] for r in runs)
            lag = statistics.median(r["sent_vs_round_median"] for r in runs)
            results.append({"setup": setup, "codec": codec, "name": runs[0]["codec_name"], "test": test,
                            "ratios": ratios, "mean_ratio": mean(ratios), "bytes_per_value": bpv,
                            "error_median": error, "sent_vs_round_median": lag})
            rows.append((setup, runs[0]["codec_name"], fmt(bpv, 3), fmt(error, 3), fmt(lag, 3),
                         " / ".join(fmt(x) for x in test), " / ".join(fmt(x, 3) for x in ratios),
                         f"**{fmt(mean(ratios), 3)}**", fmt(mean([math.exp(a - b) for a, b in zip(test, base)]), 3)))
    seed_list = ", ".join(str(s) for s in seeds)
    print("\n### TEST loss with each codec on the pseudo-gradients, equal tokens and rounds\n")
    print(f"Columns: *bytes/value* = the codec's payload per pseudo-gradient value (values, indices, scales; "
          f"no framing), measured on this run's vectors; *codec error* = median relative RMS error of a round "
          f"trip against the vector encoded (with error feedback: the pseudo-gradient plus the carried residual); "
          f"*sent vs Δ* = median relative RMS difference of what was sent from that round's pseudo-gradient "
          f"(the same as the codec error without feedback); "
          f"*test loss* = final TEST loss, nats per byte-token, of the global weights, seeds {seed_list}; "
          f"*ratio* = test loss / the same seed's exact-average test loss; *ppl ratio* = mean of exp(loss − exact).\n")
    print(markdown_table(["setup", "codec", "bytes/value", "codec error", "sent vs Δ", f"test loss (seeds {seed_list})",
                          "ratio per seed", "mean ratio", "mean ppl ratio"], rows))
    print()
    for codec in p["codecs"]:
        if codec == "none":
            continue
        ratios = {r["setup"]: r["mean_ratio"] for r in results if r["codec"] == codec}
        held = all(v <= HOLDS_LOSS for v in ratios.values())
        print(f"Result, {codec}: " + ", ".join(f"{s} {v:.3f}" for s, v in ratios.items())
              + f" → {'holds' if held else 'does not hold'} loss (≤ {HOLDS_LOSS}) at "
              f"{next(r['bytes_per_value'] for r in results if r['codec'] == codec):.3f} bytes/value")

    png = plot_codec_curves({(setup, codec, s): out["curve"] for (setup, codec, s), out in by_job.items()})
    out = write_json(NAME, {
        "machine": info, "params": p, "K": K, "setups": SETUPS, "seeds": seeds, "holds_loss": HOLDS_LOSS,
        "outer": {"lr": cfg.outer.lr, "momentum": cfg.outer.momentum}, "results": results,
        "runs": [{"setup": setup, "codec": codec, "seed": s, **o} for (setup, codec, s), o in by_job.items()],
        "elapsed_s": time.perf_counter() - t_start})
    written = " and ".join(str(f.relative_to(REPO)) for f in (out, png) if f)
    print(f"\nwrote {written} in {time.perf_counter() - t_start:.0f} s")


def plot_codec_curves(curves: dict[tuple[str, str, int], tuple[list, list]]) -> Path | None:
    """One panel per setup, one line per codec (mean over seeds), the same color for a codec
    in both panels; into bench-out/bench_outer_codecs.png."""
    setups = sorted({k[0] for k in curves}, key=list(SETUPS).index)
    codecs = [c for c in CODECS if any(k[1] == c for k in curves)]

    def draw(plt):
        fig, axes = plt.subplots(1, len(setups), figsize=(6 * len(setups), 4.5), sharey=True, squeeze=False)
        colors = plt.get_cmap("tab10")
        for ax, setup in zip(axes[0], setups):
            for i, codec in enumerate(codecs):
                runs = [v for k, v in curves.items() if k[0] == setup and k[1] == codec]
                xs = runs[0][0]
                ys = [mean([r[1][j] for r in runs]) for j in range(len(xs))]
                ax.plot(xs, ys, marker="o", markersize=2, color=colors(i % 10),
                        linestyle="--" if "sparseloco" in codec else "-", label=codec)
            ax.set_title(f"{setup}: mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}")
            ax.set_xlabel("inner steps per worker")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("TEST loss, global weights (a subset; nats/byte-token)")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        return fig

    return write_plot(NAME, draw)


def mean(values) -> float:
    return float(statistics.fmean(values))


def model_kwargs(p: dict, levels: list[int], outer: dict = DILOCO) -> dict:
    return {"levels": levels, **{k: p[k] for k in ("d_model", "n_heads", "context", "blocks_per_level",
                                                      "batch_size")},
            "steps_per_round": p["H"], "rounds": p["rounds"],
            "outer_lr": outer["outer_lr"], "outer_momentum": outer["outer_momentum"]}


def train_and_score(p: dict, seed: int, setup: str, codec_id: str) -> dict:
    """One run: final TEST/validation losses of the global weights, a test curve, and what
    the codec did to every pseudo-gradient it carried."""
    docs = load_corpus()
    H, context = p["H"], p["context"]
    factory, feedback, outer = CODECS[codec_id]
    state = RunState.create(small_config(seed, **model_kwargs(p, SETUPS[setup], outer)), docs)
    held = {split: heldout_sequences(state, docs, p["eval_tokens"], split) for split in SPLITS}
    curve_held = heldout_sequences(state, docs, p["curve_tokens"], "test")
    sessions = workers_of(state, docs, K if setup == "DiLoCo" else None)
    codec = ErrorFeedback(factory(), outer["decay"]) if feedback else factory()
    errors: list[float] = []  # the codec's own error on the vector it encoded
    lag: list[float] = []  # what was sent against this round's Δ (differs only with error feedback)
    sent = {"bytes": 0, "values": 0}

    def encode(session, module_id: str, delta):
        if feedback:
            key = (id(session), module_id)
            decoded, payload = codec.roundtrip_for(key, delta)
            encoded = decoded + codec.residuals[key]  # what went in: Δ plus the carried residual
        else:
            decoded, payload = codec.roundtrip(delta)
            encoded = delta
        errors.append(relative_rms(encoded, decoded))
        lag.append(relative_rms(delta, decoded))
        sent["bytes"] += payload
        sent["values"] += delta.numel()
        return decoded

    both_legs = codec_id in RETURN_LEG
    swarm = SimulatedSwarm(sessions, fragments=1, encode=encode,
                           encode_mean=(lambda mean: codec.roundtrip(mean)[0]) if both_legs else None)
    xs, ys = train_with_curve(swarm, p["rounds"], H, curve_held, context)
    final = {split: routed_loss(swarm.global_models(), held[split], context) for split in SPLITS}
    return {"loss": {split: final[split][0] for split in SPLITS},
            "heldout_tokens": {split: final[split][1] for split in SPLITS},
            "codec_name": codec.name + ("" if outer is DILOCO else
                                        f", outer SGD lr {outer['outer_lr']:g} (SparseLoCo)"),
            "bytes_per_value": sent["bytes"] / sent["values"],
            "error_median": statistics.median(errors), "error_quartiles": statistics.quantiles(errors, n=4),
            "sent_vs_round_median": statistics.median(lag),
            "curve": (xs, ys)}


if __name__ == "__main__":
    main()
