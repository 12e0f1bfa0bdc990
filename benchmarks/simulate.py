"""Swarm simulator: projects utilization and time-to-target for 100, 1,000 and 10,000
volunteer peers from measured per-round costs and assumed distributions of volunteer
compute, bandwidth and churn; `--validate` checks the same model against real loopback
swarms of 4–16 peers on this machine. The model is in benchmarks/swarm_model.py.

    python benchmarks/simulate.py               # projection (seconds)
    python benchmarks/simulate.py --quick       # smaller projection, smoke test
    flock /tmp/p2ptrain-loopback.lock python benchmarks/simulate.py --validate   # minutes
    python benchmarks/simulate.py --validate --measured bench-out/simulate_loopback.json  # re-fit, no swarms
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

from bench_swarm import BYTES_PER_VALUE, module_sizes
from common import OUT_DIR, machine_info, markdown_table, print_header
from p2ptrain.config import RunConfig
from p2ptrain.model.grid import Grid
from swarm_model import Overheads, Volunteers, Workload, simulate

MEASURED_FILE = OUT_DIR / "simulate_loopback.json"
CALIBRATION_FILE = OUT_DIR / "simulate_calibration.json"
SIZES = (100, 1000, 10000)
VALIDATION_RUNS = ((4, False), (8, False), (16, False), (4, True), (8, True))
LOOPBACK_CORES = 2

# Used until `--validate` has written bench-out/simulate_calibration.json: the fit to the
# 4-peer plain and overlap loopback runs of 2026-11-24 (default preset, H=10, 3 s windows).
# Plain: the outer step's fixed part (DHT records and fetches, fingerprint check, hivemind's
# own work, checkpoint) beyond the window and the transfer; overlap: what still stalls training.
DEFAULT_CALIBRATION = {"outer_fixed_s": 0.59, "foreground_fixed_s": 0.27, "step_s": 0.76, "peers": 4}

# --------------------------------------------------------------- volunteers (assumptions)
#
# Bandwidth: Ookla's Speedtest Global Index puts the global median of fixed broadband at
# ~100 Mbit/s down (107.5 in July 2021) and ~40–45 up (44 in Aug 2020), but upload is
# dominated by fiber countries; cable/DSL plans upload 10–35. We take 100 down / 25 up
# medians, log-normal with sigma 0.8 (a factor 2.2 either way covers 68 %).
# RTT: 60 ms median between home peers on one continent, sigma 0.5 (inter-continental
# pairs at 150–250 ms are in the tail).
# Churn: exponential sessions of 4 h mean (volunteer hosts in BOINC-like availability
# studies run for hours, not minutes); 30 % of departures are crashes (no clean stop).
# Compute: the gpu preset's step is 6 × params × tokens (+ attention) FLOPs; a median
# volunteer GPU (RTX 3060/4060 class) sustains ~10 TFLOP/s at ~35 % of its dense fp16
# peak, sigma 0.6 across machines (a 4090 is ~3× faster, a 2060 ~2× slower). The default
# (CPU) preset runs on a volunteer's 2 cores: 1/4 of the per-peer step time measured with
# 4 peers on this machine's 2 cores, same sigma.
NETWORK = dict(up_mbps=25.0, up_sigma=0.8, down_mbps=100.0, down_sigma=0.8, rtt_ms=60.0, rtt_sigma=0.5)
CHURN = dict(mean_session_h=4.0, crash_fraction=0.3)
GPU_FLOPS = 10e12
MACHINE_SIGMA, ROUND_JITTER = 0.6, 0.05
JOIN_S = 30.0  # process start, DHT bootstrap, run record (loopback: ~1.5 s + torch import)


def workload(config: RunConfig, name: str) -> Workload:
    grid = Grid.from_config(config.grid)
    return Workload(name=name, steps_per_round=config.inner.steps_per_round,
                    tokens_per_step=config.inner.batch_size * config.model.context,
                    module_params=module_sizes(config), paths=[grid.modules_of(p) for p in grid.paths()],
                    bytes_per_value=BYTES_PER_VALUE[config.averaging.compression],
                    matchmaking_time=config.averaging.matchmaking_time,
                    averaging_timeout=config.averaging.averaging_timeout,
                    target_group_size=config.averaging.target_group_size, overlap=config.averaging.overlap)


def flops_per_step(config: RunConfig, path_params: int) -> float:
    """6 × params × tokens for the dense part, plus attention scores (6 × layers × ctx × d per token)."""
    tokens = config.inner.batch_size * config.model.context
    layers = len(config.grid.levels) * config.grid.blocks_per_level
    return 6 * path_params * tokens + 6 * layers * config.model.context * config.model.d_model * tokens


def record_bytes(work: Workload) -> int:
    """One peer's signed record as stored in the peer table: msgpack of a record with its
    path's fingerprints, plus the RSA signature and the public-key subkey."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.serializer import MSGPackSerializer
    from p2ptrain.swarm.averaging import FINGERPRINT_DIMS
    from p2ptrain.swarm.records import ModuleSync, new_peer_record
    sync = {m: ModuleSync(round=123, fingerprint=[0.123456789] * FINGERPRINT_DIMS, scale=1.5) for m in work.paths[0]}
    record = new_peer_record(peer_id="12D3KooW" + "x" * 44, path=[0] * (len(work.paths[0]) - 1), round=123,
                             loss=2.5, tokens_per_s=1234.5, tokens=10 ** 9, sync=sync,
                             maddrs=["/ip4/203.0.113.7/tcp/31338/p2p/12D3KooW" + "x" * 44])
    signer = RSASignatureValidator()
    signature = signer.SIGNATURE_FORMAT.replace(b"_value_", signer._private_key.sign(b"x"))
    return len(MSGPackSerializer.dumps(record.dict())) + len(signature) + len(signer.local_public_key)


