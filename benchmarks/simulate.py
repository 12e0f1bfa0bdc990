"""Swarm simulator: projects utilization and time-to-target for 100, 1,000 and 10,000
volunteer peers from measured per-round costs and assumed distributions of volunteer
compute, bandwidth and churn; `--validate` checks the same model against real loopback
swarms of 4–16 peers on this machine. The model is in benchmarks/swarm_model.py.

    python benchmarks/simulate.py               # projection + scaling levers (minutes)
    python benchmarks/simulate.py --quick       # 100 and 1,000 peers, fewer levers (seconds)

The projection also runs the scaling levers of issue 16 B (swarm_model.Levers) alone and
together and draws docs/performance/simulate_scaling.png (effective tokens/s vs peers).
    flock /tmp/p2ptrain-loopback.lock python benchmarks/simulate.py --validate   # minutes
    flock /tmp/p2ptrain-loopback.lock python benchmarks/simulate.py --validate --quick --hetero
        # 4 and 8 peers, plus heterogeneous swarms: some peers slowed by a CPU cgroup quota (root)
    flock /tmp/p2ptrain-loopback.lock python benchmarks/simulate.py --validate --shaped
        # every peer in its own network namespace, links rate-limited with tc (root, iproute2)
    python benchmarks/simulate.py --validate --measured bench-out/simulate_loopback.json  # re-fit, no swarms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from bench_swarm import BYTES_PER_VALUE, module_sizes
from common import OUT_DIR, machine_info, markdown_table, print_header
from p2ptrain.config import RunConfig
from p2ptrain.model.grid import Grid
from p2ptrain.swarm.averaging import sync_tolerance
from shaped_links import UNLIMITED_MBPS
from swarm_model import (DHT_REPLICAS, NF4_BYTES_PER_VALUE, Levers, Overheads, Volunteers, Workload,
                         chunk_timeout_s, simulate)

MEASURED_FILE = OUT_DIR / "simulate_loopback.json"
MEASURED_SHAPED_FILE = OUT_DIR / "simulate_shaped.json"
CALIBRATION_FILE = OUT_DIR / "simulate_calibration.json"
SIZES = (100, 1000, 10000)
VALIDATION_RUNS = ((4, False), (8, False), (16, False), (32, False), (4, True), (8, True), (16, True))
# --hetero: (peers, overlap, fill_round, indices of the slowed peers). Peer i trains path
# PATHS[i // (peers / 4)], so (3,) slows one of 4 (path 1,1) and (1, 3, 5, 7) one peer of each
# path at 8. Capped rounds (fill_round off, as above) and time-based rounds (on, the default),
# plus a homogeneous time-based run beside them.
HETERO_RUNS = ((4, False, False, (3,)), (8, False, False, (1, 3, 5, 7)),
               (4, False, True, ()), (4, False, True, (3,)), (8, False, True, (1, 3, 5, 7)))
# a slowed peer's CPU quota: SLOW_FACTOR × slower than an unslowed peer's share when every peer
# trains (k slowed of n on 2 cores: quota q with (2 − k·q) / (n − k) = SLOW_FACTOR · q)
SLOW_FACTOR = 2.5
LOOPBACK_CORES = 2
# --shaped: (peers, overlap, fill_round, slowed, links, declared): every peer in its own
# network namespace (shaped_links.py), its link limited to the given Mbit/s each way (None:
# not limited). At 4 peers: all unlimited first (the fixed cost is fitted on it), then every
# link at 8 Mbit/s, then one peer of four (path 1,1) at 2 Mbit/s; plain and overlap. At
# 8 Mbit/s a peer's all-reduces of a round (1.7 MB sent) take about 1.7 s, at 2 Mbit/s about
# 7 s. At 8 peers (level groups of 4), peers 3 and 5 at 4 Mbit/s, one in each level group,
# without and with every peer declaring its upload (--upload-mbps: hivemind's
# bandwidth-weighted shares, the model's Levers(balanced=True)); plain, in 30 s rounds: in
# 15 s rounds (2026-12-05) 8 peers training on 2 cores with two such links missed groups
# (stem groups of 5.0 of 8) and skipped rounds.
SHAPED_RUNS = (tuple((4, overlap, False, (), links, False) for overlap in (False, True)
                     for links in ((None,) * 4, (8.0,) * 4, (None, None, None, 2.0)))
               + tuple((8, False, False, (), (None, None, None, 4.0, None, 4.0, None, None), declared)
                       for declared in (False, True)))
SHAPED_ROUND_S = {8: 30.0}  # --shaped: round length by swarm size (validation_round_s otherwise)

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
                    target_group_size=config.averaging.target_group_size, overlap=config.averaging.overlap,
                    round_seconds=config.averaging.round_seconds,
                    sync_tolerance=sync_tolerance(config.averaging.compression, config.averaging.sync_tolerance))


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
    sync = {m: ModuleSync(round=123, fingerprint=[0.123456789] * FINGERPRINT_DIMS, norm=123.456789, step=0.123456789)
            for m in work.paths[0]}
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


def fitted_round_seconds(work: Workload, vol: Volunteers) -> float:
    """A round length for a preset that ships none: twice the median peer's H steps (the
    other half for averaging), rounded up to 10 s. Fixed before any projection was run."""
    return float(math.ceil(2 * work.steps_per_round * vol.step_s / 10) * 10)


def preset_inputs(preset: str, calibration: dict, overlap: bool = False, fit_round: bool = True):
    """The simulator's inputs for a preset: (work, volunteers, overheads, config); with
    fit_round, T the larger of the preset's round_seconds and 2 × H × the median step."""
    config = RunConfig.load(preset)
    config.averaging.overlap = overlap
    work = workload(config, preset)
    vol = preset_volunteers(config, work, calibration, preset)
    over = volunteer_overheads(calibration, work)
    if fit_round:
        work = dataclasses.replace(work, round_seconds=max(work.round_seconds, fitted_round_seconds(work, vol)))
    return work, vol, over, config


def project(sizes: tuple[int, ...], rounds: float, calibration: dict) -> list[dict]:
    """The aligned model for both presets, plain and overlap; for a preset whose round
    length is the config default, also at fitted_round_seconds."""
    rows = []
    for preset in ("default", "gpu"):
        for overlap in (False, True):
            work, vol, over, _ = preset_inputs(preset, calibration, overlap, fit_round=False)
            variants = [(work, "preset")]
            fitted = fitted_round_seconds(work, vol)
            if fitted > work.round_seconds:  # the preset's rounds cannot hold its H steps
                variants.append((dataclasses.replace(work, round_seconds=fitted), "2 × H × median step"))
            for w, source in variants:
                for n in sizes:
                    result = simulate(w, vol, over, n, rounds=rounds, seed=n)
                    result.update(preset=preset, step_s=vol.step_s, H=w.steps_per_round, round_source=source,
                                  target_group_size=w.target_group_size, record_bytes=over.record_bytes)
                    rows.append(result)
    return rows


COMPARE_SIZES = (100, 1000)
REPO_ROOT = Path(__file__).resolve().parent.parent
SCALING_PLOT = REPO_ROOT / "docs" / "performance" / "simulate_scaling.png"


