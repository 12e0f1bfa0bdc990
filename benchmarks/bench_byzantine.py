"""Byzantine-robust averaging under attack, on real loopback swarms (issue 14).

Each run is a real swarm of in-process nodes (hivemind DHT + averagers + p2pd on
127.0.0.1, opened as `p2ptrain join` opens them) holding the only path of a one-level grid,
so every module is averaged by every peer each round. Liars are real nodes too
(tests/swarm/adversary.py `open_liar`): they train, then alter what they send.

For each attacker fraction (1 of 4, 2 of 8) and attack, the same swarm runs once with the
robust rule and once with `mean`; the honest control (no liar, same honest peers and data
seeds) runs with each rule in the same invocation. Reported:

  loss ratio   honest peers' held-out loss (their agreed global model, mean over honest
               peers) ÷ the honest control's with the same rule: 1.00 = the attack did
               nothing; goal ≤ 1.05 with the robust rule.
  cost         the robust rule's control ÷ mean's control: held-out loss (goal ≤ 1.01),
               averaging stall per round (seconds_outer; the round itself is fixed by the
               schedule) and CPU seconds per round of all processes (goal ≤ 1.10).

With `--cost-pairs N` only the honest controls run: N pairs (robust, mean) per swarm size,
the order inside a pair alternating, and the cost is the median of the N per-pair ratios
(with their range): one pair per size, as the attack mode gives, cannot tell the rule's
cost from run-to-run noise.

    python benchmarks/bench_byzantine.py [--rounds 4] [--robust centered_clip] [--quick]
        [--attacks sign_flip,scale,...] [--eight-attacks sign_flip,garbage_reducer]
    python benchmarks/bench_byzantine.py --cost-pairs 5 [--cost-honest 3,6]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import multiprocessing as mp  # noqa: E402

mp.set_start_method("fork", force=True)  # hivemind's averagers are forked processes

from common import OUT_DIR, base_parser, machine_info, markdown_table, print_header, write_outputs  # noqa: E402

from p2ptrain.data.corpus import load_documents  # noqa: E402
from tests.swarm.adversary import ATTACKS  # noqa: E402
from tests.swarm.byzantine import byzantine_config, heldout_sequences, run_attack  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="one attack, 1 of 4, 2 rounds", threads=False)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--robust", default="centered_clip", choices=("centered_clip", "trimmed_mean"))
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="attacks for 1 liar of 4 peers")
    parser.add_argument("--eight-attacks", default=",".join(ATTACKS),
                        help="attacks for 2 liars of 8 peers ('' to skip)")
    parser.add_argument("--cost-pairs", type=int, default=0, metavar="N",
                        help="only the honest controls: N interleaved (robust, mean) pairs per swarm size")
    parser.add_argument("--cost-honest", default="3,6", help="swarm sizes (honest peers) for --cost-pairs")
    args = parser.parse_args()
    attacks4 = [a for a in args.attacks.split(",") if a]
    attacks8 = [a for a in args.eight_attacks.split(",") if a]
    if args.quick:
        attacks4, attacks8, args.rounds = ["sign_flip"], [], 2
    info = machine_info()
    corpus = load_documents(None, 4096)
    sequences = heldout_sequences(byzantine_config("x", "mean"), corpus)
    runs: list[dict] = []
    partial = OUT_DIR / "bench_byzantine.partial.json"
    OUT_DIR.mkdir(exist_ok=True)

    def run(rule, attack, honest, liars):
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="p2ptrain-byz-") as tmp:
            result = run_attack(Path(tmp), corpus, rule=rule, attack=attack, honest=honest, liars=liars,
                                rounds=args.rounds, sequences=sequences).to_dict()
        result["wall_s"] = time.time() - t0
        runs.append(result)
        partial.write_text(json.dumps(runs, indent=1))
        print(f"  {rule:14s} {attack or 'control':16s} {honest}+{liars}: loss {result['heldout_loss']:.4f} "
              f"banned {result['liars_banned']} rejections {result['rejections']} ({result['wall_s']:.0f} s)",
              flush=True)
        return result

    if args.cost_pairs > 0:
        cost_pairs(args, info, run)
        partial.unlink(missing_ok=True)
        return

    settings = [(3, 1, attacks4)] + ([(6, 2, attacks8)] if attacks8 else [])
    controls: dict[tuple, dict] = {}
    rows = []
    for honest, liars, attacks in settings:
        for rule in (args.robust, "mean"):
            controls[(honest, rule)] = run(rule, None, honest, 0)
        for attack in attacks:
            robust = run(args.robust, attack, honest, liars)
            mean = run("mean", attack, honest, liars)
            rows.append([f"{liars} of {honest + liars}", attack, ATTACKS[attack],
                         f"{robust['heldout_loss'] / controls[(honest, args.robust)]['heldout_loss']:.3f}",
                         f"{mean['heldout_loss'] / controls[(honest, 'mean')]['heldout_loss']:.3f}",
                         f"{robust['liars_banned']}/{liars}", robust["lying_reducer_slices"],
                         f"{robust['honest_spread']:.1e}"])
    cost_rows = []
    for honest, _, _ in settings:
        r, m = controls[(honest, args.robust)], controls[(honest, "mean")]
        cost_rows.append([f"{honest} honest", f"{m['heldout_loss']:.4f}", f"{r['heldout_loss']:.4f}",
                          f"{r['heldout_loss'] / m['heldout_loss']:.3f}",
                          f"{m['seconds_outer']:.2f} / {r['seconds_outer']:.2f}",
                          f"{r['seconds_outer'] / max(m['seconds_outer'], 1e-9):.2f}",
                          f"{m['cpu_seconds_per_round']:.1f} / {r['cpu_seconds_per_round']:.1f}",
                          f"{r['cpu_seconds_per_round'] / max(m['cpu_seconds_per_round'], 1e-9):.2f}"])
    config = byzantine_config("x", args.robust)
    notes = [f"model d_model {config.model.d_model}, 1 block per module, context {config.model.context}, grid [1] "
             f"(stem + L0.M0, every peer averages both), {config.inner.steps_per_round} inner steps × batch "
             f"{config.inner.batch_size} per round, fp16 wire, {args.rounds} rounds of "
             f"{config.averaging.round_seconds:g} s; held-out loss over {sum(len(s) for s in sequences)} tokens",
             f"robust rule: {args.robust}, clip radius auto; loss ratio = honest peers' held-out loss ÷ the honest "
             "control's with the same rule"]
    print_header("Byzantine-robust averaging under attack (bench_byzantine.py)", info, notes)
    print(markdown_table(["liars", "attack", "what the liar does", f"loss ratio, {args.robust}", "loss ratio, mean",
                          f"liars banned ({args.robust})", "refused reducer slices", "honest spread"], rows))
    print()
    print(markdown_table(["control", "loss, mean", f"loss, {args.robust}", "loss ratio",
                          "averaging stall s/round, mean / robust", "ratio", "CPU s/round, mean / robust",
                          "ratio"], cost_rows))
    write_outputs(__file__, {"machine": info, "rounds": args.rounds, "robust_rule": args.robust, "runs": runs,
                             "table": rows, "cost": cost_rows, "notes": notes})
    partial.unlink(missing_ok=True)


def cost_pairs(args, info: dict, run) -> None:
    """--cost-pairs: the robust rule's cost with no attacker, as medians of per-pair ratios."""
    sizes = [int(h) for h in args.cost_honest.split(",") if h]
    pairs: dict[int, list[dict]] = {h: [] for h in sizes}
    for index in range(args.cost_pairs):
        for honest in sizes:
            order = (args.robust, "mean") if index % 2 == 0 else ("mean", args.robust)
            results = {rule: run(rule, None, honest, 0) for rule in order}
            pairs[honest].append({"robust": results[args.robust], "mean": results["mean"]})
    rows, summary = [], {}
    for honest in sizes:
        ratios = {}
        for key in ("heldout_loss", "seconds_outer", "cpu_seconds_per_round"):
            values = [p["robust"][key] / max(p["mean"][key], 1e-9) for p in pairs[honest]]
            ratios[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "per_pair": values}
        summary[honest] = ratios
        stall = [statistics.median(p[r]["seconds_outer"] for p in pairs[honest]) for r in ("mean", "robust")]
        cpu = [statistics.median(p[r]["cpu_seconds_per_round"] for p in pairs[honest]) for r in ("mean", "robust")]
        rows.append([f"{honest} honest", len(pairs[honest]),
                     "{median:.3f} ({min:.3f}–{max:.3f})".format(**ratios["heldout_loss"]),
                     f"{stall[0]:.2f} / {stall[1]:.2f}", "{median:.2f} ({min:.2f}–{max:.2f})".format(**ratios["seconds_outer"]),
                     f"{cpu[0]:.1f} / {cpu[1]:.1f}",
                     "{median:.2f} ({min:.2f}–{max:.2f})".format(**ratios["cpu_seconds_per_round"])])
    config = byzantine_config("x", args.robust)
    notes = [f"model d_model {config.model.d_model}, grid [1], {config.inner.steps_per_round} inner steps per round, "
             f"{args.rounds} rounds of {config.averaging.round_seconds:g} s, no attacker; each pair runs the robust "
             "rule and mean back to back (order alternating); ratios are robust ÷ mean per pair: median (range)"]
    print_header(f"The robust rule's cost with no attacker ({args.robust} vs mean, bench_byzantine.py --cost-pairs)",
                 info, notes)
    print(markdown_table(["control", "pairs", "held-out loss ratio", "averaging stall s/round, mean / robust (medians)",
                          "stall ratio", "CPU s/round, mean / robust (medians)", "CPU ratio"], rows))
    write_outputs(__file__, {"machine": info, "rounds": args.rounds, "robust_rule": args.robust, "mode": "cost_pairs",
                             "pairs": {str(h): p for h, p in pairs.items()},
                             "summary": {str(h): r for h, r in summary.items()}, "table": rows, "notes": notes})


if __name__ == "__main__":
    main()
