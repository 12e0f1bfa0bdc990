"""How long an all-reduce waits for a member's next chunk, on links shaped with tc.

hivemind leaves a member's slice un-averaged when its next chunk does not come within the
sender timeout (twice that for a reducer's averages). p2ptrain sizes that timeout to the
group's slowest declared link (`join --upload-mbps`; averaging.chunk_timeout_seconds):
2 × that member's upload of its whole round (2 (n − 1) / n × its path's wire bytes over
its link), at least 2 s and at most averaging_timeout / 6 (10 s in the default preset),
which is also the timeout without declared links.

Real `p2ptrain join` processes of the default preset (fp16, plain averaging), four on the
2×2 grid, each in a network namespace of its own with a tbf-shaped link
(shaped_links.py; needs root and iproute2):

  waits     links 8 / 8 / 8 / 1 Mbit/s, declared. For every module-round averaged by all
            its holders: the slowest member's upload of its round (the rule's bound before
            its margin), the longest time any peer waited for a sender's next part and for
            a reducer's next average, the timeout, and whether anybody's slice was left out
            (partial). Does the bound hold, and does the slow honest link fit inside its
            group's timeout?
  vanished  links 8 Mbit/s each. Peer 1 is frozen (SIGSTOP on all its processes: sockets
            stay open, as when a machine loses power or its network) once its round-3
            all-reduce is under way (its uplink busy after the round's deadline), then
            killed 45 s later. The three survivors'
            all-reduce in that round, links declared (timeout sized to them) against
            undeclared (10 s), in interleaved pairs.

    python benchmarks/bench_chunk_timeout.py [--pairs 2] [--quick]
"""

from __future__ import annotations

import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_swarm import module_sizes  # noqa: E402
from common import base_parser, machine_info, markdown_table, print_header, write_outputs  # noqa: E402
from loopback_runs import probe_link_shaping, process_tree  # noqa: E402
from shaped_links import Link, ShapedNetwork  # noqa: E402

from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.demo import PATHS, launch_swarm  # noqa: E402
from p2ptrain.model.grid import Grid  # noqa: E402
from p2ptrain.swarm.averaging import CHUNK_WAIT_MARGIN, WIRE_BYTES_PER_VALUE, averaging_part_bytes  # noqa: E402

SLOW_LINKS = (8.0, 8.0, 8.0, 1.0)
EVEN_LINKS = (8.0,) * 4
VICTIM = 1
BURST_BYTES = 64 << 10  # sent within BURST_WINDOW_S: the peer is in an all-reduce
BURST_WINDOW_S = 0.5
ARMED_BY_ROUND = 2  # the peer is frozen in the averaging of the round after this one
FROZEN_S = 45.0


def bench_config(name: str, rounds: int, round_seconds: float) -> RunConfig:
    config = RunConfig.load("default")
    config.run.id = f"chunk-{name}"
    config.inner.total_rounds = rounds
    config.averaging.round_seconds = round_seconds
    return config


