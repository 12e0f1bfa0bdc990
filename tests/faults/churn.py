"""A swarm whose peers keep joining and leaving, around one peer that stays: do rounds
keep succeeding, and do the resident's processes stay bounded in memory and open file
descriptors? (hivemind's averager once leaked per group it joined, its issue #264.)

Used by tests/faults/test_churn.py (a short run) and benchmarks/bench_churn.py (a long one).
Every peer is a real node opened as `p2ptrain join` opens it, on 127.0.0.1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

from tests.swarm.conftest import Swarm, in_parallel


@dataclass
class ChurnSample:
    round: int
    live: int  # peers that ran this round
    joined: int  # peers opened so far, the resident included
    rss_mb: float  # the resident's DHT, averager and p2pd processes together
    fds: int
    groups: dict[str, int]  # module → size of the resident's group this round (1 = alone)


@dataclass
class ChurnReport:
    samples: list[ChurnSample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.samples)

    def averaged_rounds(self) -> int:
        """Rounds in which the resident averaged every module with at least one peer."""
        return sum(all(n >= 2 for n in s.groups.values()) for s in self.samples)


def resident_processes(opened) -> list[psutil.Process]:
    """The processes a node owns: its DHT process (and p2pd under it), one averager per module."""
    pids = [opened.dht.pid] + [slot.averager.pid for slot in opened.node.slots.values()]
    procs = []
    for pid in pids:
        proc = psutil.Process(pid)
        procs.append(proc)
        procs.extend(proc.children(recursive=True))
    return procs


def measure(opened) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a node's processes, summed."""
    rss = fds = 0
    for proc in resident_processes(opened):
        try:
            rss += proc.memory_info().rss
            fds += proc.num_fds()
        except psutil.NoSuchProcess:
            continue
    return rss / 2 ** 20, fds


def run_churn(swarm: Swarm, config, *, live: int, replace_per_round: int, rounds: int,
              path: str = "0") -> ChurnReport:
    """Open a resident and live − 1 visitors; each round every live peer runs one round,
    then (but after the last) the `replace_per_round` oldest visitors leave and as many new
    ones join: live + replace_per_round × (rounds − 1) peers in all."""
    report = ChurnReport()
    t0 = time.monotonic()
    resident = swarm.open(config, path)
    visitors = [swarm.open(config, path, initial_peers=resident.maddrs) for _ in range(live - 1)]
    joined = live
    for index in range(rounds):
        nodes = [resident, *visitors]
        histories = in_parallel(*(lambda n=n: n.node.run(max_rounds=1) for n in nodes), timeout=600)
        last = histories[0][-1] if histories[0] else None
        groups = {m: max(len(r.group), 1) for m, r in last.modules.items()} if last is not None else {}
        rss, fds = measure(resident)
        report.samples.append(ChurnSample(resident.node.round, len(nodes), joined, rss, fds, groups))
        if index + 1 == rounds:
            break  # the last round's peers stay, so the caller can compare them
        for leaving in visitors[:replace_per_round]:  # the oldest leave, as a volunteer closing the app
            leaving.close()
            swarm.nodes.remove(leaving)
        visitors = visitors[replace_per_round:]
        for _ in range(replace_per_round):
            visitors.append(swarm.open(config, path, initial_peers=resident.maddrs))
            joined += 1
    report.seconds = time.monotonic() - t0
    return report