def compare_models(sizes: tuple[int, ...], rounds: float, calibration: dict) -> list[dict]:
    """Plain averaging under the step-counted rule (peers in phase, as this simulator
    assumed before issue 10, and at random phases) next to the aligned rule, same volunteers."""
    rows = []
    for preset in ("default", "gpu"):
        work, vol, over, _ = preset_inputs(preset, calibration, fit_round=False)
        fitted = dataclasses.replace(work, round_seconds=max(work.round_seconds, fitted_round_seconds(work, vol)))
        for n in sizes:
            for label, kwargs, w in (("steps, in phase", dict(model="steps", random_phase=False), work),
                                     ("steps, random phases", dict(model="steps", random_phase=True), work),
                                     ("aligned, random phases", dict(model="aligned"), fitted)):
                result = simulate(w, vol, over, n, rounds=rounds, seed=n, **kwargs)
                result.update(preset=preset, label=label, round_seconds=w.round_seconds if "aligned" in label
                              else None)
                rows.append(result)
    return rows


# --------------------------------------------------------------- scaling levers (issue 16 B)
#
# Each lever alone, then together, against today's rules (the baseline), same volunteers and
# seeds; overlap averaging; T = the larger of the preset's round_seconds and 2 × H × median step.
LEVER_SETS = (
    ("baseline (today)", Levers()),
    ("fill", Levers(fill=True)),
    ("staged", Levers(staged=True)),
    ("balanced", Levers(balanced=True)),
    ("1/4 fragments", Levers(fragments=4)),
    ("full table, replicas charged", Levers(table_contention=True)),
    ("sampled table, replicas charged", Levers(table="sampled", table_contention=True)),
    ("fill + staged + balanced", Levers(fill=True, staged=True, balanced=True)),
    ("all, full table (rank coordinates)", Levers(fill=True, staged=True, balanced=True, fragments=4,
                                                  table_contention=True)),
    ("all, sampled table (hashed coordinates)", Levers(fill=True, staged=True, coords="hash", balanced=True,
                                                       fragments=4, table="sampled", table_contention=True)),
    ("all, sampled table (hashed), +1 stage", Levers(fill=True, staged=True, coords="hash", extra_stages=1,
                                                      balanced=True, fragments=4, table="sampled",
                                                      table_contention=True)),
    ("all but fragments, sampled table (hashed)", Levers(fill=True, staged=True, coords="hash", balanced=True,
                                                         table="sampled", table_contention=True)),
    ("all, sampled table (assembled groups)", Levers(fill=True, staged=True, coords="assembled", balanced=True,
                                                     fragments=4, table="sampled", table_contention=True)),
    ("4-bit (NF4)", Levers(wire_bytes_per_value=NF4_BYTES_PER_VALUE)),
    ("all (assembled), 4-bit instead of fragments", Levers(fill=True, staged=True, coords="assembled", balanced=True,
                                                           table="sampled", table_contention=True,
                                                           wire_bytes_per_value=NF4_BYTES_PER_VALUE)),
    ("all (assembled), 4-bit, 1/2 fragments", Levers(fill=True, staged=True, coords="assembled", balanced=True,
                                                     fragments=2, table="sampled", table_contention=True,
                                                     wire_bytes_per_value=NF4_BYTES_PER_VALUE)),
    ("all (assembled), later stages wait 1/5 round", Levers(fill=True, staged=True, coords="assembled",
                                                             balanced=True, fragments=4, table="sampled",
                                                             table_contention=True, stage_window_rounds=0.2)),
    ("all (assembled) + 4-bit", Levers(fill=True, staged=True, coords="assembled", balanced=True, fragments=4,
                                       table="sampled", table_contention=True,
                                       wire_bytes_per_value=NF4_BYTES_PER_VALUE)),
)
AFTER_ASSEMBLED = "all, sampled table (assembled groups)"
AFTER_WAIT = "all (assembled), later stages wait 1/5 round"  # p2ptrain's stage_wait default, with overlap
AFTER = "all, sampled table (hashed coordinates)"  # the configuration p2ptrain can implement without a full table


# Every lever row runs on LEVER_SEEDS seeds (volunteers, sessions, crashes): one seed's
# projection at 10,000 peers swung from 0.14 to 1.0 utilization (2026-12-06). The seeds
# n + 100 + i are disjoint from those (n and 1-3) on which stage_window_rounds was chosen.
LEVER_SEEDS = 3


def lever_seeds(n: int, count: int) -> list[int]:
    return [n + 100 + i for i in range(count)]


