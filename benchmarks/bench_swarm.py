"""Wire efficiency and communication vs data-parallel, measured on a real 4-peer loopback
swarm at the H quoted (H = 25 and H = 500 on the default model, the latter with 4 sequences
a step so 500 steps fit a 150 s round on 2 cores; H = 4 on the wide one; H = 25 and H = 500
on a tiny model).

Each peer is a separate `p2ptrain join` process (as in `make demo`). Bytes on the wire are
read from the loopback interface's counters (/proc/net/dev), so they include everything
the swarm sends — all-reduce parts, libp2p framing and encryption, DHT records,
matchmaking — and nothing else should use loopback while this runs. The all-reduce bound
uses the group sizes the peers' round events report and the codec's measured bytes (each
module cut into the parts an averager sends and run through the averager's own codec).

Peers stop at exactly H steps a round here (averaging.fill_round off), so "at H = 500"
means 500 steps a round; tokens are the ones the round events report. Compute utilization
is bench_utilization.py's job: the "training-thread share" column here is only the share of
wall time the training thread spent in inner steps, not a utilization.

    python benchmarks/bench_swarm.py [--rounds 6] [--quick] [--only VARIANT ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import queue
import shutil
import statistics
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

OUT = Path(__file__).resolve().parent.parent / "bench-out"


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


def run_swarm(config: RunConfig, rounds: int, workdir: Path, paths: list[str] = PATHS,
              on_launch=None, network=None) -> dict:
    """Train `rounds` rounds with one peer per entry of `paths`; collect round events and the
    bytes sent (on loopback, or over `network`'s links: shaped_links.ShapedNetwork).
    on_launch(peers), if given, runs once every process is started (e.g. to slow some of them)."""
    config_file = workdir / f"{config.run.id}.toml"
    config_file.write_text(config.to_toml())
    events: queue.Queue = queue.Queue()
    sent_bytes = network.sent_bytes if network is not None else loopback_tx_bytes
    peers = launch_swarm(workdir / config.run.id, config_file, rounds, paths, events, network=network)
    rounds_by_peer: dict[int, list[dict]] = {i: [] for i in range(len(peers))}
    start_bytes, start_time, finished = None, None, 0
    try:
        if on_launch is not None:
            on_launch(peers)
        while finished < len(peers):
            index, event = events.get(timeout=900)
            if event.get("event") == "peers" and start_bytes is None:
                start_bytes, start_time = sent_bytes(), time.monotonic()
            elif event.get("event") == "round":
                rounds_by_peer[index].append(event)
            elif event.get("event") == "exit":
                finished += 1
    finally:
        for peer in peers:
            peer.stop()
    if any(p.proc.returncode for p in peers):
        raise SystemExit(f"a peer failed; see {workdir / config.run.id}/peer*/peer.log")
    return {"rounds": rounds_by_peer, "bytes": sent_bytes() - start_bytes,
            "seconds": time.monotonic() - start_time}


def training_thread_share(result: dict) -> float:
    """Median over peers of Σ inner-step seconds / Σ round wall seconds, rounds 2.. : the share of
    wall time the training thread spent in inner steps. Not a utilization: with overlap the
    all-reduce runs on other threads of the same cores and its cost lands inside the inner
    seconds (bench_utilization.py measures utilization)."""
    values = []
    for events in result["rounds"].values():
        steady = events[1:] or events
        values.append(sum(e["seconds_inner"] for e in steady) / sum(e["seconds_wall"] for e in steady))
    values.sort()
    return values[len(values) // 2]


def codec_bytes(values: int, compression: str) -> int:
    """What the codec puts on the wire for a module of `values` parameters: the module cut into
    the parts an averager sends (averaging_part_bytes), each through the averager's codec."""
    from hivemind.compression import CompressionInfo
    from p2ptrain.swarm.averaging import averaging_part_bytes, make_compression
    codec = make_compression(compression)
    part_values = max(1, int(averaging_part_bytes(values, compression) / BYTES_PER_VALUE[compression]))
    flat = torch.randn(values, generator=torch.Generator().manual_seed(0)) * 1e-2
    return sum(len(codec.compress(part, CompressionInfo.from_tensor(part)).buffer)
               for part in flat.split(part_values))


def reported_bound(result: dict, sizes: dict[str, int], compression: str) -> float:
    """All-reduce bound per peer per round, rounds 2..: Σ over the modules a peer averaged of
    2(n−1)/n × the codec's bytes for the module, n = the group size its round event reports."""
    coded = {m: codec_bytes(v, compression) for m, v in sizes.items()}
    total, count = 0.0, 0
    for events in result["rounds"].values():
        for e in events[1:] or events:
            total += sum(2 * (n - 1) / n * coded[m] for m, n in e["peers_per_module"].items() if n > 1)
            count += 1
    return total / max(count, 1)


def full_group_bound(config: RunConfig, sizes: dict[str, int]) -> float:
    """The bound if every module were averaged by all its holders every round (one peer per path)."""
    grid = Grid.from_config(config.grid)
    coded = {m: codec_bytes(v, config.averaging.compression) for m, v in sizes.items()}
    per_path = [sum(2 * (len(grid.paths_containing(m)) - 1) / len(grid.paths_containing(m)) * coded[m]
                    for m in grid.modules_of(path)) for path in grid.paths()]
    return sum(per_path) / len(per_path)


# (name, wire codec, overlap?, model, H, round seconds). "wide" is the default grid at
# d_model 512 (6.3M values per level module): module payloads of the size a real run
# averages; a few steps per round keep its compute affordable on 2 cores. "tiny" (d_model
# 32) keeps 500 steps a round affordable, so bytes per token are measured at H = 500
# itself (time-based traffic — heartbeats, DHT upkeep, matchmaking polls — grows with a
# round's length) and at H = 25 beside it.
VARIANTS = [("plain-fp16", "fp16", False, "default", 25, 16.0),
            ("overlap-fp16", "fp16", True, "default", 25, 16.0),
            ("plain-8bit", "8bit", False, "default", 25, 16.0),
            ("plain-4bit", "4bit", False, "default", 25, 16.0),
            ("plain-fp16-wide", "fp16", False, "wide", 4, 30.0),
            ("plain-8bit-wide", "8bit", False, "wide", 4, 30.0),
            ("plain-8bit-tiny-H25", "8bit", False, "tiny", 25, 6.0),
            ("plain-8bit-tiny-H500", "8bit", False, "tiny", 500, 45.0),
            ("plain-4bit-tiny-H500", "4bit", False, "tiny", 500, 45.0),
            ("plain-8bit-H500", "8bit", False, "default-b4", 500, 150.0),
            ("plain-4bit-H500", "4bit", False, "default-b4", 500, 150.0)]
# "default-b4" is the default model with 4 sequences a step, so 500 steps fit a 150 s round:
# bytes per token vs DDP do not depend on the batch (DDP's all-reduce is per step, ours per round).
MODELS = {"default-b4": {"d_model": 128, "n_heads": 4, "batch_size": 4},
          "wide": {"d_model": 512, "n_heads": 8, "batch_size": 4},
          "tiny": {"d_model": 32, "n_heads": 2, "batch_size": 4}}


def variant_config(base: RunConfig, name: str, codec: str, overlap: bool, model: str, steps: int,
                   round_seconds: float) -> RunConfig:
    config = RunConfig.from_dict(base.to_dict())
    config.run.id = f"bench-{name}"
    config.averaging.compression = codec
    config.averaging.overlap = overlap
    config.averaging.fill_round = False  # exactly H steps a round: the H the row quotes
    config.averaging.round_seconds = round_seconds
    config.inner.steps_per_round = steps
    config.inner.warmup_steps = min(config.inner.warmup_steps, steps)
    if model in MODELS:
        config.model.d_model, config.model.n_heads = MODELS[model]["d_model"], MODELS[model]["n_heads"]
        config.inner.batch_size = MODELS[model]["batch_size"]
    return config


def measure(config: RunConfig, rounds: int, workdir: Path) -> dict:
    """Run one variant's swarm: bytes against the reported-groups bound, and against DDP, with
    the factor split into its sources."""
    result = run_swarm(config, rounds, workdir)
    sizes = module_sizes(config)
    grid = Grid.from_config(config.grid)
    n_peers = len(result["rounds"])
    steady = {i: events[1:] or events for i, events in result["rounds"].items()}
    peer_rounds = sum(len(events) for events in result["rounds"].values())
    measured = result["bytes"] / peer_rounds  # loopback bytes per peer per round
    tokens = sum(e["tokens"] for events in result["rounds"].values() for e in events)
    tokens_per_step = config.inner.batch_size * config.model.context
    steps_per_round = tokens / tokens_per_step / peer_rounds
    payload = statistics.mean(sum(e.get("bytes_sent_per_module", {}).values())
                              for events in steady.values() for e in events)
    bound = reported_bound(result, sizes, config.averaging.compression)
    params_per_path = sum(sizes[m] for m in grid.modules_of((0, 0)))
    # synchronous DDP of the same path over the same peers: a ring all-reduce of fp32
    # gradients every step, bound 2(n−1)/n × 4 B × params per step
    ddp_per_step = 2 * (n_peers - 1) / n_peers * 4 * params_per_path
    ddp_per_token = ddp_per_step / tokens_per_step
    ours_per_token = result["bytes"] / tokens
    # the factor vs DDP, split: H steps share one exchange; the codec's bytes vs fp32; DiPaCo's
    # groups (a module averaged by its holders only, in the groups reported) vs all peers; and
    # the wire's overhead over the all-reduce bound (framing, DHT, matchmaking)
    codec_factor = 4 * sum(sizes.values()) / sum(codec_bytes(v, config.averaging.compression)
                                                 for v in sizes.values())
    fp32_reported = bound * codec_factor
    return {"params_per_path": params_per_path, "steps_per_round": steps_per_round,
            "rounds": rounds, "training_thread_share": training_thread_share(result),
            "tokens_per_peer_round": tokens / peer_rounds,
            "bytes_per_peer_round": measured, "allreduce_payload_per_peer_round": payload,
            "bound_bytes_per_peer_round": bound, "full_group_bound_per_peer_round": full_group_bound(config, sizes),
            "wire_efficiency": measured / bound, "ddp_bytes_per_token": ddp_per_token,
            "bytes_per_token": ours_per_token, "vs_ddp": ddp_per_token / ours_per_token,
            "factors": {"H": steps_per_round, "codec": codec_factor, "groups": ddp_per_step / fp32_reported,
                        "overhead": measured / bound},
            "mean_group": statistics.mean(n for events in steady.values() for e in events
                                          for n in e["peers_per_module"].values()),
            "events": result["rounds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 rounds, the default-model fp16 variants only")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help=f"run only these of {', '.join(v[0] for v in VARIANTS)}")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
        args.only = args.only or ["plain-fp16", "plain-8bit-tiny-H25"]
    workdir = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-"))
    base = RunConfig.load()
    base.inner.total_rounds = args.rounds
    base.averaging.matchmaking_time = 3.0
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    rows, split_rows, results = [], [], {}
    try:
        for name, codec, overlap, model, steps, round_seconds in variants:
            config = variant_config(base, name, codec, overlap, model, steps, round_seconds)
            r = results[name] = measure(config, args.rounds, workdir)
            f = r["factors"]
            label = f"{model} ({r['params_per_path']:,} params/path)"
            rows.append(f"| {'overlap' if overlap else 'plain'} | {codec} | {label} | {steps} | "
                        f"{r['steps_per_round']:.1f} | {r['training_thread_share']:.3f} | "
                        f"{r['bytes_per_peer_round'] / 1e6:.3f} | {r['allreduce_payload_per_peer_round'] / 1e6:.3f} | "
                        f"{r['bound_bytes_per_peer_round'] / 1e6:.3f} | {r['mean_group']:.2f} | "
                        f"{r['wire_efficiency']:.3f} | {r['vs_ddp']:,.0f}× |")
            split_rows.append(f"| {name} | {r['vs_ddp']:,.0f}× | {f['H']:.1f} | {f['codec']:.2f} | "
                              f"{f['groups']:.2f} | {f['overhead']:.3f} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"# bench_swarm — {datetime.date.today()} — {platform.platform()}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"4 peers on loopback, one per path of the 2x2 grid, {args.rounds} rounds, matchmaking 3 s, "
          "exactly H steps a round\n")
    print("| averaging | wire | model | H | steps per round (measured) | training-thread share (not utilization) "
          "| MB sent per peer per round (loopback) | all-reduce payload MB (averagers' count) "
          "| bound MB (reported groups, codec bytes) | mean group | wire efficiency (sent / bound) "
          "| bytes/token vs DDP (measured) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nWhere the factor vs DDP comes from (vs DDP = H × codec × groups ÷ overhead):\n")
    print("| variant | vs DDP | H (steps per exchange) | codec (fp32 bytes ÷ codec bytes) "
          "| groups (DDP's all-peer fp32 all-reduce ÷ ours in fp32, reported groups) | overhead (sent ÷ bound) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(split_rows))
    print("\nbytes: loopback interface counters over all rounds / peers / rounds (everything the swarm sent); "
          "bound: Σ over each peer's averaged modules of 2(n−1)/n × codec bytes, n from its round events, rounds 2..; "
          "DDP: ring all-reduce of fp32 gradients of the same path among the same peers every step.")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_swarm.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