class Freezer:
    """Freezes every process of one peer mid all-reduce, kills them FROZEN_S later.

    Armed from the peer's round events: when its round ARMED_BY_ROUND event arrives, the
    next round's deadline on the swarm clock is that round's end (the event's arrival less
    its outer phase) plus the round length. From just before that deadline it watches the
    peer's uplink (eth0 in its namespace) and freezes the peer once it sends BURST_BYTES
    within BURST_WINDOW_S: its next averaging's all-reduce is under way."""

    def __init__(self, index: int, round_seconds: float):
        self.index, self.round_seconds = index, round_seconds
        self.armed_at: float | None = None  # monotonic: watch from then on
        self.frozen_at: float | None = None
        self.stop = threading.Event()
        self.armed = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, peers) -> None:
        self.thread = threading.Thread(target=self._watch, args=(peers[self.index],), daemon=True)
        self.thread.start()

    def on_round(self, event: dict) -> None:
        """The peer's round event, as it arrives."""
        if event["round"] == ARMED_BY_ROUND and not self.armed.is_set():
            self.armed_at = time.monotonic() - event["seconds_outer"] + self.round_seconds - 1.0
            self.armed.set()

    def _watch(self, peer) -> None:
        while not self.armed.wait(0.5):
            if self.stop.is_set() or peer.proc.poll() is not None:
                return
        self.stop.wait(max(0.0, self.armed_at - time.monotonic()))
        history: list[tuple[float, int]] = []
        while not self.stop.is_set() and peer.proc.poll() is None:
            now, sent = time.monotonic(), _eth0_sent_bytes(peer.proc.pid)
            history.append((now, sent))
            while history and history[0][0] < now - BURST_WINDOW_S:
                history.pop(0)
            if sent - history[0][1] >= BURST_BYTES:
                pids = process_tree(peer.proc.pid)
                for pid in pids:
                    _signal(pid, signal.SIGSTOP)
                self.frozen_at = time.time()
                self.stop.wait(FROZEN_S)
                for pid in pids:
                    _signal(pid, signal.SIGKILL)
                return
            time.sleep(0.05)


def _eth0_sent_bytes(pid: int) -> int:
    """Bytes sent on eth0 of the network namespace process `pid` lives in (its shaped link)."""
    try:
        for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
            name, sep, rest = line.partition(":")
            if sep and name.strip() == "eth0":
                return int(rest.split()[8])
    except OSError:
        pass
    return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_shaped(config: RunConfig, links, declared: bool, freeze: int | None = None) -> dict:
    """One swarm, a peer per path, peer i on links[i] Mbit/s each way. Returns each peer's
    round events, and with `freeze` the moment that peer was frozen."""
    events: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="p2ptrain-chunk-") as tmp, \
            ShapedNetwork([Link.symmetric(x) for x in links], declared=declared) as network:
        config_file = Path(tmp) / "run.toml"
        config_file.write_text(config.to_toml())
        peers = launch_swarm(Path(tmp) / "swarm", config_file, config.inner.total_rounds, PATHS, events,
                             network=network)
        freezer = Freezer(freeze, config.averaging.round_seconds) if freeze is not None else None
        rounds: dict[int, list[dict]] = {i: [] for i in range(len(peers))}
        try:
            if freezer is not None:
                freezer.start(peers)
            finished = 0
            while finished < len(peers):
                index, event = events.get(timeout=900)
                if event.get("event") == "round":
                    rounds[index].append(event)
                    if freezer is not None and index == freeze:
                        freezer.on_round(event)
                elif event.get("event") == "exit":
                    finished += 1
        finally:
            if freezer is not None:
                freezer.stop.set()
                freezer.thread.join(timeout=5)
            for peer in peers:
                peer.stop()
        failed = [p.index for p in peers if p.proc.returncode and p.index != freeze]
        if failed:
            raise SystemExit(f"peer(s) {failed} failed; see their peer.log under {tmp}")
        return {"rounds": rounds, "frozen_at": freezer.frozen_at if freezer else None}


def holders(paths: list[str], grid: Grid) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        for module_id in grid.modules_of(grid.parse_path(path)):
            out.setdefault(module_id, []).append(i)
    return out