def load_calibration() -> dict:
    if CALIBRATION_FILE.exists():
        return json.loads(CALIBRATION_FILE.read_text())
    return dict(DEFAULT_CALIBRATION, source="built-in defaults (no bench-out/simulate_calibration.json)")


# --------------------------------------------------------------- projection

def volunteer_overheads(calibration: dict, work: Workload) -> Overheads:
    """The loopback's fixed per-round cost came with `peers` peers on 2 cores; a volunteer
    has its machine to itself, so it is divided by that contention."""
    contention = calibration["peers"] / LOOPBACK_CORES
    return Overheads(outer_fixed_s=calibration["outer_fixed_s"] / contention,
                     foreground_fixed_s=calibration["foreground_fixed_s"] / contention,
                     join_s=JOIN_S, record_bytes=record_bytes(work))


def preset_volunteers(config: RunConfig, work: Workload, calibration: dict, preset: str) -> Volunteers:
    if preset == "gpu":
        path_params = sum(work.module_params[m] for m in work.paths[0])
        step_s = flops_per_step(config, path_params) / GPU_FLOPS
    else:  # CPU volunteers with 2 cores each: 4× the CPU share a loopback peer had among 4
        step_s = calibration["step_s"] * LOOPBACK_CORES / calibration["peers"]
    return Volunteers(step_s=step_s, step_sigma_peer=MACHINE_SIGMA, step_sigma_round=ROUND_JITTER,
                      **NETWORK, **CHURN)


def project(sizes: tuple[int, ...], rounds: float, calibration: dict) -> list[dict]:
    rows = []
    for preset in ("default", "gpu"):
        for overlap in (False, True):
            config = RunConfig.load(preset)
            config.averaging.overlap = overlap
            work = workload(config, preset)
            vol = preset_volunteers(config, work, calibration, preset)
            over = volunteer_overheads(calibration, work)
            for n in sizes:
                result = simulate(work, vol, over, n, rounds=rounds, seed=n)
                result.update(preset=preset, step_s=vol.step_s, H=work.steps_per_round,
                              target_group_size=work.target_group_size, record_bytes=over.record_bytes)
                rows.append(result)
    return rows


