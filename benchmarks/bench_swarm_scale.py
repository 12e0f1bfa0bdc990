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


def measure(size: int, rounds: int, docs, workdir: Path) -> dict:
    config = tiny_config(f"scale{size}")
    opened, join_seconds = [], []
    try:
        for i in range(size):
            t0 = time.perf_counter()
            options = JoinOptions(initial_peers=opened[0].maddrs if opened else (), new_swarm=not opened,
                                  host_maddrs=LOOPBACK, path=PATHS[i % 4], run_config=config, device="cpu")
            opened.append(open_node(options, workdir / f"s{size}-n{i}", lambda: docs))
            join_seconds.append(time.perf_counter() - t0)
            opened[-1].node.publish_status()
        lookups = []
        for _ in range(10):
            t0 = time.perf_counter()
            seen = len(opened[-1].node.records.fetch_peers())
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
        return {"peers": size, "completed": completed, "visible_records": seen,
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
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [4, 8], 1
    mp.set_start_method("fork", force=True)
    docs = load_documents(None, 4096)
    rows = []
    with tempfile.TemporaryDirectory(prefix="p2ptrain-scale-") as tmp:
        for size in args.sizes:
            rows.append(measure(size, args.rounds, docs, Path(tmp)))
    print(f"# bench_swarm_scale — {datetime.date.today()} — {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"real peers in one process on 127.0.0.1 (own DHT, p2pd and 3 averagers each), 2x2 grid, "
          f"tiny model (d_model 16), {args.rounds} rounds\n")
    print("| peers | completed all rounds | largest stem group | join (median) | DHT lookup of all records "
          "(median) | records visible | wall per round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['peers']} | {r['completed']} | {r['largest_stem_group']} | {r['join_median_s']:.2f} s | "
              f"{r['lookup_median_ms']:.1f} ms | {r['visible_records']} | {r['round_s']:.1f} s |")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_swarm_scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
