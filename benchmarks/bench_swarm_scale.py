"""Swarm scale on one machine: how many real peers complete rounds together, how long a
join takes, and DHT lookup latency as the swarm grows (8, 16, 32 peers).

Every peer is a real node — its own hivemind DHT process, p2pd daemon and one averager
process per module — opened with the same `open_node` that `p2ptrain join` uses, all
on 127.0.0.1 in this one Python process (threads stand in for machines). The model is
tiny so that the 2-core machine measures the swarm machinery, not training.

    python benchmarks/bench_swarm_scale.py [--sizes 8 16 32] [--rounds 2] [--quick]

--staging G: instead, staged averaging at scale. Every size runs with
averaging.target_group_size = G, once with `staged = true` (two stages: about sqrt(n)
groups, then across them) and once with `staged = false` (holders beyond G average in
separate groups), side by side; what counts is whether all holders of a module end each
round with the same state, measured directly: the largest difference between any two
peers' global parameters of the module after the last round, and the rounds' outcomes
(re-syncs and splits the post-round fingerprint check reported).

    python benchmarks/bench_swarm_scale.py --staging 4 [--sizes 8 16] [--rounds 3]

--overlap-fragments N (with --staging): the configuration the simulator's scaling
projection runs on, on real peers: averaging.overlap = true, averaging.fragments = N and
the second stage's wait (averaging.stage_wait, its default), so each round averages one
slice of each module in the background and lands it a round later.

    python benchmarks/bench_swarm_scale.py --staging 4 --overlap-fragments 4 --sizes 16 --rounds 6
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


def measure(size: int, rounds: int, docs, workdir: Path, buckets: int = 1,
            staging: tuple[int, bool] | None = None, overlap_fragments: int | None = None) -> dict:
    """One swarm of `size` peers; with buckets > 1 the peer table is split
    (averaging.peer_buckets) and a lookup is what a node reads each round: its bucket.
    staging: (target_group_size, staged) for the --staging comparison; overlap_fragments:
    that many fragments, averaged with overlap."""
    config = tiny_config(f"scale{size}b{buckets}" + (f"g{staging[0]}{'s' if staging[1] else 'u'}" if staging else "")
                         + (f"of{overlap_fragments}" if overlap_fragments else ""))
    config.averaging.peer_buckets = buckets
    if staging is not None:
        config.averaging.target_group_size, config.averaging.staged = staging
    if overlap_fragments is not None:
        config.averaging.overlap, config.averaging.fragments = True, overlap_fragments
    # the nodes' warnings (re-syncs, refused slices) go to stderr: say which swarm they are from
    print(f"--- swarm {config.run.id}: {size} peers", file=sys.stderr, flush=True)
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
        row = {"peers": size, "buckets": buckets, "completed": completed, "visible_records": seen,
               "join_median_s": statistics.median(join_seconds[1:]), "first_join_s": join_seconds[0],
               "lookup_median_ms": 1000 * statistics.median(lookups), "round_s": round_seconds,
               "largest_stem_group": max(stem_groups, default=0)}
        if staging is not None:
            row.update(agreement(opened, rounds), target_group_size=staging[0], staged=staging[1],
                       overlap_fragments=overlap_fragments)
        return row
    finally:
        for o in reversed(opened):
            o.close()


def agreement(opened, rounds: int) -> dict:
    """Do a module's holders end with the same state? Per module: the largest difference
    between two holders' global parameters after the last round (all holders ran the same
    number of rounds), and over all rounds and holders the outcomes the post-round check
    reported, with the stage group sizes."""
    by_module: dict[str, list] = {}
    for o in opened:
        if len(o.node.history) != rounds:
            continue
        for module_id, slot in o.node.slots.items():
            by_module.setdefault(module_id, []).append(torch.cat([p.reshape(-1) for p in slot.outer.global_params]))
    spread = {m: max(float((x - xs[0]).abs().max()) for x in xs) for m, xs in by_module.items() if len(xs) > 1}
    outcomes: dict[str, int] = {}
    stage_sizes: list[list[int]] = []
    for o in opened:
        for report in o.node.history[1:]:  # round 1 is start-up (catch-ups, joins)
            for module_round in report.modules.values():
                outcomes[module_round.outcome] = outcomes.get(module_round.outcome, 0) + 1
                if module_round.stage_groups:
                    stage_sizes.append(module_round.stage_groups)
    return {"module_spread": spread, "outcomes": outcomes,
            "stage1_median": statistics.median(s[0] for s in stage_sizes) if stage_sizes else None,
            "stage2_median": statistics.median(s[1] for s in stage_sizes) if stage_sizes else None,
            "staged_module_rounds": len(stage_sizes)}


def print_staging(rows: list[dict]) -> None:
    print("*holders agree*: modules whose holders all end within 1e-3 of each other (largest parameter "
          "difference after the last round; honest copies differ by fp16 wire rounding only); *outcomes*: "
          "module-rounds after round 1 as the post-round fingerprint check reported them (ok, partial, resynced: "
          "downloaded the majority's state, split: no majority)\n")
    print("| peers | target group | staged | completed all rounds | stage groups (median: 1st / 2nd) "
          "| holders agree | largest difference | outcomes | wall per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = r["module_spread"]
        agree = sum(v < 1e-3 for v in spread.values())
        stages = (f"{r['stage1_median']:g} / {r['stage2_median']:g} ({r['staged_module_rounds']} module-rounds)"
                  if r["stage1_median"] is not None else "-")
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        print(f"| {r['peers']} | {r['target_group_size']} | {'yes' if r['staged'] else 'no'} | {r['completed']} "
              f"| {stages} | {agree} of {len(spread)} | {max(spread.values(), default=0):.2g} | {outcomes} "
              f"| {r['round_s']:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 and 8 peers, 1 round")
    parser.add_argument("--staging", type=int, default=None, metavar="G",
                        help="compare staged and unstaged averaging at target_group_size G (see the docstring)")
    parser.add_argument("--overlap-fragments", type=int, default=None, metavar="N",
                        help="with --staging: average N fragments with overlap (see the docstring)")
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
            if args.staging is not None:
                for staged in (True, False):
                    rows.append(measure(size, args.rounds, docs, Path(tmp), staging=(args.staging, staged),
                                        overlap_fragments=args.overlap_fragments))
                continue
            rows.append(measure(size, args.rounds, docs, Path(tmp)))
            buckets = size // args.records_per_bucket
            if buckets > 1:
                rows.append(measure(size, args.rounds, docs, Path(tmp), buckets=buckets))
    if args.staging is not None:
        print(f"# bench_swarm_scale --staging {args.staging} — {datetime.date.today()} — {platform.platform()}")
        print(f"command: {' '.join(sys.argv)}")
        print(f"real peers in one process on 127.0.0.1, 2x2 grid (the stem is held by every peer, each level "
              f"module by half), tiny model, {args.rounds} rounds, fp16 wire"
              + (f", overlap with {args.overlap_fragments} fragments and the second stage's wait"
                 if args.overlap_fragments else "") + "\n")
        print_staging(rows)
        OUT.mkdir(exist_ok=True)
        (OUT / "bench_swarm_scale_staging.json").write_text(json.dumps(rows, indent=1))
        return
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
