"""Swarm scale on one machine: how many real peers complete rounds together, how long a
join takes, and DHT lookup latency as the swarm grows (8, 16, 32 peers).

Every peer is a real node — its own hivemind DHT process, p2pd daemon and one averager
process per module — opened with the same `open_node` that `p2ptrain join` uses, all
on 127.0.0.1 in this one Python process (threads stand in for machines). The model is
tiny so that the 2-core machine measures the swarm machinery, not training.

    python benchmarks/bench_swarm_scale.py [--sizes 8 16 32] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.swarm.join import JoinOptions, open_node

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PATHS = ["0,0", "0,1", "1,0", "1,1"]
OUT = Path("bench-out")


def tiny_config(run_id: str) -> RunConfig:
    return RunConfig.from_dict({
        "run": {"id": run_id},
        "model": {"d_model": 16, "n_heads": 2, "context": 16},
        "grid": {"levels": [2, 2], "blocks_per_level": 1},
        "router": {"kmeans_iters": 5, "sample_docs": 500},
        "inner": {"batch_size": 2, "steps_per_round": 2, "warmup_steps": 1},
        "averaging": {"matchmaking_time": 5.0, "averaging_timeout": 120.0, "fill_round": False},
    })


def measure(size: int, rounds: int, docs, workdir: Path, buckets: int = 1) -> dict:
    """One swarm of `size` peers; with buckets > 1 the peer table is split
    (averaging.peer_buckets) and a lookup is what a node reads each round: its bucket."""
    config = tiny_config(f"scale{size}b{buckets}")
    config.averaging.peer_buckets = buckets
    opened, join_seconds = [], []
    try:
        for i in range(size):
            t0 = time.perf_counter()
            options = JoinOptions(initial_peers=opened[0].maddrs if opened else (), new_swarm=not opened,
                                  host_maddrs=LOOPBACK, path=PATHS[i % 4], run_config=config, device="cpu")
            opened.append(open_node(options, workdir / f"s{size}-n{i}", lambda: docs))
            join_seconds.append(time.perf_counter() - t0)
            opened[-1].node.publish_status()
        lookups, reader = [], opened[-1].node
        for _ in range(10):
            t0 = time.perf_counter()
            if buckets == 1:
                seen = len(reader.records.fetch_peers())
            else:
                seen = len(reader.records.fetch_peers(reader.schedule.current_round(), reader.peer_id))
            lookups.append(time.perf_counter() - t0)
        threads = [threading.Thread(target=o.node.run, kwargs=dict(max_rounds=rounds), daemon=True) for o in opened]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        round_seconds = (time.perf_counter() - t0) / rounds
        completed = sum(1 for o in opened if len(o.node.history) == rounds)
        stem_groups = [len(o.node.history[-1].modules["stem"].group) for o in opened if o.node.history]
        return {"peers": size, "buckets": buckets, "completed": completed, "visible_records": seen,
                "join_median_s": statistics.median(join_seconds[1:]), "first_join_s": join_seconds[0],
                "lookup_median_ms": 1000 * statistics.median(lookups), "round_s": round_seconds,
                "largest_stem_group": max(stem_groups, default=0)}
    finally:
        for o in reversed(opened):
            o.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 and 8 peers, 1 round")
    parser.add_argument("--records-per-bucket", type=int, default=8,
                        help="each size also runs with its peer table split into size / this many buckets")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [4, 8], 1
    mp.set_start_method("fork", force=True)
    docs = load_documents(None, 4096)
    rows = []
    with tempfile.TemporaryDirectory(prefix="p2ptrain-scale-") as tmp:
        for size in args.sizes:  # the whole table, then split: side by side at each size
            rows.append(measure(size, args.rounds, docs, Path(tmp)))
            buckets = size // args.records_per_bucket
            if buckets > 1:
                rows.append(measure(size, args.rounds, docs, Path(tmp), buckets=buckets))
    print(f"# bench_swarm_scale — {datetime.date.today()} — {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"real peers in one process on 127.0.0.1 (own DHT, p2pd and 3 averagers each), 2x2 grid, "
          f"tiny model (d_model 16), {args.rounds} rounds\n")
    print("*lookup*: one read of the peer table as a node does it each round — the whole table, or with "
          "`averaging.peer_buckets` = B its own bucket for the round (median of 10); *records read*: "
          "records that read returned\n")
    print("| peers | peer table | completed all rounds | largest stem group | join (median) | lookup (median) "
          "| records read | wall per round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        table = "whole" if r["buckets"] == 1 else f"split in {r['buckets']}"
        print(f"| {r['peers']} | {table} | {r['completed']} | {r['largest_stem_group']} | {r['join_median_s']:.2f} s | "
              f"{r['lookup_median_ms']:.1f} ms | {r['visible_records']} | {r['round_s']:.1f} s |")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_swarm_scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
