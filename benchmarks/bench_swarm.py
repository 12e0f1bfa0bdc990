"""Compute utilization (plain vs overlapped averaging), wire efficiency and communication
vs data-parallel, measured on a real 4-peer loopback swarm.

Each peer is a separate `p2ptrain join` process (as in `make demo`). Bytes on the wire are
read from the loopback interface's counters (/proc/net/dev), so they include everything
the swarm sends — all-reduce parts, libp2p framing and encryption, DHT records,
matchmaking — and nothing else should use loopback while this runs.

    python benchmarks/bench_swarm.py [--rounds 6] [--steps-per-round 25] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from p2ptrain.config import RunConfig
from p2ptrain.demo import PATHS, launch_swarm
from p2ptrain.model.grid import Grid
from p2ptrain.model.transformer import PathModel
from p2ptrain.swarm.averaging import WIRE_BYTES_PER_VALUE as BYTES_PER_VALUE

OUT = Path("bench-out")


def loopback_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def module_sizes(config: RunConfig) -> dict[str, int]:
    grid = Grid.from_config(config.grid)
    sizes = {}
    with torch.device("meta"):
        for path in grid.paths():
            model = PathModel(config.model, grid, config.grid.blocks_per_level, path, 257, initialize=False)
            for module_id, part in model.parts().items():
                sizes[module_id] = sum(p.numel() for p in part.parameters())
    return sizes


def run_swarm(config: RunConfig, rounds: int, workdir: Path, paths: list[str] = PATHS) -> dict:
    """Train `rounds` rounds with one peer per entry of `paths`; collect round events and loopback bytes."""
    config_file = workdir / f"{config.run.id}.toml"
    config_file.write_text(config.to_toml())
    events: queue.Queue = queue.Queue()
    peers = launch_swarm(workdir / config.run.id, config_file, rounds, paths, events)
    rounds_by_peer: dict[int, list[dict]] = {i: [] for i in range(len(peers))}
    start_bytes, start_time, finished = None, None, 0
    try:
        while finished < len(peers):
            index, event = events.get(timeout=900)
            if event.get("event") == "peers" and start_bytes is None:
                start_bytes, start_time = loopback_tx_bytes(), time.monotonic()
            elif event.get("event") == "round":
                rounds_by_peer[index].append(event)
            elif event.get("event") == "exit":
                finished += 1
    finally:
        for peer in peers:
            peer.stop()
    if any(p.proc.returncode for p in peers):
        raise SystemExit(f"a peer failed; see {workdir / config.run.id}/peer*/peer.log")
    return {"rounds": rounds_by_peer, "bytes": loopback_tx_bytes() - start_bytes,
            "seconds": time.monotonic() - start_time}


def utilization(result: dict) -> float:
    """Median over peers of inner-compute seconds / wall seconds, rounds 2.. (round 1 includes start-up)."""
    values = []
    for events in result["rounds"].values():
        steady = events[1:] or events
        values.append(sum(e["seconds_inner"] for e in steady) / sum(e["seconds_wall"] for e in steady))
    values.sort()
    return values[len(values) // 2]


def tokens_per_second(result: dict, tokens_per_round: int) -> float:
    """Median over peers of tokens trained per wall second, rounds 2.. — what a volunteer gets."""
    values = []
    for events in result["rounds"].values():
        steady = events[1:] or events
        values.append(tokens_per_round * len(steady) / sum(e["seconds_wall"] for e in steady))
    values.sort()
    return values[len(values) // 2]


def bound_bytes_per_peer_round(config: RunConfig, sizes: dict[str, int]) -> float:
    """Butterfly all-reduce bound per peer per round: Σ over its modules 2(n−1)/n × payload,
    n = peers holding the module (one peer per path here)."""
    grid = Grid.from_config(config.grid)
    per_peer = []
    for path in grid.paths():
        total = 0.0
        for module_id in grid.modules_of(path):
            n = len(grid.paths_containing(module_id))
            total += 2 * (n - 1) / n * sizes[module_id] * BYTES_PER_VALUE[config.averaging.compression]
        per_peer.append(total)
    return sum(per_peer) / len(per_peer)


# (name, averaging, wire codec, overlap?, model): "wide" is the default grid at d_model 512
# (6.3M values per level module instead of 0.39M): module payloads of the size a real run
# averages, where hivemind's per-part framing and the DHT's fixed per-round traffic are
# small; a few steps per round keep its compute affordable on 2 cores
VARIANTS = [("plain-fp16", "plain", "fp16", False, "default"),
            ("overlap-fp16", "overlap", "fp16", True, "default"),
            ("plain-8bit", "plain", "8bit", False, "default"),
            ("plain-fp16-wide", "plain", "fp16", False, "wide"),
            ("plain-8bit-wide", "plain", "8bit", False, "wide")]
WIDE = {"d_model": 512, "n_heads": 8, "batch_size": 4, "steps_per_round": 4}


def variant_config(base: RunConfig, name: str, codec: str, overlap: bool, model: str) -> RunConfig:
    config = RunConfig.from_dict(base.to_dict())
    config.run.id = f"bench-{name}"
    config.averaging.compression = codec
    config.averaging.overlap = overlap
    if model == "wide":
        config.model.d_model, config.model.n_heads = WIDE["d_model"], WIDE["n_heads"]
        config.inner.batch_size, config.inner.steps_per_round = WIDE["batch_size"], WIDE["steps_per_round"]
    return config


def measure(config: RunConfig, rounds: int, workdir: Path) -> dict:
    """Run one variant's swarm; utilization, bytes and the ratios against the bound and DDP."""
    result = run_swarm(config, rounds, workdir)
    sizes = module_sizes(config)
    n_peers = len(result["rounds"])
    measured = result["bytes"] / n_peers / rounds
    bound = bound_bytes_per_peer_round(config, sizes)
    params_per_path = sum(sizes[m] for m in Grid.from_config(config.grid).modules_of((0, 0)))
    tokens_per_step = config.inner.batch_size * config.model.context
    tokens_per_round = config.inner.steps_per_round * tokens_per_step
    # synchronous DDP of the same path over the same peers: a ring all-reduce of fp32
    # gradients every step, bound 2(n−1)/n × 4 B × params per step
    ddp_per_token = 2 * (n_peers - 1) / n_peers * 4 * params_per_path / tokens_per_step
    ours_per_token = measured / tokens_per_round
    return {"params_per_path": params_per_path, "steps_per_round": config.inner.steps_per_round,
            "utilization": utilization(result), "tokens_per_s": tokens_per_second(result, tokens_per_round),
            "bytes_per_peer_round": measured, "bound_bytes_per_peer_round": bound,
            "wire_efficiency": measured / bound, "ddp_bytes_per_token": ddp_per_token,
            "bytes_per_token": ours_per_token, "vs_ddp": ddp_per_token / ours_per_token,
            "vs_ddp_at_H500": ddp_per_token / ours_per_token * 500 / config.inner.steps_per_round,
            "rounds": result["rounds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 steps")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help=f"run only these of {', '.join(v[0] for v in VARIANTS)}")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps_per_round = 3, 10
    workdir = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-"))
    base = RunConfig.load()
    base.inner.steps_per_round = args.steps_per_round
    base.inner.total_rounds = args.rounds
    base.averaging.matchmaking_time = 3.0
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    rows, results = [], {}
    try:
        for name, averaging, codec, overlap, model in variants:
            r = results[name] = measure(variant_config(base, name, codec, overlap, model), args.rounds, workdir)
            rows.append(f"| {averaging} | {codec} | {model} ({r['params_per_path']:,} params/path, H={r['steps_per_round']}) "
                        f"| {r['utilization']:.3f} | {r['tokens_per_s']:,.0f} | "
                        f"{r['bytes_per_peer_round'] / 1e6:.2f} | {r['bound_bytes_per_peer_round'] / 1e6:.2f} | "
                        f"{r['wire_efficiency']:.3f} | {r['vs_ddp']:.0f}× | {r['vs_ddp_at_H500']:.0f}× |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"# bench_swarm — {datetime.date.today()} — {platform.platform()}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"4 peers on loopback, one per path of the 2x2 grid, {args.rounds} rounds, matchmaking 3 s\n")
    print("| averaging | wire | model | utilization (inner / wall) | tokens/s per peer | MB sent per peer per round "
          "| all-reduce bound MB | wire efficiency (sent / bound) | bytes/token vs DDP | … at H=500 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nutilization: median over peers of Σ inner-step seconds / Σ round wall seconds, rounds 2.. ; "
          "bytes: loopback interface counters / peers / rounds (everything the swarm sent); "
          "DDP: ring all-reduce of fp32 gradients of the same path every step.")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_swarm.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