def seeded_rows(work: Workload, vol: Volunteers, over: Overheads, sets, sizes: tuple[int, ...], rounds: float,
                count: int, **fields) -> list[dict]:
    """Each (label, levers) of `sets` at each size on `count` seeds; a row is the seed with the
    median effective tokens/s, with every seed's figures alongside (*_seeds); its ÷ column
    pairs seed i at n peers with seed i at 100."""
    rows = []
    for label, levers in sets:
        for n in sizes:
            runs = [simulate(work, vol, over, n, rounds=rounds, seed=seed, levers=levers)
                    for seed in lever_seeds(n, count)]
            result = dict(sorted(runs, key=lambda r: r["effective_tokens_per_s"])[len(runs) // 2])
            for key in ("effective_tokens_per_s", "utilization", "lineage_share", "outer_s"):
                result[f"{key}_seeds"] = [r[key] for r in runs]
            result.update(label=label, step_s=vol.step_s, H=work.steps_per_round, seeds=lever_seeds(n, count),
                          sync_tolerance=work.sync_tolerance, overlap=work.overlap, **fields)
            rows.append(result)
    by = {(r["label"], r["peers"]): r for r in rows}
    for r in rows:  # near-linear? effective tokens/s against peers/100 × its own 100-peer figure, seed by seed
        base = by.get((r["label"], 100))
        ratios = [e / (r["peers"] / 100 * b) if b > 0 else math.nan
                  for e, b in zip(r["effective_tokens_per_s_seeds"], base["effective_tokens_per_s_seeds"])] \
            if base else [math.nan]
        r["scaling_vs_100_seeds"] = ratios
        r["scaling_vs_100"] = float(np.median(ratios))
    return rows


def lever_study(sizes: tuple[int, ...], rounds: float, calibration: dict, quick: bool) -> list[dict]:
    """Every lever set, overlap averaging, both presets (seeded_rows)."""
    rows = []
    sets = [ls for ls in LEVER_SETS if not quick or ls[0] in ("baseline (today)", "fill", "staged", AFTER,
                                                               AFTER_ASSEMBLED, AFTER_WAIT)]
    for preset in ("gpu", "default"):
        work, vol, over, config = preset_inputs(preset, calibration, overlap=True)
        rows += seeded_rows(work, vol, over, sets, sizes, rounds, 1 if quick else LEVER_SEEDS, preset=preset,
                            compression=config.averaging.compression)
    return rows


# What p2ptrain can run: the built levers, plain or overlapped, whole modules or 1/4 fragments
# (fragments with overlap since 2026-12-06), averaging.stage_wait (acts only with overlap) at 0
# or its default 0.2. With overlap and fragments these are the lever table's "all (assembled)"
# rows, on the same seeds, but for column filling: p2ptrain's stages have no double duties
# (Levers.column_fill), so a column that a short or late group lacks re-syncs.
_BUILT = dict(fill=True, staged=True, coords="assembled", column_fill=False, balanced=True, table="sampled",
              table_contention=True)
RUNNABLE_BEST = "overlap, 1/4 fragments, stage_wait 0.2"  # the configuration the scaling plot draws
RUNNABLE_SETS = (
    ("plain, 1/4 fragments", False, Levers(fragments=4, **_BUILT)),
    ("overlap, whole modules, one window", True, Levers(**_BUILT)),
    ("overlap, whole modules, stage_wait 0.2", True, Levers(stage_window_rounds=0.2, **_BUILT)),
    ("overlap, 1/4 fragments, one window", True, Levers(fragments=4, **_BUILT)),
    (RUNNABLE_BEST, True, Levers(fragments=4, stage_window_rounds=0.2, **_BUILT)),
)


def runnable_study(sizes: tuple[int, ...], rounds: float, calibration: dict, quick: bool) -> list[dict]:
    """The configurations p2ptrain can run today (RUNNABLE_SETS), both presets."""
    rows = []
    for preset in ("gpu", "default"):
        for label, overlap, levers in RUNNABLE_SETS:
            work, vol, over, config = preset_inputs(preset, calibration, overlap=overlap)
            rows += seeded_rows(work, vol, over, [(label, levers)], sizes, rounds, 1 if quick else LEVER_SEEDS,
                                preset=preset, compression=config.averaging.compression)
    return rows


def runnable_table(rows: list[dict]) -> str:
    return markdown_table(["preset", "configuration", "peers", "T", "utilization", "lineage share", "outer phase",
                           "all-reduce MB per peer-round", "÷ (peers/100 × own 100-peer)"],
                          [[r["preset"], r["label"], f"{r['peers']:,}", f"{r['round_seconds']:.0f} s",
                            spread(r, "utilization", ".2f"), spread(r, "lineage_share", ".3f"),
                            f"{r['outer_s']:.1f} s", f"{r['mb_sent_per_peer_round']:.0f}",
                            spread(r, "scaling_vs_100", ".2f")] for r in rows])


ROUND_LENGTHS = (30.0, 40.0, 60.0)


def round_length_study(rounds: float, calibration: dict, sizes: tuple[int, int] = (100, 10_000)) -> list[dict]:
    """The default preset with every lever (assembled groups) at set round lengths, with and
    without crashes, the chunk timeout sized to each group's declared links (as p2ptrain
    sets it when links are declared, which the balanced lever needs); once more at the
    shortest T with the timeout of undeclared links (averaging_timeout / 6): how much of
    the 10,000-peer figure depends on T, and on what a crash costs a group."""
    work, vol, over, _ = preset_inputs("default", calibration, overlap=True, fit_round=False)
    levers = dict(LEVER_SETS)[AFTER_ASSEMBLED]
    rows = []
    cases = [(T, crashes, None) for T in ROUND_LENGTHS for crashes in (True, False)]
    cases += [(ROUND_LENGTHS[0], True, chunk_timeout_s(work.averaging_timeout))]
    for T, crashes, chunk_timeout in cases:
        v = vol if crashes else dataclasses.replace(vol, crash_fraction=0.0)
        lev = dataclasses.replace(levers, chunk_timeout_s=chunk_timeout)
        small, large = (simulate(dataclasses.replace(work, round_seconds=T), v, over, n, rounds=rounds, seed=n,
                                 levers=lev) for n in sizes)
        rows.append({"T": T, "crashes": crashes,
                     "chunk_timeout_s": chunk_timeout, "peers": sizes,
                     "step_s": vol.step_s, "preset_round_seconds": work.round_seconds,
                     "utilization": large["utilization"], "outer_s": large["outer_s"],
                     "lineage_share": large["lineage_share"],
                     "scaling_vs_100": large["effective_tokens_per_s"]
                     / (sizes[1] / sizes[0] * small["effective_tokens_per_s"])})
    return rows


def round_length_table(rows: list[dict]) -> str:
    n = f"{rows[0]['peers'][1]:,}"
    return markdown_table(["T", "crashes", "chunk timeout", f"utilization at {n}", f"outer phase at {n}",
                           f"lineage share at {n}", f"÷ (peers/100 × own {rows[0]['peers'][0]}-peer)"],
                          [[f"{r['T']:.0f} s", "30 % of departures" if r["crashes"] else "none",
                            f"{r['chunk_timeout_s']:.0f} s (links unknown)" if r["chunk_timeout_s"]
                            else "sized to links",
                            f"{r['utilization']:.2f}", f"{r['outer_s']:.1f} s", f"{r['lineage_share']:.3f}",
                            f"{r['scaling_vs_100']:.2f}"] for r in rows])


def lever_table(rows: list[dict]) -> str:
    headers = ["preset", "levers", "peers", "steps per round (H)", "utilization", "lineage share",
               "mean group stem / level", "staged: stages, agreed", "outer phase", "table read", "all-reduce MB per peer-round",
               "effective tokens/s", "÷ (peers/100 × own 100-peer)", "time to target"]
    out = []
    for r in rows:
        st = r["staged"]
        staged = f"{st['stages_max']}, {st['agreed_fraction']:.2f}" if st.get("module_rounds") else "-"
        out.append([r["preset"], r["label"], f"{r['peers']:,}", f"{r['steps_per_round_median']:.0f} ({r['H']})",
                    spread(r, "utilization", ".2f"), spread(r, "lineage_share", ".3f"),
                    f"{r['mean_group']['stem']:.1f} / {r['mean_group']['level']:.1f}", staged,
                    f"{r['outer_s']:.1f} s", f"{r['table_fetch_s']:.2f} s", f"{r['mb_sent_per_peer_round']:.0f}",
                    f"{r['effective_tokens_per_s']:,.0f}", spread(r, "scaling_vs_100", ".2f"),
                    hours(r["time_to_target_h"])])
    return markdown_table(headers, out)


def spread(row: dict, key: str, fmt: str) -> str:
    """A lever row's figure: the median seed's, with the range over seeds when they differ."""
    values = [v for v in row.get(f"{key}_seeds", []) if math.isfinite(v)]
    text = format(row[key], fmt)
    lo, hi = (format(min(values), fmt), format(max(values), fmt)) if values else (text, text)
    return text if lo == hi else f"{text} ({lo}–{hi})"


def plot_scaling(rows: list[dict], path: Path, runnable: Sequence[dict] = ()) -> Path | None:
    """Effective tokens/s against peers, before and after (lever rows; and p2ptrain's best
    runnable configuration, RUNNABLE_BEST), log-log, with the ideal line from the latter."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {"gpu": "tab:blue", "default": "tab:orange"}
    for preset in ("gpu", "default"):
        for label, style in (("baseline (today)", "o--"), (AFTER, "s-"), (AFTER_WAIT, "^-"), (RUNNABLE_BEST, "D-")):
            rs = sorted((r for r in [*rows, *runnable] if r["preset"] == preset and r["label"] == label),
                        key=lambda r: r["peers"])
            if not rs:
                continue
            peers = [r["peers"] for r in rs]
            when = ("before" if label.startswith("baseline") else
                    "after, p2ptrain as built" if label == RUNNABLE_BEST else "after, model")
            ax.plot(peers, [r["effective_tokens_per_s"] for r in rs], style, color=colors[preset],
                    label=f"{preset}: {when} ({label})")
            if label == RUNNABLE_BEST:
                ideal = [rs[0]["effective_tokens_per_s"] * p / rs[0]["peers"] for p in peers]
                ax.plot(peers, ideal, ":", color=colors[preset], label=f"{preset}: linear from its 100-peer 'after'")
    ax.set(xscale="log", yscale="log", xlabel="peers (volunteers)", ylabel="effective tokens/s",
           title="simulated scaling: effective tokens/s (overlap averaging)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hours(h: float) -> str:
    if not math.isfinite(h):
        return "never"
    return f"{h * 60:.1f} min" if h < 1 else (f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d")


def projection_table(rows: list[dict]) -> str:
    headers = ["preset", "round (s)", "averaging", "peers", "steps per round (of H)", "wall per round",
               "utilization (compute / wall)", "mean group stem / level", "no-majority module-rounds",
               "lineage share", "effective utilization", "effective tokens/s", "all-reduce MB per peer-round",
               "peer table MB", "time to target"]
    return markdown_table(headers, [[
        r["preset"], f"{r['round_seconds']:.0f}" + ("" if r["round_source"] == "preset" else "*"),
        "overlap" if r["overlap"] else "plain", f"{r['peers']:,}",
        f"{r['steps_per_round_median']:.0f} / {r['H']}", f"{r['wall_per_round_s']:.0f} s",
        f"{r['utilization']:.2f}", f"{r['mean_group']['stem']:.1f} / {r['mean_group']['level']:.1f}",
        f"{r['no_majority']:.2f}", f"{r['lineage_share']:.3f}", f"{r['effective_utilization']:.3f}",
        f"{r['effective_tokens_per_s']:,.0f}", f"{r['mb_sent_per_peer_round']:.1f}", f"{r['peer_table_mb']:.1f}",
        hours(r["time_to_target_h"])] for r in rows])


def comparison_table(rows: list[dict]) -> str:
    headers = ["preset", "peers", "round rule", "wall per round", "utilization", "mean group stem / level",
               "no-majority module-rounds", "lineage share", "effective tokens/s", "time to target"]
    return markdown_table(headers, [[
        r["preset"], f"{r['peers']:,}",
        r["label"] + (f" (T = {r['round_seconds']:.0f} s)" if r.get("round_seconds") else ""),
        f"{r['wall_per_round_s']:.0f} s", f"{r['utilization']:.2f}",
        f"{r['mean_group']['stem']:.1f} / {r['mean_group']['level']:.1f}", f"{r['no_majority']:.2f}",
        f"{r['lineage_share']:.3f}", f"{r['effective_tokens_per_s']:,.0f}", hours(r["time_to_target_h"])]
        for r in rows])


# --------------------------------------------------------------- validation

VALIDATION_H, VALIDATION_ROUNDS, VALIDATION_MATCHMAKING_S = 10, 5, 3.0
# 15 s rounds up to 8 peers (30 s beyond, below). The peers share 2 cores, so a step slows down with their
# number: at 4 peers H = 10 steps take a third of the round, at 8 about two thirds. Beyond 8,
# H shrinks so that the swarm's steps per round stay at 8 × 10 (validation_h) and training
# leaves the cores as much time as at 8. With H = 10, 16 peers trained the whole round
# (2026-12-04: outer phase 13 s, 39 rounds skipped, stem groups of 3.7 instead of 16); with
# H = 5 it was no better (16 s, 48, 4.5): 16 peers' DHT, averager and p2pd processes alone
# do not fit 2 cores in 15 s rounds, a machine out of CPU that the model (one machine a peer)
# does not describe.
VALIDATION_ROUND_S = 15.0
VALIDATION_SWARM_STEPS = 80
# Beyond 8 peers the rounds are twice as long: in 15 s rounds 16 peers' averaging alone took
# 13–16 s and peers skipped 39–48 rounds; in 30 s rounds (2026-12-05) none was skipped. The
# model is given each run's own round length, so the comparison stays like for like.
VALIDATION_ROUND_S_BEYOND_8 = 30.0


def validation_round_s(n_peers: int) -> float:
    """The round length (T) a validation swarm of this size runs: 15 s up to 8 peers, 30 s beyond."""
    return VALIDATION_ROUND_S if n_peers <= 8 else VALIDATION_ROUND_S_BEYOND_8


def validation_h(n_peers: int) -> int:
    """At most H steps per round at this size: 10, fewer beyond 8 peers (the 2 cores' load)."""
    return max(1, min(VALIDATION_H, VALIDATION_SWARM_STEPS // n_peers))


def slot_peers(n_peers: int) -> list[int]:
    """The real peer each simulated slot stands for: slot s trains path s % 4 (swarm_model's
    round-robin), real peer i trains PATHS[i // (n / 4)]; the j-th slot of a path is its j-th peer."""
    per_path = n_peers // 4
    return [(s % 4) * per_path + s // 4 for s in range(n_peers)]


def loopback_volunteers(measured: dict) -> Volunteers:
    """This machine as the 'network': loopback links (CPU-bound, not bandwidth-bound) and
    the step times measured at this very swarm size, since the peers share 2 cores.
    Heterogeneous runs (some peers slowed): every slot gets its own real peer's measured
    median step time, and the round-to-round jitter is the spread around each peer's own median."""
    links = None
    if is_shaped(measured):  # every slot gets its own real peer's link
        links = tuple((x or UNLIMITED_MBPS, x or UNLIMITED_MBPS)
                      for x in (measured["links_mbps"][i] for i in slot_peers(measured["peers"])))
    if measured.get("slowed"):
        own = [[math.log(s) - math.log(statistics.median(steps)) for s in steps]
               for steps in measured["step_s_by_peer_rounds"]]
        jitter = float(np.std([x for xs in own for x in xs]))
        each = tuple(measured["step_s_per_peer"][i] for i in slot_peers(measured["peers"]))
        return Volunteers(step_s=measured["step_s_median"], step_sigma_peer=0.0, step_sigma_round=jitter,
                          up_mbps=UNLIMITED_MBPS, up_sigma=0.0, down_mbps=UNLIMITED_MBPS, down_sigma=0.0,
                          rtt_ms=0.05, rtt_sigma=0.0, step_s_each=each, links_each=links)
    per_peer = np.log(measured["step_s_per_peer"])
    residuals = [math.log(s) - math.log(statistics.median(measured["step_s_all"]))
                 for s in measured["step_s_all"]]
    return Volunteers(step_s=measured["step_s_median"], step_sigma_peer=float(np.std(per_peer)),
                      step_sigma_round=max(float(np.std(residuals)) ** 2 - float(np.var(per_peer)), 0.0) ** 0.5,
                      up_mbps=UNLIMITED_MBPS, up_sigma=0.0, down_mbps=UNLIMITED_MBPS, down_sigma=0.0, rtt_ms=0.05,
                      rtt_sigma=0.0, links_each=links)


def validation_config(n_peers: int, overlap: bool, round_seconds: float) -> RunConfig:
    import loopback_runs
    config = loopback_runs.loopback_config(n_peers, overlap, validation_h(n_peers), VALIDATION_ROUNDS,
                                           VALIDATION_MATCHMAKING_S)
    config.averaging.round_seconds = round_seconds
    return config


def loopback_workload(measured: dict) -> Workload:
    return workload(validation_config(measured["peers"], measured["overlap"], measured["round_seconds"]),
                    "loopback")


def summarize_loopback(result: dict, config: RunConfig, n_peers: int) -> dict:
    """A real aligned-schedule swarm's rounds 2.. (round 1 includes start-up): what the
    simulator predicts and what calibrates it (seconds per step, read per round as inner
    seconds over the steps the round's tokens make: rounds end at the deadline, not at H)."""
    import bench_swarm
    import loopback_runs
    tokens_per_step = config.inner.batch_size * config.model.context
    per_peer = [events[1:] or events for events in result["rounds"].values()]
    steps = [[max(e["tokens"] // tokens_per_step, 1) for e in events] for events in per_peer]
    step_s_per_peer = [statistics.median(e["seconds_inner"] / k for e, k in zip(events, ks))
                       for events, ks in zip(per_peer, steps)]
    step_s_all = [e["seconds_inner"] / k for events, ks in zip(per_peer, steps) for e, k in zip(events, ks)]
    return {
        "peers": n_peers, "overlap": config.averaging.overlap, "steps_per_round": config.inner.steps_per_round,
        "fill_round": config.averaging.fill_round, "slowed": [],
        "step_s_by_peer_rounds": [[e["seconds_inner"] / k for e, k in zip(events, ks)]
                                  for events, ks in zip(per_peer, steps)],
        "by_peer": {"steps_per_round": [statistics.median(ks) for ks in steps],
                    "tokens_per_round": [statistics.median(e["tokens"] for e in events) for events in per_peer],
                    "utilization": [sum(e["seconds_inner"] for e in events) / sum(e["seconds_wall"] for e in events)
                                    for events in per_peer],
                    "outer_s": [statistics.median(e["seconds_outer"] for e in events) for events in per_peer]},
        "round_seconds": config.averaging.round_seconds, "rounds": config.inner.total_rounds,
        "matchmaking_time": config.averaging.matchmaking_time, "tokens_per_step": tokens_per_step,
        "completed_peers": len(per_peer),
        "wall_per_round_s": statistics.median(statistics.mean(e["seconds_wall"] for e in events)
                                              for events in per_peer),
        "utilization": bench_swarm.training_thread_share(result),
        "outer_s": statistics.median(e["seconds_outer"] for events in per_peer for e in events),
        "steps_per_round_median": statistics.median(k for ks in steps for k in ks),
        "skipped_rounds": sum(events[-1]["round"] - events[0]["round"] + 1 - len(events) for events in per_peer),
        **loopback_runs.group_outcomes(per_peer),
        "step_s_median": statistics.median(step_s_all), "step_s_per_peer": step_s_per_peer,
        "step_s_all": step_s_all,
        "loopback_bytes_per_peer_round": result["bytes"] / n_peers / config.inner.total_rounds,
        "rounds_by_peer": result["rounds"],
    }


def predict(measured: dict, fixed_s: float, reference: dict) -> dict:
    """Simulate the measured swarm (aligned schedule; the real peers start together after
    --wait-for-peers); CPU-bound fixed costs are scaled by the contention factor read off
    the step times (this size vs the calibration size)."""
    work = loopback_workload(measured)
    contention = contention_step_s(measured) / reference["step_s_median"]
    over = Overheads(outer_fixed_s=fixed_s * contention * (not work.overlap),
                     foreground_fixed_s=fixed_s * contention * work.overlap, join_s=0.0, record_bytes=1500)
    return simulate(work, loopback_volunteers(measured), over, measured["peers"], rounds=8, seed=1,
                    join_spread_rounds=0.05, levers=Levers(fill=bool(measured.get("fill_round", False)),
                                                           balanced=bool(measured.get("declared_bandwidth"))))


def contention_step_s(measured: dict) -> float:
    """The step time that says how crowded the 2 cores were: the median step, or with slowed
    peers the median unslowed peer's (a slowed peer's steps measure its quota, not the crowd)."""
    slowed = set(measured.get("slowed") or ())
    if not slowed:
        return measured["step_s_median"]
    return statistics.median(s for i, s in enumerate(measured["step_s_per_peer"]) if i not in slowed)


def is_reference_kind(m: dict) -> bool:
    """Runs the fixed cost may be fitted on: homogeneous peers, capped rounds, no limited link."""
    return not m.get("slowed") and not m.get("fill_round", False) and not is_shaped(m)


def fit_fixed_cost(measured: dict) -> float:
    """The one fitted constant per mode: the fixed per-round cost that makes the predicted
    outer phase (training stalled after the round's end) match the measured one at the
    calibration size. On the aligned schedule the wall per round is the round length, so
    the outer phase, not the wall, carries the cost; it is linear in it."""
    zero = predict(measured, 0.0, measured)["outer_s"]
    one = predict(measured, 1.0, measured)["outer_s"]
    return max((measured["outer_s"] - zero) / max(one - zero, 1e-9), 0.0)


def validate(measured_runs: list[dict]) -> tuple[list[dict], dict]:
    if any("round_seconds" not in m for m in measured_runs):
        raise SystemExit("these loopback measurements predate the aligned schedule (no round_seconds): "
                         "run --validate without --measured")
    rows, calibration = [], {}
    for overlap in (False, True):
        runs = sorted((m for m in measured_runs if m["overlap"] == overlap),
                      key=lambda m: (m["peers"], bool(m.get("fill_round")), len(m.get("slowed") or ())))
        if not runs:
            continue
        # fitted on the smallest homogeneous capped run; heterogeneous and fill runs are predicted
        reference = next((m for m in runs if is_reference_kind(m)), runs[0])
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


def links_label(links) -> str:
    """(8, 8, None, 2) → '8/8/-/2'."""
    return "/".join("-" if x is None else f"{x:g}" for x in links)


def run_label(m: dict) -> str:
    label = ("overlap" if m["overlap"] else "plain") + (", fill" if m.get("fill_round") else ", capped")
    if m.get("links_mbps"):
        label += f", links {links_label(m['links_mbps'])} Mbit/s"
    if m.get("declared_bandwidth"):
        label += ", declared (balanced)"
    if m.get("slowed"):
        label += f", {len(m['slowed'])}/{m['peers']} slowed"
        if m.get("slowed_part") == "training":
            label += " (training only)"
    return label


def slowed_split(values_by_peer: list[float], slowed: list[int]) -> tuple[float, float]:
    """Median over the slowed peers and over the others."""
    slow = [v for i, v in enumerate(values_by_peer) if i in slowed]
    rest = [v for i, v in enumerate(values_by_peer) if i not in slowed]
    return statistics.median(slow), statistics.median(rest)


def marked_peers(m: dict) -> tuple[list[int], str]:
    """The peers a heterogeneous run set apart, and how: the slowed ones, or those on the
    slowest link when the links differ; ([], '') for a homogeneous run."""
    if m.get("slowed"):
        return list(m["slowed"]), "slowed"
    rates = [UNLIMITED_MBPS if x is None else x for x in m.get("links_mbps") or ()]
    if len(set(rates)) > 1:
        return [i for i, x in enumerate(rates) if x == min(rates)], "slow-link"
    return [], ""


def predicted_by_real_peer(m: dict, p: dict, key: str) -> list[float]:
    """The simulator's per-slot values, reordered to the real peers' indices (slot_peers)."""
    out = [0.0] * m["peers"]
    for slot, peer in enumerate(slot_peers(m["peers"])):
        out[peer] = p["by_peer"][key][slot]
    return out


def validation_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        m, p = r["measured"], r["predicted"]
        label = run_label(m) + (" (calibration)" if r["fitted_here"] else "")
        extra = []
        marked, kind = marked_peers(m)
        if marked:
            for name, key, fmt in (("steps per round", "steps_per_round", "{:.0f}"),
                                   ("utilization", "utilization", "{:.3f}"), ("outer phase (s)", "outer_s", "{:.2f}")):
                ps, po = slowed_split(predicted_by_real_peer(m, p, key), marked)
                ms, mo = slowed_split(m["by_peer"][key], marked)
                extra += [(f"{name}, {kind} peers", ps, ms, fmt), (f"{name}, other peers", po, mo, fmt)]
        for name, pv, mv, fmt in (
                ("wall per round (s)", p["wall_per_round_s"], m["wall_per_round_s"], "{:.1f}"),
                ("outer phase (s)", p["outer_s"], m["outer_s"], "{:.2f}"),
                ("steps per round", p["steps_per_round_median"], m["steps_per_round_median"], "{:.0f}"),
                ("utilization", p["utilization"], m["utilization"], "{:.3f}"),
                ("mean stem group", p["mean_group"]["stem"], m["mean_group"]["stem"], "{:.2f}"),
                ("mean level group", p["mean_group"]["level"], m["mean_group"]["level"], "{:.2f}"),
                # the model counts the all-reduce only; loopback bytes also carry DHT records and re-syncs
                ("MB sent per peer-round", p["mb_sent_per_peer_round"], m["loopback_bytes_per_peer_round"] / 1e6,
                 "{:.2f}"), *extra):
            out.append([label, m["peers"], f"{m['step_s_median']:.2f}", name, fmt.format(pv), fmt.format(mv),
                        rel_error(pv, mv)])
    return markdown_table(["run", "peers", "measured s/step (input)", "quantity", "predicted", "measured",
                           "error"], out)


def per_peer_table(rows: list[dict]) -> str:
    """Heterogeneous runs (slowed peers, or links that differ) peer by peer: the measured step
    time fed in, and steps and tokens per round, utilization and outer phase (medians over
    steady rounds) predicted vs measured."""
    out = []
    for r in rows:
        m, p = r["measured"], r["predicted"]
        marked, kind = marked_peers(m)
        if not marked:
            continue
        steps = predicted_by_real_peer(m, p, "steps_per_round")
        util = predicted_by_real_peer(m, p, "utilization")
        outer = predicted_by_real_peer(m, p, "outer_s")
        for i in range(m["peers"]):
            ms, mt = m["by_peer"]["steps_per_round"][i], m["by_peer"]["tokens_per_round"][i]
            mu, mo = m["by_peer"]["utilization"][i], m["by_peer"]["outer_s"][i]
            out.append([run_label(m), i, m["paths"][i], kind if i in marked else "", f"{m['step_s_per_peer'][i]:.2f}",
                        f"{steps[i]:.0f}", f"{ms:.0f}", rel_error(steps[i], ms),
                        f"{steps[i] * m['tokens_per_step']:,.0f}", f"{mt:,.0f}",
                        f"{util[i]:.3f}", f"{mu:.3f}", rel_error(util[i], mu),
                        f"{outer[i]:.2f}", f"{mo:.2f}", rel_error(outer[i], mo)])
    return markdown_table(["run", "peer", "path", "set apart", "measured s/step (input)", "steps/round predicted",
                           "measured", "error", "tokens/round predicted", "measured", "utilization predicted",
                           "measured", "error", "outer phase (s) predicted", "measured", "error"], out)


def slow_quota_cores(n_peers: int, slowed: int) -> float:
    """A slowed peer's CPU quota (cores): SLOW_FACTOR × below an unslowed peer's share of the rest."""
    return LOOPBACK_CORES / (SLOW_FACTOR * (n_peers - slowed) + slowed)


def run_key(m: dict) -> tuple:
    slowed = tuple(m.get("slowed") or ())
    return (m["peers"], m["overlap"], bool(m.get("fill_round")), slowed,
            m.get("slowed_part", "tree") if slowed else "", tuple(m.get("links_mbps") or ()),
            bool(m.get("declared_bandwidth")))


def is_shaped(m: dict) -> bool:
    """A run whose peers had links of their own (--shaped), some of them limited."""
    return any(x is not None for x in m.get("links_mbps") or ())


def release_hivemind_processes(limits, main_pids: list[int], stop) -> None:
    """--slow-training-only: keep the slowed peers' DHT, averager and p2pd processes (forked
    after launch, so born inside the quota) out of it, every 0.5 s until `stop` is set: only
    the `p2ptrain join` process itself (its training thread, and the node's own threads) is
    slowed, the way a slower GPU slows a volunteer whose CPU and link are not."""
    import loopback_runs
    while not stop.wait(0.5):
        for pid in main_pids:
            limits.release(loopback_runs.process_tree(pid)[1:])


def run_validation_swarms(runs: tuple, resume: bool = False, slowed_part: str = "tree",
                          measured_file: Path = MEASURED_FILE) -> list[dict]:
    """Real loopback swarms (`p2ptrain join` processes, bench_swarm.run_swarm) on the aligned
    schedule, one path per peer in turn. A run is (peers, overlap) or (peers, overlap,
    fill_round, slowed peer indices[, links]): the slowed peers' process trees get a CPU quota
    (loopback_runs.CpuLimits, a cgroup) as soon as they are started; with slowed_part
    "training" only their `p2ptrain join` process (release_hivemind_processes). With links
    (one Mbit/s figure or None per peer) every peer runs in a network namespace of its own
    (shaped_links.ShapedNetwork), its link limited to that rate each way."""
    import tempfile
    import threading
    import time

    import bench_swarm
    import loopback_runs
    from p2ptrain.demo import PATHS
    import shutil
    from shaped_links import Link, ShapedNetwork

    def unpack(run) -> tuple:
        return (*run[:2], *(*run[2:], False, (), (), False)[:4])

    def key(run) -> tuple:
        n, overlap, fill, slowed, links, declared = unpack(run)
        return (n, overlap, fill, tuple(slowed), slowed_part if slowed else "", tuple(links), declared)

    measured, others = [], []  # others: stored runs of other kinds, kept in the file
    wanted = {key(r) for r in runs}
    if measured_file.exists():
        stored = json.loads(measured_file.read_text())
        others = [m for m in stored if run_key(m) not in wanted]
        if resume:  # keep the runs already measured (an interrupted --validate)
            measured = [m for m in stored if run_key(m) in wanted]
            print(f"resuming: {len(measured)} runs from {measured_file.name}", flush=True)
    done = {run_key(m) for m in measured}
    for run in runs:
        n, overlap, fill, slowed, links, declared = unpack(run)
        if key(run) in done:
            continue
        quota = slow_quota_cores(n, len(slowed)) if slowed else None
        print(f"running a real loopback swarm: {n} peers, {'overlap' if overlap else 'plain'}, "
              f"{'fill' if fill else 'capped'} rounds"
              + (f", peers {list(slowed)} slowed to {quota:.3f} cores each" if slowed else "")
              + (f", links {links_label(links)} Mbit/s (one network namespace per peer)" if links else "")
              + (", every peer declaring its upload" if declared else ""),
              flush=True)
        config = validation_config(n, overlap, SHAPED_ROUND_S.get(n, validation_round_s(n)) if links
                                   else validation_round_s(n))
        config.averaging.fill_round = fill
        config.run.id += (("-fill" if fill else "") + (f"-slow{len(slowed)}" if slowed else "")
                          + ("-links-" + links_label(links).replace("/", "-") if links else "")
                          + ("-declared" if declared else ""))
        paths = [p for p in PATHS for _ in range(n // len(PATHS))]
        tmp = Path(tempfile.mkdtemp(prefix="p2ptrain-sim-"))
        limits = loopback_runs.CpuLimits() if slowed else None
        stop_releasing = threading.Event()

        def slow_down(peers, limits=limits, slowed=slowed, quota=quota):
            for i in slowed:
                limits.limit(peers[i].proc.pid, quota)
            if slowed_part == "training":
                threading.Thread(target=release_hivemind_processes, daemon=True,
                                 args=(limits, [peers[i].proc.pid for i in slowed], stop_releasing)).start()

        t0 = time.monotonic()
        network = ShapedNetwork([Link.symmetric(x) for x in links], declared=declared) if links else None
        try:
            if network is not None:
                network.__enter__()
            result = bench_swarm.run_swarm(config, VALIDATION_ROUNDS, tmp, paths,
                                           on_launch=slow_down if slowed else None, network=network)
        except SystemExit as e:  # a peer failed: keep its logs, go on with the other sizes
            print(f"  {e} (logs kept)", flush=True)
            continue
        finally:
            if network is not None:
                network.close()
            stop_releasing.set()
            throttled = limits.throttled_s() if limits else []
            if limits:
                limits.close()
        print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        summary = summarize_loopback(result, config, n)
        summary.update(slowed=list(slowed), slow_quota_cores=quota, throttled_s=throttled, paths=paths,
                       swarm_wall_s=time.monotonic() - t0, slowed_part=slowed_part if slowed else None,
                       links_mbps=list(links), declared_bandwidth=declared)
        measured.append(summary)
        OUT_DIR.mkdir(exist_ok=True)
        measured_file.write_text(json.dumps(others + measured, indent=1))
    return measured


# --------------------------------------------------------------- output

def draw_projection(axes, projection: list[dict]) -> None:
    for preset, overlap, T in sorted({(r["preset"], r["overlap"], r["round_seconds"]) for r in projection}):
        rs = [r for r in projection if (r["preset"], r["overlap"], r["round_seconds"]) == (preset, overlap, T)]
        label = f"{preset} {'overlap' if overlap else 'plain'}, T={T:.0f} s"
        peers = [r["peers"] for r in rs]
        axes[0].plot(peers, [r["utilization"] for r in rs], marker="o", label=label)
        axes[1].plot(peers, [r["effective_tokens_per_s"] for r in rs], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="peers", ylabel="utilization (compute / wall)", ylim=(0, 1.05),
                title="projection: utilization")
    axes[1].set(xscale="log", yscale="log", xlabel="peers", ylabel="effective tokens/s",
                title="projection: effective throughput")
    axes[0].legend(fontsize=7)


def draw_validation(axes, validation: list[dict]) -> None:
    hetero = [r for r in validation if not is_reference_kind(r["measured"])]
    for i, r in enumerate(hetero):  # heterogeneous / fill runs: one point each
        label = run_label(r["measured"])
        for ax, key in zip(axes, ("outer_s", "utilization")):
            ax.plot([r["measured"]["peers"]], [r["measured"][key]], "s", color=f"C{i + 2}", label=f"{label} measured")
            ax.plot([r["measured"]["peers"]], [r["predicted"][key]], "+", ms=12, color=f"C{i + 2}",
                    label=f"{label} predicted")
    for overlap in (False, True):
        rs = [r for r in validation if r["measured"]["overlap"] == overlap and is_reference_kind(r["measured"])]
        mode = "overlap" if overlap else "plain"
        peers = [r["measured"]["peers"] for r in rs]
        for ax, key in zip(axes, ("outer_s", "utilization")):
            ax.plot(peers, [r["measured"][key] for r in rs], "o-", label=f"{mode} measured")
            ax.plot(peers, [r["predicted"][key] for r in rs], "x--", label=f"{mode} predicted")
    axes[0].set(xlabel="peers (loopback, 2 cores)", ylabel="outer phase (s)",
                title="validation: training stalled after a round's end")
    axes[1].set(xlabel="peers (loopback, 2 cores)", ylabel="utilization", ylim=(0, 1.05),
                title="validation: utilization")
    axes[0].legend(fontsize=6)


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
    """Run (or reuse) the loopback swarms, fit, predict, print; stores the calibration (not
    from --shaped runs: the projection stays calibrated on the loopback swarms)."""
    if args.measured:
        measured, source = json.loads(args.measured.read_text()), str(args.measured)
    elif args.shaped:
        measured = run_validation_swarms(SHAPED_RUNS, args.resume, measured_file=MEASURED_SHAPED_FILE)
        source = "this run"
    else:
        runs = tuple(r for r in VALIDATION_RUNS if r[0] <= 8) if args.quick else VALIDATION_RUNS
        if args.hetero:
            runs += HETERO_RUNS
        measured, source = run_validation_swarms(
            runs, args.resume, "training" if args.slow_training_only else "tree"), "this run"
    validation, calibration = validate(measured)
    OUT_DIR.mkdir(exist_ok=True)
    if not any(is_shaped(m) for m in measured):
        CALIBRATION_FILE.write_text(json.dumps(calibration, indent=1))
    link_shaping = None
    if args.hetero:  # links: can this machine shape one peer's link (netns + veth + tc)?
        import loopback_runs
        link_shaping = loopback_runs.probe_link_shaping()
    print_header("Swarm simulator: validation against real loopback swarms", info, [
        f"real peers: `p2ptrain join` processes on 127.0.0.1 (started together with --wait-for-peers), default "
        f"preset, at most H={VALIDATION_H} steps (up to 8 peers; {VALIDATION_SWARM_STEPS} / peers beyond) in "
        f"{VALIDATION_ROUND_S:.0f} s rounds ({VALIDATION_ROUND_S_BEYOND_8:.0f} s beyond 8 peers) on the aligned schedule, "
        f"matchmaking {VALIDATION_MATCHMAKING_S:.0f} s, {VALIDATION_ROUNDS} rounds (steady rounds 2–"
        f"{VALIDATION_ROUNDS}); measurements from {source}",
        "inputs per size: the measured step time (the peers share 2 cores, so it grows with the peer count) and "
        "its spread; loopback links; one fixed per-round cost per mode fitted at the smallest size on the outer "
        "phase (seconds training stalls after a round's end), scaled by the step-time contention factor at the "
        "others",
        f"fitted: plain {calibration['outer_fixed_s']:.2f} s per round, overlap "
        f"{calibration['foreground_fixed_s']:.2f} s per round (at the calibration size)",
        "heterogeneous runs (k/n slowed): the slowed peers' process trees (join + p2pd) run under a CFS CPU "
        f"quota in their own cgroup, {SLOW_FACTOR}× below an unslowed peer's share when all train (runs marked "
        "'training only': just the `p2ptrain join` process is under the quota, its DHT, averager and p2pd "
        "processes are moved out as they start); each "
        "simulated slot gets its own real peer's measured median s/step (same path), the jitter is the "
        "spread around each peer's own median; the fixed cost fitted on the homogeneous capped run, scaled by "
        "the unslowed peers' contention; fill: averaging.fill_round on (train until the round's end, real cap "
        "4 × H, none in the model) and Levers(fill=True) in the model",
        "links (runs marked 'links a/b/c/d Mbit/s', --shaped): every peer in a network namespace of its own, "
        "the namespaces joined by a bridge (benchmarks/shaped_links.py); peer i's link limited to its rate each "
        "way by tc tbf ('-': not limited); the model gets the same rate for that peer's slot, up and down, and "
        f"{UNLIMITED_MBPS:,.0f} Mbit/s for a link not limited; rate only (no netem here: no added delay); the "
        "fixed cost fitted on the run whose links are all unlimited; not written to the calibration file"])
    print(validation_table(validation))
    print()
    if any(marked_peers(r["measured"])[0] for r in validation):
        print("Heterogeneous runs peer by peer (steady rounds 2–5, medians; the simulator's slot for each real "
              "peer is the same path's):\n")
        print(per_peer_table(validation))
        print()
    if link_shaping is not None:
        print("Link shaping (one peer's link in a network namespace, shaped with tc): what this machine allows\n")
        print(markdown_table(["step", "command", "exit", "error"],
                             [[x["what"], f"`{x['command']}`", x["rc"], x["error"] or "-"] for x in link_shaping]))
        print("\nnetem (delay, loss) is not in this kernel, so no run adds delay; `--validate --shaped` runs peers "
              "in network namespaces with rate-limited links (tbf). The runs above are on loopback, unshaped: the "
              "simulator gets 10 Gbit/s, 0.05 ms links.\n")
    return {"validation": validation, "calibration": calibration, "measured_source": source,
            "link_shaping": link_shaping}


def projection_report(args: argparse.Namespace, info: dict) -> dict:
    calibration = load_calibration()
    sizes = SIZES[:2] if args.quick else SIZES
    rounds = 6 if args.quick else args.rounds
    projection = project(sizes, rounds=rounds, calibration=calibration)
    comparison = compare_models(COMPARE_SIZES[:1] if args.quick else COMPARE_SIZES, rounds, calibration)
    print_header("Swarm simulator: projection to volunteer swarms", info, [
        f"calibration: {calibration.get('source', CALIBRATION_FILE.name)}; fixed per-round cost "
        f"{calibration['outer_fixed_s']:.2f} s (plain) / {calibration['foreground_fixed_s']:.2f} s (overlap) "
        f"at {calibration['peers']} peers on 2 cores, divided by that contention for a volunteer's own machine",
        f"volunteers: up {NETWORK['up_mbps']:.0f} / down {NETWORK['down_mbps']:.0f} Mbit/s medians (log-normal "
        f"sigma 0.8), RTT {NETWORK['rtt_ms']:.0f} ms, sessions {CHURN['mean_session_h']:.0f} h mean (30 % "
        f"crashes); gpu step {projection[-1]['step_s']:.2f} s median (10 TFLOP/s), default step "
        f"{projection[0]['step_s']:.3f} s median; machine spread sigma {MACHINE_SIGMA}",
        "round rule: the aligned schedule (rounds end every T s on the swarm's clock; at most H steps; peers "
        "join at random moments over the first two rounds); T from the preset, or (*) twice the median peer's "
        "H steps where the preset's T cannot hold them",
        "lineage share: the fraction of tokens whose update survives: per module and round only the largest "
        "group's (p2ptrain re-syncs a minority from a strict majority; lineages do not merge), none from a peer "
        "that skipped rounds (stale copy); no-majority: share of module-rounds with 2+ holders whose largest "
        "group is no strict majority (ties move nobody: such splits persist); effective utilization: effective "
        "tokens / what the peers could compute in that wall time; time to target: 20 tokens per parameter of "
        "all modules (Chinchilla) at the steady effective rate",
        f"peer table: one DHT key holding every peer's signed record ({projection[0]['record_bytes']} B each), "
        "fetched twice per round by every peer"])
    print(projection_table(projection))
    print()
    print("Round rules compared (plain averaging, same volunteers): the step-counted rule p2ptrain used before "
          "issue 10 (a round is H steps; peers in phase, as this simulator assumed, or at random phases) and "
          "the aligned schedule:\n")
    print(comparison_table(comparison))
    print()
    levers = lever_study(sizes, rounds, calibration, args.quick)
    print("Scaling levers (issue 16 B), overlap averaging, T = max(preset, 2 × H × median step); each alone, then "
          f"together, same volunteers and seeds ({LEVER_SEEDS if not args.quick else 1} seeds a row: the median "
          "seed's figures, the range over seeds in brackets). utilization: compute / wall, median peer; lineage share: effective "
          "/ computed tokens (a staged module-round counts whole when a strict majority of its final copies lies "
          "within the codec's sync tolerance of the true token-weighted mean, tracked on random pseudo-gradients; "
          "else only the largest last-stage group's carried weight); mean group: as a member reports it (staged: "
          "mean over its stages); table read: one peer-table lookup, median peer (replicas charged: the "
          f"{DHT_REPLICAS} nodes storing a key serve every reader at the round's end); ÷ column: effective tokens/s "
          "over peers/100 × the same configuration's 100-peer figure (goal ≥ 0.7 at 10,000); time to target: 20 "
          "tokens per parameter at the steady effective rate (no critical-batch limit modelled). 1/4 fragments: "
          "bytes and time only, its effect on loss is not modelled. 4-bit: NF4's 0.5625 bytes a value on the "
          "wire, bytes and time only (its loss: bench_outer_codecs); top-k is not modelled.\n")
    print(lever_table(levers))
    print()
    runnable = runnable_study(sizes, rounds, calibration, args.quick)
    print_runnable(runnable)
    lengths = [] if args.quick else round_length_study(rounds, calibration)
    if lengths:
        print(f"Round length, default preset, '{AFTER_ASSEMBLED}': the lever table's T for this preset is "
              f"max(its {lengths[0]['preset_round_seconds']:.0f} s, 2 × H × median step); here T is set, with "
              "the volunteers' crashes (30 % of departures) and without. A member vanishing during an all-reduce "
              "costs its group its slice's reducer timeout, twice the chunk timeout: sized to the group's slowest "
              "declared link (2 × its upload of the round, within [2 s, averaging_timeout / 6]), or in the last "
              "row averaging_timeout / 6 as when links are not declared; with staged averaging a first-stage "
              "group that a crash made late misses its second stage (matchmaking does not wait past its window), "
              "and its members re-sync.\n")
        print(round_length_table(lengths))
        print()
    # --quick: smaller sizes, so its plot goes to bench-out/, not over the committed one
    png = plot_scaling(levers, OUT_DIR / "simulate_scaling.png" if args.quick else SCALING_PLOT, runnable)
    if png:
        print(f"wrote {png.relative_to(REPO_ROOT)}")
    return {"projection": projection, "comparison": comparison, "levers": levers, "round_lengths": lengths,
            "runnable": runnable,
            "calibration": calibration,
            "assumptions": dict(NETWORK, **CHURN, gpu_flops=GPU_FLOPS, machine_sigma=MACHINE_SIGMA,
                                round_jitter=ROUND_JITTER, join_s=JOIN_S)}


def print_runnable(rows: list[dict]) -> None:
    print("As p2ptrain can run it: the built levers (fill, staged with assembled groups, balanced shares, the "
          "sampled table), plain or overlapped, whole modules or 1/4 fragments, averaging.stage_wait (only with "
          "overlap) off or at its default. Same volunteers, seeds and columns as the lever table.\n")
    print(runnable_table(rows))
    print()


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
                        help="run real loopback swarms (4–16 peers, about 20 minutes; wrap in flock) and compare")
    parser.add_argument("--hetero", action="store_true",
                        help="with --validate: also heterogeneous swarms (4 and 8 peers, some slowed by a CPU cgroup "
                             "quota; capped and fill rounds; needs root and a writable cgroup; about 10 minutes)")
    parser.add_argument("--slow-training-only", action="store_true",
                        help="with --hetero: the quota slows only a slowed peer's `p2ptrain join` process, not "
                             "its DHT, averager and p2pd processes (a slower GPU, not a slower machine)")
    parser.add_argument("--shaped", action="store_true",
                        help="with --validate: instead, swarms with one network namespace per peer, links "
                             "rate-limited with tc: 4 peers all unlimited, all at 8 Mbit/s, one at 2 Mbit/s (plain "
                             "and overlap); 8 peers with two at 4 Mbit/s, without and with --upload-mbps declared "
                             "(plain); needs root and iproute2; about 20 minutes")
    parser.add_argument("--resume", action="store_true",
                        help="with --validate: keep the runs bench-out/simulate_loopback.json already holds, run the rest")
    parser.add_argument("--measured", type=Path, default=None,
                        help="with --validate: reuse these stored loopback measurements instead of running swarms")
    parser.add_argument("--rounds", type=float, default=12, help="simulated rounds per projection")
    parser.add_argument("--runnable", action="store_true",
                        help="only the configurations p2ptrain can run (bench-out/simulate_runnable.json)")
    args = parser.parse_args()
    info = machine_info()
    if args.runnable:
        rows = runnable_study(SIZES[:2] if args.quick else SIZES, 6 if args.quick else args.rounds,
                              load_calibration(), args.quick)
        print_runnable(rows)
        write_results("simulate_runnable", {"machine": info, "runnable": rows})
    elif args.validate:
        write_results("simulate_validation_shaped" if args.shaped else "simulate_validation",
                      {"machine": info, **validation_report(args, info)})
    else:
        write_results("simulate", {"machine": info, **projection_report(args, info)})


if __name__ == "__main__":
    main()