def hours(h: float) -> str:
    if not math.isfinite(h):
        return "never"
    return f"{h * 60:.1f} min" if h < 1 else (f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d")


def projection_table(rows: list[dict]) -> str:
    headers = ["preset", "averaging", "peers", "wall per round", "utilization (compute / wall)",
               "mean group stem / level", "lineage share", "effective utilization", "effective tokens/s",
               "all-reduce MB per peer-round", "peer table MB", "time to target"]
    return markdown_table(headers, [[
        r["preset"], "overlap" if r["overlap"] else "plain", f"{r['peers']:,}", f"{r['wall_per_round_s']:.0f} s",
        f"{r['utilization']:.2f}", f"{r['mean_group']['stem']:.1f} / {r['mean_group']['level']:.1f}",
        f"{r['lineage_share']:.3f}", f"{r['effective_utilization']:.3f}", f"{r['effective_tokens_per_s']:,.0f}",
        f"{r['mb_sent_per_peer_round']:.1f}", f"{r['peer_table_mb']:.1f}", hours(r["time_to_target_h"])]
        for r in rows])


# --------------------------------------------------------------- validation

def loopback_volunteers(measured: dict) -> Volunteers:
    """This machine as the 'network': loopback links (CPU-bound, not bandwidth-bound) and
    the step times measured at this very swarm size, since the peers share 2 cores."""
    per_peer = np.log(measured["step_s_per_peer"])
    residuals = [math.log(s) - math.log(statistics.median(measured["step_s_all"]))
                 for s in measured["step_s_all"]]
    return Volunteers(step_s=measured["step_s_median"], step_sigma_peer=float(np.std(per_peer)),
                      step_sigma_round=max(float(np.std(residuals)) ** 2 - float(np.var(per_peer)), 0.0) ** 0.5,
                      up_mbps=10_000.0, up_sigma=0.0, down_mbps=10_000.0, down_sigma=0.0, rtt_ms=0.05, rtt_sigma=0.0)


def loopback_workload(measured: dict) -> Workload:
    import loopback_runs
    config = loopback_runs.loopback_config(measured["peers"], measured["overlap"], measured["steps_per_round"],
                                           measured["rounds"], measured["matchmaking_time"])
    return workload(config, "loopback")


def predict(measured: dict, fixed_s: float, reference: dict) -> dict:
    """Simulate the measured swarm; CPU-bound fixed costs are scaled by the contention
    factor read off the step times (this size vs the calibration size)."""
    work = loopback_workload(measured)
    contention = measured["step_s_median"] / reference["step_s_median"]
    over = Overheads(outer_fixed_s=fixed_s * contention * (not work.overlap),
                     foreground_fixed_s=fixed_s * contention * work.overlap, join_s=0.0, record_bytes=1500)
    # rounds: the measured run's steady rounds (2..5) and a few more for stable medians
    return simulate(work, loopback_volunteers(measured), over, measured["peers"], rounds=8, seed=1)


def fit_fixed_cost(measured: dict) -> float:
    """The one fitted constant per mode: the fixed per-round cost that makes the predicted
    wall per round match the measured one at the calibration size (wall is linear in it)."""
    zero = predict(measured, 0.0, measured)["wall_per_round_s"]
    one = predict(measured, 1.0, measured)["wall_per_round_s"]
    return max((measured["wall_per_round_s"] - zero) / max(one - zero, 1e-9), 0.0)


def validate(measured_runs: list[dict]) -> tuple[list[dict], dict]:
    rows, calibration = [], {}
    for overlap in (False, True):
        runs = sorted((m for m in measured_runs if m["overlap"] == overlap), key=lambda m: m["peers"])
        if not runs:
            continue
        reference = runs[0]
        fixed = fit_fixed_cost(reference)
        calibration["foreground_fixed_s" if overlap else "outer_fixed_s"] = fixed
        if not overlap:
            calibration.update(step_s=reference["step_s_median"], peers=reference["peers"])
        for m in runs:
            p = predict(m, fixed, reference)
            rows.append({"measured": {k: v for k, v in m.items() if k != "rounds_by_peer"}, "predicted": p,
                         "fitted_here": m is reference, "fixed_s": fixed})
    calibration.setdefault("foreground_fixed_s", DEFAULT_CALIBRATION["foreground_fixed_s"])
    return rows, calibration


def rel_error(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured:+.0%}" if measured else "-"


def validation_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        m, p = r["measured"], r["predicted"]
        label = f"{'overlap' if m['overlap'] else 'plain'}{' (calibration)' if r['fitted_here'] else ''}"
        for name, pv, mv, fmt in (
                ("wall per round (s)", p["wall_per_round_s"], m["wall_per_round_s"], "{:.1f}"),
                ("utilization", p["utilization"], m["utilization"], "{:.3f}"),
                ("mean stem group", p["mean_group"]["stem"], m["mean_group"]["stem"], "{:.2f}"),
                ("mean level group", p["mean_group"]["level"], m["mean_group"]["level"], "{:.2f}"),
                # the model counts the all-reduce only; loopback bytes also carry DHT records and re-syncs
                ("MB sent per peer-round", p["mb_sent_per_peer_round"], m["loopback_bytes_per_peer_round"] / 1e6,
                 "{:.2f}")):
            out.append([label, m["peers"], f"{m['step_s_median']:.2f}", name, fmt.format(pv), fmt.format(mv),
                        rel_error(pv, mv)])
    return markdown_table(["averaging", "peers", "measured s/step (input)", "quantity", "predicted", "measured",
                           "error"], out)


def run_validation_swarms(runs: tuple, steps_per_round: int, rounds: int) -> list[dict]:
    import loopback_runs
    measured = []
    for n, overlap in runs:
        print(f"running a real loopback swarm: {n} peers, {'overlap' if overlap else 'plain'}", flush=True)
        measured.append(loopback_runs.run_loopback(n, overlap, steps_per_round, rounds))
        OUT_DIR.mkdir(exist_ok=True)
        MEASURED_FILE.write_text(json.dumps(measured, indent=1))
    return measured


# --------------------------------------------------------------- output

def draw_projection(axes, projection: list[dict]) -> None:
    for preset in ("default", "gpu"):
        for overlap in (False, True):
            rs = [r for r in projection if r["preset"] == preset and r["overlap"] == overlap]
            label = f"{preset} {'overlap' if overlap else 'plain'}"
            peers = [r["peers"] for r in rs]
            axes[0].plot(peers, [r["utilization"] for r in rs], marker="o", label=label)
            axes[1].plot(peers, [r["effective_tokens_per_s"] for r in rs], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="peers", ylabel="utilization (compute / wall)", ylim=(0, 1.05),
                title="projection: utilization")
    axes[1].set(xscale="log", yscale="log", xlabel="peers", ylabel="effective tokens/s",
                title="projection: effective throughput")
    axes[0].legend()


def draw_validation(axes, validation: list[dict]) -> None:
    for overlap in (False, True):
        rs = [r for r in validation if r["measured"]["overlap"] == overlap]
        mode = "overlap" if overlap else "plain"
        peers = [r["measured"]["peers"] for r in rs]
        for ax, key in zip(axes, ("wall_per_round_s", "utilization")):
            ax.plot(peers, [r["measured"][key] for r in rs], "o-", label=f"{mode} measured")
            ax.plot(peers, [r["predicted"][key] for r in rs], "x--", label=f"{mode} predicted")
    axes[0].set(xlabel="peers (loopback, 2 cores)", ylabel="wall per round (s)", title="validation: wall per round")
    axes[1].set(xlabel="peers (loopback, 2 cores)", ylabel="utilization", ylim=(0, 1.05),
                title="validation: utilization")
    axes[0].legend()


def plot(projection: list[dict] | None, validation: list[dict] | None, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if projection:
        draw_projection(axes, projection)
    if validation:
        draw_validation(axes, validation)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validation_report(args: argparse.Namespace, info: dict) -> dict:
    """Run (or reuse) the loopback swarms, fit, predict, print; stores the calibration."""
    if args.measured:
        measured, source = json.loads(args.measured.read_text()), str(args.measured)
    else:
        runs = tuple(r for r in VALIDATION_RUNS if r[0] <= 8) if args.quick else VALIDATION_RUNS
        measured, source = run_validation_swarms(runs, steps_per_round=10, rounds=5), "this run"
    validation, calibration = validate(measured)
    OUT_DIR.mkdir(exist_ok=True)
    CALIBRATION_FILE.write_text(json.dumps(calibration, indent=1))
    print_header("Swarm simulator: validation against real loopback swarms", info, [
        f"real peers: `p2ptrain join` processes on 127.0.0.1, default preset, H=10, matchmaking 3 s, 5 rounds "
        f"(steady rounds 2–5); measurements from {source}",
        "inputs per size: the measured step time (the peers share 2 cores, so it grows with the peer count) and "
        "its spread; loopback links; one fixed per-round cost per mode fitted at the smallest size, scaled by "
        "the step-time contention factor at the others",
        f"fitted: plain {calibration['outer_fixed_s']:.2f} s per round, overlap "
        f"{calibration['foreground_fixed_s']:.2f} s per round (at the calibration size)"])
    print(validation_table(validation))
    print()
    return {"validation": validation, "calibration": calibration, "measured_source": source}


def projection_report(args: argparse.Namespace, info: dict) -> dict:
    calibration = load_calibration()
    sizes = SIZES[:2] if args.quick else SIZES
    projection = project(sizes, rounds=6 if args.quick else args.rounds, calibration=calibration)
    print_header("Swarm simulator: projection to volunteer swarms", info, [
        f"calibration: {calibration.get('source', CALIBRATION_FILE.name)}; fixed per-round cost "
        f"{calibration['outer_fixed_s']:.2f} s (plain) / {calibration['foreground_fixed_s']:.2f} s (overlap) "
        f"at {calibration['peers']} peers on 2 cores, divided by that contention for a volunteer's own machine",
        f"volunteers: up {NETWORK['up_mbps']:.0f} / down {NETWORK['down_mbps']:.0f} Mbit/s medians (log-normal "
        f"sigma 0.8), RTT {NETWORK['rtt_ms']:.0f} ms, sessions {CHURN['mean_session_h']:.0f} h mean (30 % "
        f"crashes); gpu step {projection[-1]['step_s']:.2f} s median (10 TFLOP/s), default step "
        f"{projection[0]['step_s']:.3f} s median; machine spread sigma {MACHINE_SIGMA}",
        "lineage share: the fraction of tokens in the module copy that survives p2ptrain's drift re-sync "
        "(Σn²/M² of each module's groups per round); effective utilization: effective tokens / what the peers "
        "could compute in that wall time (≈ utilization × lineage share); time to target: 20 tokens per "
        "parameter of all modules (Chinchilla) at the steady effective rate",
        f"peer table: one DHT key holding every peer's signed record ({projection[0]['record_bytes']} B each), "
        "fetched twice per round by every peer"])
    print(projection_table(projection))
    print()
    return {"projection": projection, "calibration": calibration,
            "assumptions": dict(NETWORK, **CHURN, gpu_flops=GPU_FLOPS, machine_sigma=MACHINE_SIGMA,
                                round_jitter=ROUND_JITTER, join_s=JOIN_S)}


def write_results(name: str, payload: dict) -> None:
    """bench-out/<name>.json and .png: the projection and the validation go to separate
    files, so one does not overwrite the other (common.write_outputs names files by script)."""
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float) + "\n")
    png = plot(payload.get("projection"), payload.get("validation"), OUT_DIR / f"{name}.png")
    print(f"wrote {path.relative_to(OUT_DIR.parent)}" + (f" and {png.relative_to(OUT_DIR.parent)}" if png else
                                                          " (no plot: matplotlib is not importable)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="projection at 100 and 1,000 peers over fewer rounds; with --validate, 4 and 8 peers")
    parser.add_argument("--validate", action="store_true",
                        help="run real loopback swarms (4–16 peers, minutes; wrap in flock) and compare")
    parser.add_argument("--measured", type=Path, default=None,
                        help="with --validate: reuse these stored loopback measurements instead of running swarms")
    parser.add_argument("--rounds", type=float, default=12, help="simulated rounds per projection")
    args = parser.parse_args()
    info = machine_info()
    if args.validate:
        write_results("simulate_validation", {"machine": info, **validation_report(args, info)})
    else:
        write_results("simulate", {"machine": info, **projection_report(args, info)})


if __name__ == "__main__":
    main()
