"""Claim: the robust aggregation rule costs a reducer little CPU next to the plain mean.

Measured: the CPU time (one torch thread, the reducer's own thread: hivemind runs a
reducer's rule on its averager's event loop) of one slice's aggregation, as the reducer
runs it (`aggregate_reporting`, so centered_clip includes τ and the outlier check), for
`mean`, `centered_clip` and `trimmed_mean`, at group sizes 3 / 4 / 8 / 16, on slices of
131,072 float32 values (p2ptrain cuts a module into 16 parts of at most 512 KiB on the wire:
up to 262,144 fp16 or 524,288 8-bit values; the cost grows with the values). Parts are synthetic,
pseudo-gradient-like: a common direction plus per-peer noise of the same size, token weights
that differ by peer (as `fill_round` makes them); with `--liar`, one part is the others ×100,
so CenteredClip clips and iterates. Each repeat times every rule back to back (interleaved);
the table gives medians over repeats and the per-repeat ratio to `mean`.

`--baseline REV` also times the aggregation module as it was at git revision REV (loaded from
`git show`, in the same process, interleaved with the current one), for a before / after
measured side by side.

Derived (arithmetic on the measured ms, not a swarm measurement): a peer of a group of g
reduces 1/g of each module of its path from g senders, about params_per_path / g values per
round: the aggregation CPU per round of the `gpu` preset's path and its share of the
preset's round (`round_seconds`).

    python benchmarks/bench_aggregation.py [--quick] [--repeats 15] [--baseline 30426b3] [--liar]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import REPO, base_parser, machine_info, markdown_table, print_header, write_outputs  # noqa: E402
from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.info import run_info  # noqa: E402
from p2ptrain.swarm import aggregation  # noqa: E402

SLICE_VALUES = 131_072
GROUP_SIZES = (3, 4, 8, 16)
RULES = ("mean", "centered_clip", "trimmed_mean")
LIAR_SCALE = 100.0
OUTLIER_SCALE_RMS = 1e-3  # the reducer's own pseudo-gradient RMS per value in these parts


def module_at_revision(rev: str) -> ModuleType:
    """p2ptrain/swarm/aggregation.py as it was at git revision rev, imported as its own module."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:p2ptrain/swarm/aggregation.py"], cwd=REPO,
                                check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline {rev}: git cannot show that revision's aggregation.py: "
                         f"{exc.stderr.strip()}") from None
    module = ModuleType("aggregation_baseline")
    sys.modules[module.__name__] = module  # dataclasses and the like look their module up
    exec(compile(source, f"{rev}:p2ptrain/swarm/aggregation.py", "exec"), module.__dict__)
    return module


