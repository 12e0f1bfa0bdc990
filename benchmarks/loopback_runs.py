"""Real loopback swarms for validating the swarm simulator: 4–16 `p2ptrain join` processes
on 127.0.0.1 (bench_swarm's `run_swarm`, `launch_swarm` from the demo), and what the
simulator is compared on — wall per round, utilization, group sizes, re-syncs — plus the
per-step compute times that calibrate it.

Every run here starts hivemind peers: wrap the command that calls it in
`flock /tmp/p2ptrain-loopback.lock …` so it does not overlap others' loopback byte counts.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import bench_swarm
from p2ptrain.config import RunConfig
from p2ptrain.demo import PATHS


def loopback_config(n_peers: int, overlap: bool, steps_per_round: int, rounds: int,
                    matchmaking_time: float) -> RunConfig:
    """The default preset with short rounds, as bench_swarm runs it."""
    config = RunConfig.load()
    config.run.id = f"sim-{'overlap' if overlap else 'plain'}-{n_peers}"
    config.inner.steps_per_round = steps_per_round
    config.inner.total_rounds = rounds
    config.inner.warmup_steps = min(config.inner.warmup_steps, steps_per_round)
    config.averaging.matchmaking_time = matchmaking_time
    config.averaging.overlap = overlap
    config.averaging.fill_round = False  # the simulator's capped rounds
    return config


def run_loopback(n_peers: int, overlap: bool, steps_per_round: int = 10, rounds: int = 5,
                 matchmaking_time: float = 3.0) -> dict:
    """One real swarm of n_peers (a multiple of 4: the 2×2 grid's paths, evenly covered)."""
    if n_peers % len(PATHS):
        raise ValueError(f"n_peers must be a multiple of {len(PATHS)}")
    config = loopback_config(n_peers, overlap, steps_per_round, rounds, matchmaking_time)
    paths = [p for p in PATHS for _ in range(n_peers // len(PATHS))]
    with tempfile.TemporaryDirectory(prefix="p2ptrain-sim-") as tmp:
        result = bench_swarm.run_swarm(config, rounds, Path(tmp), paths)
    return summarize(result, config, n_peers)


def steady(events: list[dict]) -> list[dict]:
    """Rounds 2.. : round 1 includes start-up (and, with overlap, has no averaging yet)."""
    return events[1:] or events


def summarize(result: dict, config: RunConfig, n_peers: int) -> dict:
    """What the simulator predicts (wall, utilization, groups) and what calibrates it (step times)."""
    per_peer = [steady(events) for events in result["rounds"].values()]
    H = config.inner.steps_per_round
    step_s_per_peer = [statistics.median(e["seconds_inner"] / H for e in events) for events in per_peer]
    step_s_all = [e["seconds_inner"] / H for events in per_peer for e in events]
    wall_per_peer = [statistics.mean(e["seconds_wall"] for e in events) for events in per_peer]
    groups = {"stem": [], "level": []}
    for events in per_peer:
        for e in events:
            for module, n in e["peers_per_module"].items():
                groups["stem" if module == "stem" else "level"].append(n)
    module_rounds = sum(len(e["peers_per_module"]) for events in per_peer for e in events)
    return {
        "peers": n_peers, "overlap": config.averaging.overlap, "steps_per_round": H,
        "rounds": config.inner.total_rounds, "matchmaking_time": config.averaging.matchmaking_time,
        "tokens_per_step": config.inner.batch_size * config.model.context,
        "completed_peers": len(per_peer),
        "wall_per_round_s": statistics.median(wall_per_peer),
        "utilization": bench_swarm.training_thread_share(result),
        "outer_s": statistics.median(e["seconds_outer"] for events in per_peer for e in events),
        "mean_group": {k: (statistics.mean(v) if v else 0.0) for k, v in groups.items()},
        "resync_fraction": sum(len(e["resynced"]) for events in per_peer for e in events) / max(module_rounds, 1),
        "step_s_median": statistics.median(step_s_all),
        "step_s_per_peer": step_s_per_peer,
        "step_s_all": step_s_all,
        "loopback_bytes_per_peer_round": result["bytes"] / n_peers / config.inner.total_rounds,
        "rounds_by_peer": result["rounds"],
    }