def wait_rows(result: dict, config: RunConfig, links, sizes: dict[str, int]) -> list[dict]:
    """One row per module-round that every holder averaged together (rounds 2..)."""
    grid = Grid.from_config(config.grid)
    held = holders(PATHS, grid)
    path_bytes = {i: sum(sizes[m] for m in grid.modules_of(grid.parse_path(p)))
                  * WIRE_BYTES_PER_VALUE[config.averaging.compression] for i, p in enumerate(PATHS)}
    by_round: dict[tuple[str, int], list[dict]] = {}
    for i, events in result["rounds"].items():
        for event in events[1:]:
            for module_id, waits in event.get("chunk_waits_per_module", {}).items():
                if event["peers_per_module"].get(module_id) == len(held[module_id]):
                    by_round.setdefault((module_id, event["round"]), []).append(
                        dict(waits, partial=module_id in event["partial"], peer=i))
    rows = []
    for (module_id, round_), seen in sorted(by_round.items()):
        members = held[module_id]
        n = len(members)
        slowest = min(members, key=lambda i: links[i])
        # the rule's bound before its margin: the slowest member's upload of its whole round
        upload = path_bytes[slowest] * 2 * (n - 1) / n / (links[slowest] * 1e6 / 8)
        rows.append({"module": module_id, "round": round_, "group": n, "slowest_mbps": links[slowest],
                     "part_bytes": averaging_part_bytes(sizes[module_id], config.averaging.compression),
                     "slowest_upload_s": upload, "timeout_s": max(w["timeout_s"] for w in seen),
                     "sender_wait_s": max(w["sender_s"] or 0.0 for w in seen),
                     "reducer_wait_s": max(w["reducer_s"] or 0.0 for w in seen),
                     "partial": any(w["partial"] for w in seen)})
    return rows