def make_parts(n: int, values: int, liar: bool, seed: int) -> tuple[list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(values, generator=gen) * OUTLIER_SCALE_RMS
    parts = [common + torch.randn(values, generator=gen) * OUTLIER_SCALE_RMS for _ in range(n)]
    if liar:
        parts[-1] = parts[-1] * LIAR_SCALE
    weights = [float(w) for w in torch.randint(900, 1100, (n,), generator=gen)]
    return parts, weights


def cpu_ms(call, repeats_inside: int = 3) -> float:
    start = time.thread_time()
    for _ in range(repeats_inside):
        call()
    return (time.thread_time() - start) / repeats_inside * 1e3


def measure(n: int, values: int, liar: bool, repeats: int, modules: dict[str, ModuleType]) -> dict:
    parts, weights = make_parts(n, values, liar, seed=n)
    floor = 10.0 * OUTLIER_SCALE_RMS * values ** 0.5  # the reducer's outlier floor (averaging.py)
    variants = [(label, rule) for label in modules for rule in RULES]
    times: dict[str, list[float]] = {f"{label}:{rule}": [] for label, rule in variants}
    for label, rule in variants:  # warm-up: allocations, lazy imports, the network's cache
        modules[label].aggregate_reporting(rule, parts, weights, 0.0, floor)
    for _ in range(repeats):
        for label, rule in variants:
            module = modules[label]
            times[f"{label}:{rule}"].append(
                cpu_ms(lambda: module.aggregate_reporting(rule, parts, weights, 0.0, floor)))
    now = modules["current"]
    ours, _ = now.aggregate_reporting("centered_clip", parts, weights, 0.0, floor)
    result = {"group": n, "values": values, "liar": liar,
              "ms": {key: statistics.median(v) for key, v in times.items()},
              "ratio_to_mean": {key: statistics.median(a / b for a, b in zip(v, times[key.split(":")[0] + ":mean"]))
                                for key, v in times.items()}}
    if "baseline" in modules:
        theirs, _ = modules["baseline"].aggregate_reporting("centered_clip", parts, weights, 0.0, floor)
        result["centered_clip_max_abs_difference_vs_baseline"] = float((ours - theirs).abs().max())
        result["speedup_vs_baseline"] = {
            rule: statistics.median(b / a for a, b in zip(times[f"current:{rule}"], times[f"baseline:{rule}"]))
            for rule in RULES}
    return result


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="groups of 4 and 8, 3 repeats", threads=False)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also time aggregation.py as it was at this git revision")
    parser.add_argument("--liar", action="store_true", help=f"one part is ×{LIAR_SCALE:g} (clipping iterates)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    groups, repeats = ((4, 8), 3) if args.quick else (GROUP_SIZES, args.repeats)
    modules = {"current": aggregation}
    if args.baseline:
        modules["baseline"] = module_at_revision(args.baseline)
    info = machine_info()
    results = [measure(n, SLICE_VALUES, args.liar, repeats, modules) for n in groups]

    gpu = RunConfig.load("gpu")
    params = run_info(gpu)["params_per_path"]
    round_s = gpu.averaging.round_seconds
    print_header("Aggregation CPU per slice: mean vs the robust rules", info, [
        f"one slice = {SLICE_VALUES:,} float32 values from each of g senders; CPU ms of one torch thread, "
        f"median of {repeats} interleaved repeats; {'one part ×100 (a liar)' if args.liar else 'honest parts'}",
        f"per round (derived): the gpu preset's path ({params / 1e6:.0f}M parameters) — a group member "
        f"reduces ≈ params / g values per round; share of the preset's {round_s:.0f} s round"])
    headers = ["g", *(f"{label} {rule} ms" for label in modules for rule in RULES),
               "centered_clip ÷ mean", "trimmed_mean ÷ mean"]
    if "baseline" in modules:
        headers += ["centered_clip speed-up vs baseline", "trimmed_mean speed-up vs baseline",
                    "max |difference| vs baseline"]
    headers += ["gpu path: centered_clip s/round", "gpu path: mean s/round", "centered_clip share of round"]
    rows = []
    for r in results:
        slices = params / r["group"] / SLICE_VALUES
        clip_s, mean_s = slices * r["ms"]["current:centered_clip"] / 1e3, slices * r["ms"]["current:mean"] / 1e3
        r["gpu_path_seconds_per_round"] = {"centered_clip": clip_s, "mean": mean_s, "share": clip_s / round_s}
        row = [r["group"], *(f"{r['ms'][f'{label}:{rule}']:.2f}" for label in modules for rule in RULES),
               f"{r['ratio_to_mean']['current:centered_clip']:.1f}×", f"{r['ratio_to_mean']['current:trimmed_mean']:.1f}×"]
        if "baseline" in modules:
            row += [f"{r['speedup_vs_baseline']['centered_clip']:.2f}×", f"{r['speedup_vs_baseline']['trimmed_mean']:.2f}×",
                    f"{r['centered_clip_max_abs_difference_vs_baseline']:.1e}"]
        row += [f"{clip_s:.2f}", f"{mean_s:.2f}", f"{clip_s / round_s:.2%}"]
        rows.append(row)
    print(markdown_table(headers, rows))
    print()
    write_outputs(__file__, {"info": info, "slice_values": SLICE_VALUES, "repeats": repeats, "liar": args.liar,
                             "baseline": args.baseline, "gpu_params_per_path": params, "gpu_round_seconds": round_s,
                             "results": results})


if __name__ == "__main__":
    main()
