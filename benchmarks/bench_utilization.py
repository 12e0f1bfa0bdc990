"""Compute utilization as a volunteer means it: each swarm peer's tokens/s divided by the
same peer's tokens/s with averaging switched off, on the same machine under the same load,
measured from outside the processes and interleaved in one run.

The swarm is `make demo`'s: 4 `p2ptrain join` processes on 127.0.0.1, one per path of the
2×2 grid, the demo's run config (H = 25, 16 s rounds, matchmaking 4 s). A swarm peer's
tokens/s is the tokens its `round` events report over the time between their arrivals at
this script (rounds 3.., so start-up and the first average are out): everything the peer
spends on a round counts, averaging, checkpoints and waits included. The reference is
benchmarks/solo_peer.py: the same `PathSession` of the same path, four of them side by
side (the same four processes' worth of load on the same cores) training flat out with no
swarm and no checkpoints, measured the same way from its step lines. A solo block runs
before and after every swarm variant; each variant's reference is the mean of the two.

A third table splits a peer's round (from its `round` events): inner steps, the outer phase
and, with plain averaging, its parts (group forming and all-reduce of the slowest module,
the record published, the wait for the group's fingerprints, the checkpoint's start), and
the rest of the wall time.

    python benchmarks/bench_utilization.py [--rounds 8] [--steps-per-round 25] [--quick] [--only fill-overlap ...]
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, base_parser, machine_info, markdown_table, print_header, write_outputs
from p2ptrain.config import RunConfig
from p2ptrain.demo import PATHS, demo_config, launch_swarm

# (name, averaging.fill_round, averaging.overlap)
VARIANTS = [("capped-plain", False, False), ("capped-overlap", False, True),
            ("fill-plain", True, False), ("fill-overlap", True, True)]
SKIP_ROUNDS = 2  # round 1 is start-up, round 2 the first average (with overlap, the first landed)
SOLO_WARMUP_S = 8.0  # solo lines before this (first steps, allocator warm-up) are not counted
PEER_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", P2PTRAIN_LOGLEVEL="ERROR")


def variant_config(rounds: int, fill: bool, overlap: bool, name: str, steps_per_round: int = 25) -> RunConfig:
    config = RunConfig.from_toml_text(demo_config(rounds, steps_per_round))
    config.run.id = f"util-{name}"
    config.averaging.fill_round = fill
    config.averaging.overlap = overlap
    return config


def rate(samples: list[tuple[float, int]]) -> float:
    """Tokens per second between the first and the last (time, tokens) sample: the tokens
    of every sample after the first, over the time between them."""
    if len(samples) < 2:
        return float("nan")
    return sum(n for _, n in samples[1:]) / (samples[-1][0] - samples[0][0])


def run_solo(config_file: Path, root: Path, seconds: float) -> dict[str, float]:
    """Four solo peers side by side; tokens/s per path after their warm-up."""
    procs, lines = {}, {path: [] for path in PATHS}
    for path in PATHS:
        home = root / f"solo-{path.replace(',', '')}"
        home.mkdir(parents=True, exist_ok=True)
        procs[path] = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "solo_peer.py"), "--run-config", str(config_file),
             "--home", str(home), "--path", path, "--seconds", str(seconds + SOLO_WARMUP_S)],
            stdout=subprocess.PIPE, stderr=open(home / "solo.log", "w"), text=True, env=PEER_ENV)

    def read(path: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            event = json.loads(line)
            lines[path].append((time.monotonic(), event))

    readers = [threading.Thread(target=read, args=(p, proc), daemon=True) for p, proc in procs.items()]
    for reader in readers:
        reader.start()
    for path, proc in procs.items():
        if proc.wait(timeout=seconds + 600):
            raise SystemExit(f"solo peer {path} failed; see {root}/solo-*/solo.log")
    for reader in readers:
        reader.join()
    result = {}
    for path, events in lines.items():
        ready = next(t for t, e in events if e["event"] == "ready")
        steps = [(t, e["tokens"]) for t, e in events if e["event"] == "steps" and t >= ready + SOLO_WARMUP_S]
        result[path] = rate(steps)
    return result


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_by_part(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of each peer's parts, summed over the peers: its training thread
    (the process's first thread), its other threads (heartbeat, averaging driver, checkpoint
    writer), its hivemind processes (DHT, one averager per module: every descendant but
    p2pd) and p2pd — and the whole machine's busy time from /proc/stat, so what no peer
    process accounts for (the kernel's own threads, this script, other work) shows too."""
    parts = {"training thread": 0.0, "other threads": 0.0, "hivemind processes": 0.0, "p2pd": 0.0}
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(proc / "stat")[1]), []).append(int(proc.name))
            except (OSError, IndexError):
                continue

    def descendants(pid: int) -> list[int]:
        found = []
        for child in children.get(pid, []):
            found += [child, *descendants(child)]
        return found

    for pid in pids:
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                f = _stat_fields(task / "stat")
                key = "training thread" if task.name == str(pid) else "other threads"
                parts[key] += (int(f[11]) + int(f[12])) / CLOCK_TICKS
            for child in descendants(pid):
                f = _stat_fields(Path(f"/proc/{child}/stat"))
                is_p2pd = b"p2pd" in Path(f"/proc/{child}/cmdline").read_bytes()
                parts["p2pd" if is_p2pd else "hivemind processes"] += (int(f[11]) + int(f[12])) / CLOCK_TICKS
        except OSError:
            continue  # a process that just exited: the window's totals are a lower bound
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    parts["machine busy"] = (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS  # all but idle and iowait
    return parts


def run_swarm(config: RunConfig, rounds: int, root: Path) -> dict:
    """The 4-peer swarm; per path, tokens/s from its round events' arrival times."""
    config_file = root / f"{config.run.id}.toml"
    config_file.write_text(config.to_toml())
    events: queue.Queue = queue.Queue()
    peers = launch_swarm(root / config.run.id, config_file, rounds, PATHS, events)
    arrivals: dict[int, list[tuple[float, dict]]] = {i: [] for i in range(len(peers))}
    finished, cpu = 0, {}
    try:
        while finished < len(peers):
            index, event = events.get(timeout=900)
            if event.get("event") == "round":
                arrivals[index].append((time.monotonic(), event))
                # CPU from the first peer's round 2 to the first peer's last round: every peer training
                seen = min(len(a) for a in arrivals.values())
                if seen == SKIP_ROUNDS and "start" not in cpu:
                    cpu["start"], cpu["t0"] = cpu_by_part([p.proc.pid for p in peers]), time.monotonic()
                if seen == rounds - 1 and "end" not in cpu and "start" in cpu:
                    cpu["end"], cpu["t1"] = cpu_by_part([p.proc.pid for p in peers]), time.monotonic()
            elif event.get("event") == "exit":
                finished += 1
                if "end" not in cpu and "start" in cpu:
                    cpu["end"], cpu["t1"] = cpu_by_part([p.proc.pid for p in peers]), time.monotonic()
    finally:
        for peer in peers:
            peer.stop()
    if any(p.proc.returncode for p in peers) or "end" not in cpu:
        raise SystemExit(f"a swarm peer failed; see {root / config.run.id}/peer*/peer.log")
    window = cpu["t1"] - cpu["t0"]
    out = {"cpu_cores": {k: (cpu["end"][k] - cpu["start"][k]) / window for k in cpu["start"]}}
    for index, rounds_seen in arrivals.items():
        steady = rounds_seen[SKIP_ROUNDS - 1:]  # the arrival of round 2 starts the clock
        out[peers[index].path] = {
            "tokens_per_s": rate([(t, e["tokens"]) for t, e in steady]),
            "rounds": [dict(e, arrived=t) for t, e in rounds_seen],
            "inner_share": (sum(e["seconds_inner"] for _, e in steady[1:])
                            / max(steady[-1][0] - steady[0][0], 1e-9)) if len(steady) > 1 else float("nan"),
            "groups": [e["peers_per_module"] for _, e in steady[1:]],
        }
    return out


def round_time_split(swarm: dict) -> dict[str, float]:
    """Where a peer's round went, median over the 4 peers' steady rounds (seconds): inner steps,
    the outer phase and its parts (plain averaging reports them; the slowest module's
    matchmaking and all-reduce inside "average"), and the rest of the wall time (waiting for
    the round's end, the loop itself)."""
    rows: list[dict[str, float]] = []
    for path in PATHS:
        for event in swarm[path]["rounds"][SKIP_ROUNDS:]:
            phases = event.get("outer_phases") or {}
            row = {"inner": event["seconds_inner"], "outer": event["seconds_outer"],
                   "rest of the round": event["seconds_wall"] - event["seconds_inner"] - event["seconds_outer"]}
            if phases:
                matchmaking = max(event.get("seconds_matchmaking_per_module", {}).values(), default=0.0)
                allreduce = max(event.get("seconds_allreduce_per_module", {}).values(), default=0.0)
                row.update({"group forming (slowest module)": matchmaking, "all-reduce (slowest module)": allreduce,
                            "rest of averaging (peer table, outer step)": phases["average"] - matchmaking - allreduce,
                            "publish record": phases["publish"], "fingerprint wait and verdict": phases["verify"],
                            "checkpoint start": phases["checkpoint"]})
            rows.append(row)
    keys = [k for k in rows[0]] if rows else []
    return {k: statistics.median(r[k] for r in rows if k in r) for k in keys}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="5 rounds, short solo blocks, two variants",
                         threads=False)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--solo-seconds", type=float, default=40.0)
    parser.add_argument("--steps-per-round", type=int, default=25,
                        help="H: the demo's 25, or fewer to see what capping a round at H costs when H steps "
                             "finish before the round's end")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help=f"run only these of {', '.join(v[0] for v in VARIANTS)}")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.solo_seconds = 5, 20.0
        args.only = args.only or ["capped-overlap", "fill-overlap"]
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="p2ptrain-util-"))
    results, solos = {}, []
    try:
        solo_file = root / "solo.toml"
        solo_file.write_text(demo_config(args.rounds, args.steps_per_round))
        solos.append(run_solo(solo_file, root, args.solo_seconds))
        for name, fill, overlap in variants:
            config = variant_config(args.rounds, fill, overlap, name, args.steps_per_round)
            swarm = run_swarm(config, args.rounds, root)
            solos.append(run_solo(solo_file, root, args.solo_seconds))
            before, after = solos[-2], solos[-1]
            reference = {p: (before[p] + after[p]) / 2 for p in PATHS}
            ratios = {p: swarm[p]["tokens_per_s"] / reference[p] for p in PATHS}
            cores = swarm.pop("cpu_cores")
            results[name] = {"fill_round": fill, "overlap": overlap, "swarm": swarm, "solo_reference": reference,
                             "solo_before": before, "solo_after": after, "utilization_per_peer": ratios,
                             "utilization": statistics.median(ratios.values()), "cpu_cores": cores}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cfg = variant_config(args.rounds, True, True, "x", args.steps_per_round)
    print_header("bench_utilization", info, [
        f"4 peers on loopback, the demo's run config (H = {cfg.inner.steps_per_round}, rounds of "
        f"{cfg.averaging.round_seconds:.0f} s, matchmaking {cfg.averaging.matchmaking_time:.0f} s), {args.rounds} "
        f"rounds; solo blocks of {args.solo_seconds:.0f} s before and after each swarm",
        "utilization = a swarm peer's tokens/s (its round events' tokens over their arrival times, rounds 3..) "
        "÷ the same path's solo tokens/s (4 solo peers side by side, no averaging); median over the 4 peers"])
    rows = []
    for name, r in results.items():
        per_peer = sorted(r["utilization_per_peer"].values())
        rows.append([name, "until the round's end" if r["fill_round"] else "at most H steps",
                     "overlap" if r["overlap"] else "plain",
                     f"{statistics.median(s['tokens_per_s'] for s in r['swarm'].values()):,.0f}",
                     f"{statistics.median(r['solo_reference'].values()):,.0f}",
                     f"**{r['utilization']:.3f}**", f"{per_peer[0]:.3f}–{per_peer[-1]:.3f}",
                     f"{statistics.median(s['inner_share'] for s in r['swarm'].values()):.3f}"])
    print(markdown_table(["variant", "inner steps", "averaging", "swarm tokens/s per peer (median)",
                          "solo tokens/s per peer (median)", "utilization (swarm ÷ solo, median)",
                          "per-peer range", "share of wall in inner steps"], rows))
    print("\nWhere the 2 cores went while the swarm trained (cores, summed over the 4 peers; the window is "
          "from the round that starts the clock to the last but one):\n")
    parts = ["training thread", "other threads", "hivemind processes", "p2pd"]
    rows = []
    for name, r in results.items():
        cores = r["cpu_cores"]
        rows.append([name, *(f"{cores[k]:.2f}" for k in parts),
                     f"{cores['machine busy'] - sum(cores[k] for k in parts):.2f}", f"{cores['machine busy']:.2f}"])
    print(markdown_table(["variant", *parts, "no peer process (kernel threads, other work)", "machine busy"], rows))
    splits = {name: round_time_split(r["swarm"]) for name, r in results.items()}
    columns = ["inner", "outer", "group forming (slowest module)", "all-reduce (slowest module)",
               "rest of averaging (peer table, outer step)", "publish record", "fingerprint wait and verdict",
               "checkpoint start", "rest of the round"]
    print("\nWhere a round went (seconds, median over the 4 peers' rounds 3..; the outer phase's parts are "
          "reported with plain averaging only):\n")
    print(markdown_table(["variant", *columns],
                         [[name, *(f"{split[c]:.2f}" if c in split else "—" for c in columns)]
                          for name, split in splits.items()]))
    for name, split in splits.items():
        results[name]["round_time_split"] = split
    write_outputs(__file__, {"info": info, "args": vars(args), "solos": solos, "results": results})


if __name__ == "__main__":
    main()