def vanished_summary(result: dict, declared: bool) -> dict:
    """The survivors' all-reduce in the round the victim froze in (its last round + 1)."""
    victim_rounds = [e["round"] for e in result["rounds"][VICTIM]]
    frozen_round = (max(victim_rounds) if victim_rounds else 0) + 1
    allreduce, outer, timeouts, partial = [], [], [], []
    for i, events in result["rounds"].items():
        if i == VICTIM:
            continue
        for event in events:
            if event["round"] == frozen_round:
                allreduce.append(max(event["seconds_allreduce_per_module"].values(), default=0.0))
                outer.append(event["seconds_outer"])
                timeouts += [w["timeout_s"] for w in event.get("chunk_waits_per_module", {}).values()]
                partial.append(bool(event["partial"]))
    steady = [max(e["seconds_allreduce_per_module"].values(), default=0.0)
              for i, events in result["rounds"].items() if i != VICTIM
              for e in events[1:] if e["round"] != frozen_round]
    return {"declared": declared, "frozen_round": frozen_round, "survivors_seen": len(allreduce),
            "allreduce_s": statistics.median(allreduce) if allreduce else None,
            "outer_s": statistics.median(outer) if outer else None,
            "steady_allreduce_s": statistics.median(steady) if steady else None,
            "timeout_s": max(timeouts) if timeouts else None, "partial_survivors": sum(partial)}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], quick_help="the waits run only, 3 rounds", threads=False)
    parser.add_argument("--pairs", type=int, default=2, help="declared/undeclared pairs of the vanished run")
    parser.add_argument("--only", choices=("waits", "vanished"), default=None, help="run one part only")
    args = parser.parse_args()
    failed_steps = [s for s in probe_link_shaping() if s["rc"] != 0 and "netem" not in s["command"]]
    if failed_steps:
        print(f"skipped: this machine does not let a benchmark shape links ({failed_steps[0]['command']}: "
              f"{failed_steps[0]['error'] or 'failed'}); it needs root and iproute2")
        return
    info = machine_info()
    sizes = module_sizes(bench_config("sizes", 1, 45.0))
    waits_by = {}
    for declared in (() if args.only == "vanished" else (True,) if args.quick else (True, False)):
        config = bench_config(f"waits-{int(declared)}", 3 if args.quick else 6, 45.0)
        waits_by[declared] = wait_rows(run_shaped(config, SLOW_LINKS, declared=declared), config, SLOW_LINKS, sizes)
    waits = waits_by.get(True, [])
    vanished = []
    for pair in range(0 if args.quick or args.only == "waits" else args.pairs):
        for declared in (True, False):
            result = run_shaped(bench_config(f"vanished-{pair}-{int(declared)}", 5, 30.0), EVEN_LINKS, declared,
                                freeze=VICTIM)
            vanished.append(dict(vanished_summary(result, declared), pair=pair))

    print_header("Chunk timeouts on shaped links", info, [
        "4 `p2ptrain join` processes, default preset (fp16, plain averaging), one per path of the 2×2 grid, "
        "each in its own network namespace with a tbf-shaped link (benchmarks/shaped_links.py)",
        "slowest upload: the group's slowest member's upload of its round, 2 (n − 1) / n × its path's wire "
        f"bytes over its link; the chunk timeout is {CHUNK_WAIT_MARGIN:g}× that, at least 2 s and at most "
        "averaging_timeout / 6 (a reducer's: twice the chunk timeout)",
        "waits: every module-round from round 2 that all the module's holders averaged together; the longest "
        "wait any holder had for a sender's next part / a reducer's next average (a wait a timeout ended "
        "counts until then)"])
    if waits:
        print(f"Waits, links {' / '.join(f'{x:g}' for x in SLOW_LINKS)} Mbit/s, declared:\n")
        print(markdown_table(
            ["module", "round", "group", "slowest link", "part", "slowest upload", "longest sender wait",
             "longest reducer wait", "chunk timeout", "someone left out"],
            [[r["module"], r["round"], r["group"], f"{r['slowest_mbps']:g} Mbit/s",
              f"{r['part_bytes'] / 1e3:.1f} kB", f"{r['slowest_upload_s']:.1f} s", f"{r['sender_wait_s']:.2f} s",
              f"{r['reducer_wait_s']:.2f} s", f"{r['timeout_s']:.1f} s", "yes" if r["partial"] else "no"]
             for r in waits]))
        sender = [r["sender_wait_s"] / r["slowest_upload_s"] for r in waits]
        reducer = [r["reducer_wait_s"] / r["slowest_upload_s"] for r in waits]
        print(f"\nlongest wait ÷ slowest upload, max over module-rounds: sender {max(sender):.2f}, reducer "
              f"{max(reducer):.2f} (timeouts: {CHUNK_WAIT_MARGIN:g}× and {2 * CHUNK_WAIT_MARGIN:g}×); module-rounds "
              f"with someone left out: {sum(r['partial'] for r in waits)} of {len(waits)}")
    if False in waits_by:
        print("\nThe same links, declared and not (undeclared: every chunk timeout averaging_timeout / 6):\n")
        print(markdown_table(
            ["links", "module-rounds", "with someone left out", "longest sender wait", "longest reducer wait",
             "chunk timeouts"],
            [["declared" if declared else "not declared", len(rows), sum(r["partial"] for r in rows),
              f"{max((r['sender_wait_s'] for r in rows), default=0):.2f} s",
              f"{max((r['reducer_wait_s'] for r in rows), default=0):.2f} s",
              " / ".join(f"{t:.1f}" for t in sorted({round(r['timeout_s'], 1) for r in rows})) + " s"]
             for declared, rows in waits_by.items()]))
    if vanished:
        print(f"\nA member vanishing mid all-reduce, links {EVEN_LINKS[0]:g} Mbit/s each (peer {VICTIM} frozen, "
              f"killed {FROZEN_S:.0f} s later): the survivors' round\n")
        print(markdown_table(
            ["pair", "links", "chunk timeout", "all-reduce that round (median survivor)", "outer phase that round",
             "all-reduce in the other rounds (median)", "survivors with a partial module"],
            [[v["pair"], "declared" if v["declared"] else "not declared",
              f"{v['timeout_s']:.1f} s" if v["timeout_s"] is not None else "—",
              f"{v['allreduce_s']:.1f} s" if v["allreduce_s"] is not None else "—",
              f"{v['outer_s']:.1f} s" if v["outer_s"] is not None else "—",
              f"{v['steady_allreduce_s']:.1f} s" if v["steady_allreduce_s"] is not None else "—",
              f"{v['partial_survivors']} of {v['survivors_seen']}"] for v in vanished]))
    write_outputs(__file__, {"info": info, "waits": waits, "waits_undeclared": waits_by.get(False, []),
                             "vanished": vanished,
                             "links": {"waits": SLOW_LINKS, "vanished": EVEN_LINKS}})


if __name__ == "__main__":
    main()
