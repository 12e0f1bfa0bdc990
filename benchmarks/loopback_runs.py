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
    return {
        "peers": n_peers, "overlap": config.averaging.overlap, "steps_per_round": H,
        "rounds": config.inner.total_rounds, "matchmaking_time": config.averaging.matchmaking_time,
        "tokens_per_step": config.inner.batch_size * config.model.context,
        "completed_peers": len(per_peer),
        "wall_per_round_s": statistics.median(wall_per_peer),
        "utilization": bench_swarm.training_thread_share(result),
        "outer_s": statistics.median(e["seconds_outer"] for events in per_peer for e in events),
        **group_outcomes(per_peer),
        "step_s_median": statistics.median(step_s_all),
        "step_s_per_peer": step_s_per_peer,
        "step_s_all": step_s_all,
        "loopback_bytes_per_peer_round": result["bytes"] / n_peers / config.inner.total_rounds,
        "rounds_by_peer": result["rounds"],
    }


def group_outcomes(per_peer: list[list[dict]]) -> dict:
    """From every peer's round events: the mean group size of the stem and of the level
    modules ("mean_group"), and the share of module-rounds that ended in a re-sync."""
    groups: dict[str, list[int]] = {"stem": [], "level": []}
    for events in per_peer:
        for e in events:
            for module, n in e["peers_per_module"].items():
                groups["stem" if module == "stem" else "level"].append(n)
    module_rounds = sum(len(e["peers_per_module"]) for events in per_peer for e in events)
    return {"mean_group": {k: (statistics.mean(v) if v else 0.0) for k, v in groups.items()},
            "resync_fraction": sum(len(e["resynced"]) for events in per_peer for e in events) / max(module_rounds, 1)}


# --------------------------------------------------------------- heterogeneous peers
#
# Slowed peers: the whole process tree of a `p2ptrain join` (the Python process and its p2pd)
# goes into its own CPU cgroup with a CFS quota, so it gets at most `cores` of CPU however idle
# the machine is — a slower machine, without hooks in p2ptrain. cgroup v1 (/sys/fs/cgroup/cpu,
# cpu.cfs_quota_us) or v2 (cpu.max); needs root and a writable cgroup hierarchy.

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


class CpuLimits:
    """CFS CPU quotas for some processes (and their children): `limit(pid, cores)`; `close()`
    removes the cgroups once the processes have exited."""

    PERIOD_US = 100_000
    instances = 0

    def __init__(self, name: str = "p2ptrain-slow"):
        import os
        controllers = CGROUP_V2 / "cgroup.controllers"
        if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
            self.v2, root = False, CGROUP_V1
        elif controllers.exists() and "cpu" in controllers.read_text().split():
            self.v2, root = True, CGROUP_V2
        else:
            raise RuntimeError("no writable cpu cgroup controller (/sys/fs/cgroup/cpu or cgroup v2 cpu.max)")
        CpuLimits.instances += 1
        self.root = root / f"{name}-{os.getpid()}-{CpuLimits.instances}"
        self.root.mkdir(exist_ok=True)
        if self.v2:
            (self.root / "cgroup.subtree_control").write_text("+cpu")
        self.groups: list[Path] = []

    def limit(self, pid: int, cores: float) -> list[int]:
        group = self.root / f"g{len(self.groups)}"
        group.mkdir()
        quota = max(int(cores * self.PERIOD_US), 1000)
        if self.v2:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        self.groups.append(group)
        moved = []
        for p in process_tree(pid):
            try:
                (group / "cgroup.procs").write_text(str(p))
                moved.append(p)
            except OSError:
                pass  # exited meanwhile
        return moved

    def release(self, pids: list[int]) -> int:
        """Move processes out of every quota (v1: the hierarchy's root; v2: a sibling group with
        no quota), e.g. a slowed peer's hivemind processes, so that only its training is slowed.
        Returns how many moved."""
        if self.v2:
            target = self.root / "free"
            target.mkdir(exist_ok=True)
            if target not in self.groups:
                self.groups.append(target)
        else:
            target = CGROUP_V1
        moved = 0
        for p in pids:
            try:
                current = Path(f"/proc/{p}/cgroup").read_text()
                if self.root.name not in current or (self.v2 and "/free" in current):
                    continue  # not in one of our quota groups
                (target / "cgroup.procs").write_text(str(p))
                moved += 1
            except OSError:
                pass  # exited meanwhile
        return moved

    def throttled_s(self) -> list[float]:
        """Seconds each group spent throttled (cpu.stat), in limit() order."""
        out = []
        for group in self.groups:
            stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines() if line.strip())
            out.append(int(stat.get("throttled_usec", stat.get("throttled_time", 0))) /
                       (1e6 if "throttled_usec" in stat else 1e9))
        return out

    def close(self, wait_s: float = 30.0) -> None:
        """Remove the cgroups; a group empties only once its processes (p2pd too) have exited."""
        import time
        deadline = time.monotonic() + wait_s
        for group in [*self.groups, self.root]:
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"  could not remove {group} (processes still in it)", flush=True)
                        break
                    time.sleep(0.5)


# --------------------------------------------------------------- link shaping (probe)

LINK_SHAPING_STEPS = (
    ("ip netns add p2ptrain-probe", "a network namespace"),
    ("ip link add p2pprobe0 type veth peer name p2pprobe1", "a veth pair"),
    ("ip link set p2pprobe1 netns p2ptrain-probe", "one end moved into the namespace"),
    ("tc qdisc add dev p2pprobe0 root tbf rate 50mbit burst 32kbit latency 50ms", "rate limit (tbf)"),
    ("tc qdisc replace dev p2pprobe0 root htb default 10", "classful rate limit (htb)"),
    ("tc qdisc replace dev p2pprobe0 root netem delay 30ms", "delay / loss (netem)"),
)
LINK_SHAPING_CLEANUP = ("ip link del p2pprobe0", "ip netns del p2ptrain-probe")


def probe_link_shaping() -> list[dict]:
    """Whether this machine lets a benchmark shape a peer's link: each command of a netns + veth +
    tc setup, its exit status and error, then everything removed again."""
    import shlex
    import subprocess
    out = []
    try:
        for cmd, what in LINK_SHAPING_STEPS:
            try:
                p = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=20)
                out.append({"command": cmd, "what": what, "rc": p.returncode,
                            "error": (p.stderr or p.stdout).strip()})
            except (OSError, subprocess.TimeoutExpired) as e:
                out.append({"command": cmd, "what": what, "rc": -1, "error": str(e)})
    finally:
        for cmd in LINK_SHAPING_CLEANUP:
            subprocess.run(shlex.split(cmd), capture_output=True, timeout=20)
    return out
