"""Memory per peer: the RAM one node of the demo's swarm takes, by process.

`make demo`'s swarm (4 `p2ptrain join` processes on 127.0.0.1, the 2×2 grid, H = 25,
AdamW8bit, one torch thread each); once every peer has reported its third round, each
peer's processes are read from /proc (psutil):

  PSS   proportional set size: pages shared between processes split among them, so the
        PSS of every process on the machine adds up to the RAM they use together
  USS   unique set size: pages only this process maps (what ending it would free)

by kind: the training process (`p2ptrain join`: model, AdamW8bit state, data), its DHT
process, its averager processes (one per module of the path, forked), p2pd (libp2p, a Go
binary) and torch's shared-memory manager (only with the "file_system" sharing strategy).
Variants, side by side in one run: p2ptrain's own settings, and hivemind's sharing
strategy ("file_system", HIVEMIND_MEMORY_SHARING_STRATEGY) instead of file descriptors;
with --averaging, instead: the demo's plain averaging, overlap (the round's pseudo-gradient
is kept while its average is in flight) and overlap with 4 fragments (that plus the slice's
globals and pseudo-gradient as it went out).

    python benchmarks/bench_node_memory.py [--quick] [--averaging]
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import tempfile
from pathlib import Path

import psutil

from common import base_parser, machine_info, markdown_table, print_header, write_outputs
from p2ptrain.config import RunConfig
from p2ptrain.demo import PATHS, demo_config, launch_swarm

KINDS = ("training process", "DHT process", "averager processes", "p2pd", "torch shared-memory manager")
# (name, hivemind's sharing strategy, averaging settings over the demo's)
VARIANTS = [("p2ptrain (file descriptors)", None, {}), ("hivemind's file_system strategy", "file_system", {})]
AVERAGING_VARIANTS = [("plain (the demo's)", None, {}), ("overlap", None, {"overlap": True}),
                      ("overlap, 1/4 fragments", None, {"overlap": True, "fragments": 4})]


def classify(root: psutil.Process) -> dict[str, list[psutil.Process]]:
    """A `join` process's tree by kind. hivemind forks the DHT process before the averagers:
    the oldest forked Python child is the DHT."""
    kinds: dict[str, list[psutil.Process]] = {k: [] for k in KINDS}
    kinds["training process"].append(root)
    forked = []
    for child in root.children(recursive=True):
        name = child.name()
        if "p2pd" in name:
            kinds["p2pd"].append(child)
        elif "torch_shm" in name:
            kinds["torch shared-memory manager"].append(child)
        else:
            forked.append(child)
    forked.sort(key=lambda p: p.create_time())
    if forked:
        kinds["DHT process"].append(forked[0])
        kinds["averager processes"].extend(forked[1:])
    return kinds


def sample(root: psutil.Process) -> dict[str, dict[str, float]]:
    """MB of PSS and USS per kind of one peer's processes."""
    out = {}
    for kind, procs in classify(root).items():
        pss = uss = 0.0
        for proc in procs:
            info = proc.memory_full_info()
            pss += info.pss / 2 ** 20
            uss += info.uss / 2 ** 20
        out[kind] = {"pss_mb": pss, "uss_mb": uss, "processes": len(procs)}
    return out


def run_variant(strategy: str | None, averaging: dict, rounds: int, sample_after: int, root: Path) -> list[dict]:
    """One demo swarm (`averaging`: settings over the demo's); every peer's processes sampled
    once all peers reported `sample_after` rounds."""
    saved = os.environ.get("HIVEMIND_MEMORY_SHARING_STRATEGY")
    if strategy is not None:
        os.environ["HIVEMIND_MEMORY_SHARING_STRATEGY"] = strategy
    config_file = root / "run.toml"
    config = RunConfig.from_toml_text(demo_config(rounds, 25))
    for key, value in averaging.items():
        setattr(config.averaging, key, value)
    config.validate("bench_node_memory")
    config_file.write_text(config.to_toml())
    events: queue.Queue = queue.Queue()
    try:
        peers = launch_swarm(root, config_file, rounds, PATHS, events)
    finally:
        if saved is None:
            os.environ.pop("HIVEMIND_MEMORY_SHARING_STRATEGY", None)
        else:
            os.environ["HIVEMIND_MEMORY_SHARING_STRATEGY"] = saved
    seen = {i: 0 for i in range(len(peers))}
    try:
        while min(seen.values()) < sample_after:
            index, event = events.get(timeout=600)
            if event.get("event") == "round":
                seen[index] += 1
            elif event.get("event") == "exit":
                raise SystemExit(f"peer {index} exited early; see {root}/peer{index}/peer.log")
        return [sample(psutil.Process(peer.proc.pid)) for peer in peers]
    finally:
        for peer in peers:
            peer.stop()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="sample after round 2", threads=False)
    parser.add_argument("--averaging", action="store_true",
                        help="compare plain averaging, overlap and overlapped fragments instead of sharing strategies")
    args = parser.parse_args()
    rounds, sample_after = (3, 2) if args.quick else (4, 3)
    info = machine_info()
    results = {}
    for name, strategy, averaging in AVERAGING_VARIANTS if args.averaging else VARIANTS:
        root = Path(tempfile.mkdtemp(prefix="p2ptrain-memory-"))
        try:
            results[name] = run_variant(strategy, averaging, rounds, sample_after, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print_header("bench_node_memory", info, [
        f"`make demo`'s swarm: 4 peers on loopback, H = 25, sampled once every peer reported round {sample_after}",
        "MB per peer, median over the 4 peers; PSS splits shared pages among their sharers (it adds up "
        "over processes), USS counts pages only that process maps"])
    rows = []
    for name, peers in results.items():
        for kind in KINDS:
            if not any(p[kind]["processes"] for p in peers):
                continue
            rows.append([name, kind, round(statistics.median(p[kind]["processes"] for p in peers)),
                         f"{statistics.median(p[kind]['pss_mb'] for p in peers):.0f}",
                         f"{statistics.median(p[kind]['uss_mb'] for p in peers):.0f}"])
        totals = [sum(p[k]["pss_mb"] for k in KINDS) for p in peers]
        rows.append([name, "**the whole peer**", round(statistics.median(sum(p[k]["processes"] for k in KINDS)
                                                                        for p in peers)),
                     f"**{statistics.median(totals):.0f}**", ""])
    print(markdown_table(["variant", "processes of one peer", "count", "PSS MB", "USS MB"], rows))
    write_outputs(__file__, {"info": info, "rounds": rounds, "sampled_after_round": sample_after,
                             "per_peer": results})


if __name__ == "__main__":
    main()
