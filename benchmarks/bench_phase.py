"""Aligned rounds: peers joining at random moments average with every live holder of their
modules, their copies agree, and a slow peer does not hold fast ones back.

Eight real peers — each with its own hivemind DHT process, p2pd daemon and one averager
process per module, opened with the same `open_node` that `p2ptrain join` uses — on
127.0.0.1 in this one Python process (threads stand in for machines), two per path of
the 2×2 grid. The first creates the run; the others join at random moments spread over
two rounds' length (seeded, so both scenarios below use the same join times and paths).
Nodes open in the main thread (hivemind's averagers start only there), one at a time: a
node whose open (DHT, run record, catch-up download) outlasts the next peer's join moment
delays it, so the actual start times are printed next to the planned ones.
Every node runs rounds on the swarm's shared schedule until the round `--rounds-after`
rounds past the last join, then stops between rounds.

Two scenarios, run one after the other with the same seed:
  * staggered: every peer at full speed;
  * staggered + slow: the same, with one peer's every inner step made `--slow-delay`
    seconds slower (its `session.inner.step` is wrapped with a sleep).

What is measured (definitions also in the printed notes and the JSON):
  (a) module-rounds averaged with all live holders. For a peer p, a module m of its path
      and a round r that p reported, from p's second reported round on: the live holders
      of (m, r) are the peers whose path contains m and that reported round r themselves
      (their RoundReport for r exists: they trained in r and ran its outer step). The
      module-round is complete when the group p reports for m in r (RoundReport.modules[m]
      .group, the peers of the all-reduce, p included) contains every live holder and no
      peer that did not report round r (one averaging another round's update into it).
      Module-rounds with no other live holder are not counted (they are trivially complete).
      "strict" counts holders in their own first round as live too; "settled" does not.
  (b) holder disagreement at a common round: for every module and round, the holders that
      reported that round, their published fingerprints (node.sync, what their peer
      records carry) and their global parameters, captured as the round is reported; the
      largest pairwise max-abs difference of fingerprints and of parameters, and of the
      fingerprint difference over the agreement threshold consistency.agree uses.
  (c) the fast peers' rounds from each one's second round: seconds the outer step took
      after the round's end (averaging + fingerprint check), the wall time between
      consecutive reported rounds (the schedule's round length when no round is skipped),
      and the rounds of the schedule they skipped.

    python benchmarks/bench_phase.py [--peers 8] [--round-seconds 8] [--seed 0] [--quick]
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch  # noqa: E402

from common import (OUT_DIR, base_parser, machine_info, markdown_table, print_header, write_json,  # noqa: E402
                    write_plot)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# in join order: the first four cover the four paths, the next four double them
PATHS = ["0,0", "1,1", "0,1", "1,0"]
QUICK_PATHS = ["0,0", "1,1", "0,0", "1,1"]  # --quick: 4 peers, every module held twice


def phase_config(run_id: str, round_seconds: float, steps_per_round: int, matchmaking_time: float):
    """A run whose inner steps take well under a round (tests/swarm/conftest.py's
    swarm_config, with a step cap a slowed peer cannot reach in a round)."""
    from p2ptrain.config import RunConfig
    return RunConfig.from_dict({
        "run": {"id": run_id, "seed": 0},
        "model": {"d_model": 32, "n_heads": 2, "context": 32},
        "grid": {"levels": [2, 2], "blocks_per_level": 1, "stem": "shared"},
        "router": {"kmeans_iters": 5, "sample_docs": 500},
        "inner": {"batch_size": 4, "steps_per_round": steps_per_round, "warmup_steps": 1},
        "averaging": {"compression": "fp16", "matchmaking_time": matchmaking_time, "averaging_timeout": 30.0,
                      "round_seconds": round_seconds, "overlap": False, "fill_round": False},
    })


@dataclass
class Peer:
    index: int
    path: str
    join_offset: float  # planned: seconds after the first peer started its rounds
    slow_delay: float = 0.0
    opened: object = None
    joined_at: float | None = None  # monotonic, when its rounds started
    join_seconds: float | None = None  # open_node's duration (DHT, run record, state download)
    caught_up: list = field(default_factory=list)
    start_state: dict = field(default_factory=dict)  # after open: the schedule's round, each module's round
    reports: list = field(default_factory=list)  # one dict per reported round
    snapshots: dict = field(default_factory=dict)  # round -> module -> (fingerprint, norm, step, flat params)
    error: str | None = None

    @property
    def peer_id(self) -> str:
        return self.opened.node.peer_id

    @property
    def modules(self) -> list[str]:
        return list(self.opened.node.session.module_ids)


def my_p2pd_pids() -> set[int]:
    """p2pd daemons descended from this process (the ones this benchmark started)."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        names[int(entry)] = name
    me, out = os.getpid(), set()
    for pid, name in names.items():
        if name != "p2pd":
            continue
        p = pid
        while p > 1 and p in parent:
            p = parent[p]
            if p == me:
                out.add(pid)
                break
    return out


class Scenario:
    """One swarm: peers open at their join offsets, run until the stop round, then close."""

    def __init__(self, name: str, config, peers: list[Peer], docs, workdir: Path, rounds_after: int,
                 timeout_s: float):
        self.name, self.config, self.peers, self.docs = name, config, peers, docs
        self.workdir, self.rounds_after, self.timeout_s = workdir, rounds_after, timeout_s
        self.stop_round: int | None = None
        self.t0: float | None = None
        self.p2pd_seen: set[int] = set()

    # ------------------------------------------------------------ one peer's life

    def on_round(self, peer: Peer, report) -> None:
        node = peer.opened.node
        entry = {"round": report.round, "t": time.monotonic(), "tokens": report.tokens,
                 "seconds_inner": report.seconds_inner, "seconds_outer": report.seconds_outer,
                 "seconds_wall": report.seconds_wall, "loss": report.loss,
                 "groups": {m: sorted(r.group) for m, r in report.modules.items()},
                 "outcomes": {m: r.outcome for m, r in report.modules.items()},
                 "resynced": {m: r.resynced_from for m, r in report.modules.items() if r.resynced_from}}
        peer.reports.append(entry)
        snap = {}
        for module_id, slot in node.slots.items():
            with slot.lock:
                flat = torch.cat([p.detach().flatten() for p in slot.outer.global_params]).clone()
            sync = node.sync[module_id]
            snap[module_id] = (tuple(sync.fingerprint), sync.norm, sync.step, sync.round, flat)
        peer.snapshots[report.round] = snap
        if self.stop_round is not None and report.round >= self.stop_round:
            node.stop_requested.set()

    def open(self, peer: Peer) -> None:
        """Open a peer's node (in the main thread: hivemind's averagers start only there)."""
        from p2ptrain.swarm.join import JoinOptions, open_node
        t = time.monotonic()
        first = self.peers[0]
        options = JoinOptions(initial_peers=first.opened.maddrs if peer.index else (), new_swarm=peer.index == 0,
                              host_maddrs=LOOPBACK, path=peer.path, run_config=self.config, device="cpu")
        peer.opened = open_node(options, self.workdir / f"{self.name}-peer{peer.index}", lambda: self.docs)
        peer.join_seconds = time.monotonic() - t
        self.p2pd_seen |= my_p2pd_pids()
        peer.caught_up = sorted(peer.opened.caught_up)
        node = peer.opened.node
        peer.start_state = {"schedule_round": node.schedule.current_round(),
                            "module_rounds": {m: slot.round for m, slot in node.slots.items()}}
        if peer.slow_delay:
            step = peer.opened.node.session.inner.step

            def slow_step(*args, **kwargs):
                time.sleep(peer.slow_delay)
                return step(*args, **kwargs)

            peer.opened.node.session.inner.step = slow_step

    def live(self, peer: Peer) -> None:
        """A peer's rounds (on its own thread, as on its own machine)."""
        try:
            peer.opened.node.run(on_round=lambda report: self.on_round(peer, report))
        except BaseException as e:  # reported in the results; the other peers go on
            peer.error = repr(e)[:300]
            logging.getLogger("bench_phase").exception("peer %d failed", peer.index)

    def run(self) -> dict:
        """Open each peer at its join offset and start its rounds; stop everyone after
        rounds_after rounds past the moment the last one started."""
        threads: list[threading.Thread] = []
        deadline = time.monotonic() + self.timeout_s
        timed_out: list[int] = []
        try:
            for peer in self.peers:
                if self.t0 is not None:
                    time.sleep(max(self.t0 + peer.join_offset - time.monotonic(), 0.0))
                try:
                    self.open(peer)
                except Exception as e:
                    peer.error = repr(e)[:300]
                    logging.getLogger("bench_phase").exception("peer %d could not join", peer.index)
                    if peer.index == 0:
                        break
                    continue
                peer.joined_at = time.monotonic()
                if peer.index == 0:
                    self.t0 = peer.joined_at
                thread = threading.Thread(target=self.live, args=(peer,), name=f"peer{peer.index}", daemon=True)
                thread.start()
                threads.append(thread)
            if self.peers[0].opened is not None:
                self.stop_round = self.peers[0].opened.node.schedule.current_round() + self.rounds_after
            for t in threads:
                t.join(max(deadline - time.monotonic(), 1.0))
            timed_out = [int(t.name[4:]) for t in threads if t.is_alive()]
            for p in self.peers:
                if p.opened is not None:
                    p.opened.node.stop_requested.set()
            for t in threads:
                t.join(60)
        finally:
            self.close()
        return {"timed_out": timed_out, "stop_round": self.stop_round}

    def close(self) -> None:
        for p in reversed(self.peers):
            if p.opened is not None:
                try:
                    p.opened.close()
                except Exception as e:
                    logging.getLogger("bench_phase").warning("closing peer %d: %r", p.index, e)
        # every p2pd this scenario started must be gone
        left = set()
        for _ in range(40):
            left = self.p2pd_seen & my_p2pd_pids()
            if not left:
                break
            time.sleep(0.25)
        self.p2pd_left = sorted(left)
        for pid in left:  # ours, by pid: reported, then ended
            try:
                os.kill(pid, 9)
            except OSError:
                pass


# ------------------------------------------------------------------ the measures

def measure_completeness(peers: list[Peer]) -> dict:
    """(a): see the module docstring. A group must hold every live holder of (m, r) and
    nobody else: a member that did not report round r (it averaged another round's update
    into this one) makes the module-round incomplete too."""
    by_round: dict[int, dict[str, Peer]] = {}
    for p in peers:
        for e in p.reports:
            by_round.setdefault(e["round"], {})[p.peer_id] = p
    first_round = {p.peer_id: p.reports[0]["round"] for p in peers if p.reports}
    counts = {"strict": [0, 0], "settled": [0, 0]}  # [complete, counted]
    lone, foreign, other_round, misses = 0, 0, 0, []
    all_holders = {m: {q.peer_id for q in peers if m in q.modules} for p in peers for m in p.modules}
    for p in peers:
        for e in p.reports[1:]:
            r = e["round"]
            for m in p.modules:
                holders = {q for q, peer in by_round[r].items() if m in peer.modules}
                group = set(e["groups"].get(m, []))
                foreign += bool(group - all_holders[m])
                other_round += bool(group - holders)
                if len(holders) < 2:
                    lone += 1
                    continue
                for kind in counts:
                    live = holders if kind == "strict" else {q for q in holders
                                                             if first_round[q] < r or q == p.peer_id}
                    if len(live) < 2:
                        continue
                    counts[kind][1] += 1
                    if live <= group <= holders:
                        counts[kind][0] += 1
                    elif kind == "strict":
                        misses.append({"peer": p.index, "round": r, "module": m, "group": len(group),
                                       "live": len(live), "missing": len(live - group),
                                       "from_other_rounds": len(group - holders), "outcome": e["outcomes"].get(m)})
    out = {kind: {"complete": c, "counted": n, "fraction": c / n if n else float("nan")}
           for kind, (c, n) in counts.items()}
    out.update(lone_module_rounds=lone, groups_with_non_holders=foreign, groups_with_other_round_members=other_round,
               misses=misses)
    return out


def measure_agreement(peers: list[Peer], codec_tolerance: float) -> dict:
    """(b): see the module docstring."""
    from p2ptrain.swarm.consistency import DRIFT_ROUNDS, FP32_ROUNDOFF
    rounds = sorted({r for p in peers for r in p.snapshots})
    worst = {"fingerprint": (0.0, None), "param": (0.0, None), "ratio": (0.0, None)}
    compared = 0
    ratio_at: dict[tuple[int, str], float] = {}  # (round, module) → its copies' worst ratio
    for r in rounds:
        for m in sorted({m for p in peers for m in p.modules}):
            copies = [(p.index, p.snapshots[r][m]) for p in peers if r in p.snapshots and m in p.snapshots[r]]
            if len(copies) < 2:
                continue
            compared += 1
            stacked = torch.stack([c[1][4] for c in copies])
            param = (stacked.max(0).values - stacked.min(0).values).max().item()
            if param > worst["param"][0]:
                worst["param"] = (param, {"round": r, "module": m, "holders": len(copies)})
            for (i, a), (j, b) in combinations(copies, 2):
                fp = max(abs(x - y) for x, y in zip(a[0], b[0]))
                allowed = DRIFT_ROUNDS * codec_tolerance * max(a[2], b[2]) + FP32_ROUNDOFF * max(a[1], b[1])
                ratio = fp / allowed if allowed > 0 else float("inf")
                ratio_at[(r, m)] = max(ratio_at.get((r, m), 0.0), ratio)
                where = {"round": r, "module": m, "peers": [i, j], "sync_rounds": [a[3], b[3]]}
                if fp > worst["fingerprint"][0]:
                    worst["fingerprint"] = (fp, where)
                if ratio > worst["ratio"][0]:
                    worst["ratio"] = (ratio, where)
    # did copies that came apart come back together? each module at the last round 2+ holders reported
    last_round = {m: r for r, m in sorted(ratio_at)}
    return {"module_rounds_compared": compared,
            "module_rounds_apart": sum(ratio > 1.0 for ratio in ratio_at.values()),
            "last_round_ratio": {m: ratio_at[(r, m)] for m, r in last_round.items()},
            "last_round": last_round,
            **{f"max_{k}": v for k, (v, _) in worst.items()}, **{f"max_{k}_at": w for k, (_, w) in worst.items()}}


def measure_rounds(peers: list[Peer], fast: bool) -> dict:
    """(c) for the fast peers (fast=True) or the slowed one: from each peer's second round."""
    outer, period, skipped, spanned, tokens = [], [], 0, 0, []
    for p in peers:
        if (p.slow_delay == 0) != fast or len(p.reports) < 2:
            continue
        steady = p.reports[1:]
        outer += [e["seconds_outer"] for e in steady]
        tokens += [e["tokens"] for e in steady]
        period += [b["t"] - a["t"] for a, b in zip(p.reports, p.reports[1:])]
        spanned += steady[-1]["round"] - p.reports[0]["round"]
        skipped += steady[-1]["round"] - p.reports[0]["round"] - len(steady)
    if not outer:
        return {}
    return {"peer_rounds": len(outer), "outer_median_s": statistics.median(outer), "outer_max_s": max(outer),
            "period_median_s": statistics.median(period), "period_max_s": max(period),
            "skipped_rounds": skipped, "scheduled_rounds": spanned, "tokens_median": statistics.median(tokens)}


def measure_stale_bases(peers: list[Peer]) -> dict:
    """Module-rounds a peer trained from an outdated global state: its module's state came
    from round b (after its catch-up download for its first round, else its previous
    reported round), yet another holder of the module had reported a round between b and
    this one. Such a peer's update is averaged onto a different base than the others'."""
    reported = {p.peer_id: {e["round"] for e in p.reports} for p in peers}
    stale = []
    for p in peers:
        base = dict(p.start_state.get("module_rounds", {}))
        for e in p.reports:
            r = e["round"]
            for m in p.modules:
                b = base.get(m, 0)
                newer = [q.index for q in peers if q is not p and m in q.modules
                         and any(b < x < r for x in reported[q.peer_id])]
                if newer:
                    stale.append({"peer": p.index, "round": r, "module": m, "base_round": b, "newer_at": newer})
                base[m] = r
    return {"count": len(stale), "cases": stale}


def summarize(scenario: Scenario, result: dict, codec_tolerance: float) -> dict:
    peers = [p for p in scenario.peers if p.opened is not None and p.reports]
    outcomes: dict[str, int] = {}
    for p in peers:
        for e in p.reports:
            for o in e["outcomes"].values():
                outcomes[o] = outcomes.get(o, 0) + 1
    return {
        "scenario": scenario.name, **result, "p2pd_left": scenario.p2pd_left,
        "peers": [{"index": p.index, "path": p.path, "join_offset_s": p.join_offset, "slow_delay_s": p.slow_delay,
                   "joined_after_s": (p.joined_at - scenario.t0) if p.joined_at and scenario.t0 else None,
                   "join_seconds": p.join_seconds, "caught_up": p.caught_up, "start_state": p.start_state,
                   "error": p.error,
                   "rounds": [{k: v for k, v in e.items() if k != "t"} for e in p.reports]}
                  for p in scenario.peers],
        "completeness": measure_completeness(peers),
        "agreement": measure_agreement(peers, codec_tolerance),
        "stale_bases": measure_stale_bases(peers),
        "fast": measure_rounds(peers, fast=True),
        "slow": measure_rounds(peers, fast=False),
        "outcomes": outcomes,
        "resyncs": sum(len(e["resynced"]) for p in peers for e in p.reports),
    }


# ------------------------------------------------------------------ output

def table(runs: list[dict]) -> str:
    def fmt(run: dict, key: str) -> str:
        c, a, f, s = run["completeness"], run["agreement"], run["fast"], run["slow"]
        if key == "a_strict":
            return f"**{c['strict']['fraction']:.3f}** ({c['strict']['complete']}/{c['strict']['counted']})"
        if key == "a_settled":
            return f"{c['settled']['fraction']:.3f} ({c['settled']['complete']}/{c['settled']['counted']})"
        if key == "b_param":
            at = a["max_param_at"] or {}
            return f"{a['max_param']:.2e} ({at.get('module')} r{at.get('round')})"
        if key == "b_fp":
            return f"{a['max_fingerprint']:.2e}"
        if key == "b_ratio":
            return f"{a['max_ratio']:.3f}"
        if key == "b_apart":
            return f"{a['module_rounds_apart']} of {a['module_rounds_compared']}"
        if key == "b_last":
            worst = max(a["last_round_ratio"].items(), key=lambda kv: kv[1], default=(None, 0.0))
            return f"{worst[1]:.3f} ({worst[0]} r{a['last_round'].get(worst[0])})"
        if key == "outer":
            return f"{f['outer_median_s']:.2f} / {f['outer_max_s']:.2f} s" if f else "-"
        if key == "period":
            return f"{f['period_median_s']:.2f} / {f['period_max_s']:.2f} s" if f else "-"
        if key == "skipped":
            return f"{f['skipped_rounds']} of {f['scheduled_rounds']}" if f else "-"
        if key == "tokens":
            fast = f"{f['tokens_median']:,.0f}" if f else "-"
            return fast + (f" (slow peer {s['tokens_median']:,.0f})" if s else "")
        if key == "other_round":
            return str(c["groups_with_other_round_members"])
        if key == "stale":
            return str(run["stale_bases"]["count"])
        if key == "joins":
            return ", ".join(f"{p['joined_after_s']:.0f}" if p["joined_after_s"] is not None else "0"
                             for p in run["peers"])
        if key == "resync":
            return f"{run['resyncs']}; outcomes {', '.join(f'{k} {v}' for k, v in sorted(run['outcomes'].items()))}"
        raise KeyError(key)

    rows = [
        ("rounds started, s after the first peer's (opening a node, catch-up included, takes seconds: "
         "nodes open one at a time)", "joins"),
        ("(a) module-rounds averaged with all live holders, from each peer's 2nd round", "a_strict"),
        ("(a') same, holders in their own 1st round not counted as live", "a_settled"),
        ("module-rounds whose group held a peer that did not report that round", "other_round"),
        ("module-rounds trained from a stale base (another holder had moved on)", "stale"),
        ("(b) largest parameter difference (max abs) between holders at a common round", "b_param"),
        ("(b) largest fingerprint difference (max abs of 8 projections)", "b_fp"),
        ("(b) … over the agreement threshold (≤ 1: agree)", "b_ratio"),
        ("(b) module-rounds whose copies were apart (over the threshold)", "b_apart"),
        ("(b) at each module's last common round, worst copy difference over the threshold", "b_last"),
        ("(c) fast peers: outer step after the round's end, median / max", "outer"),
        ("(c) fast peers: wall between consecutive rounds, median / max", "period"),
        ("(c) fast peers: schedule rounds skipped", "skipped"),
        ("tokens per round, median (fast peers)", "tokens"),
        ("re-syncs; module-round outcomes (all rounds)", "resync"),
    ]
    return markdown_table(["quantity"] + [r["scenario"] for r in runs],
                          [[label] + [fmt(r, key) for r in runs] for label, key in rows])


OUTCOME_COLORS = {"ok": "tab:green", "alone": "tab:gray", "partial": "tab:orange", "resynced": "tab:blue",
                  "split": "tab:red", "healed": "tab:pink", "rejected": "black", "failed": "black"}
OUTCOME_ORDER = ["failed", "rejected", "split", "healed", "resynced", "partial", "alone", "ok"]


def draw_timeline(runs: list[dict]):
    """One panel per scenario: a dot per peer and reported round, colored by the worst
    module outcome of that round (a gap is a round the peer skipped)."""
    def draw(plt):
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 + 0.35 * len(runs[0]["peers"]) * len(runs)),
                                 squeeze=False)
        for ax, run in zip(axes[:, 0], runs):
            for p in run["peers"]:
                for e in p["rounds"]:
                    worst = min(e["outcomes"].values(), key=OUTCOME_ORDER.index, default="ok")
                    ax.scatter(e["round"], p["index"], color=OUTCOME_COLORS.get(worst, "black"), s=40)
            ax.set(title=run["scenario"], xlabel="round of the swarm's schedule", ylabel="peer (join order)")
            ax.invert_yaxis()
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in OUTCOME_COLORS.items()
                   if k not in ("rejected",)]
        fig.legend(handles=handles, fontsize=8, ncol=len(handles), loc="upper center")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        return fig
    return draw


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="4 peers, 6 s rounds, 3 rounds after the last join "
                                                             "(about two minutes)")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--round-seconds", type=float, default=8.0)
    parser.add_argument("--steps-per-round", type=int, default=30, help="inner.steps_per_round: the step cap")
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--rounds-after", type=int, default=8, help="rounds every peer runs after the last join")
    parser.add_argument("--slow-delay", type=float, default=0.5, help="seconds added to each step of the slow peer")
    parser.add_argument("--seed", type=int, default=0, help="join times")
    parser.add_argument("--only", choices=("staggered", "slow"), default=None, help="run one scenario only")
    args = parser.parse_args()
    if args.quick:
        args.peers, args.round_seconds, args.rounds_after = 4, 6.0, 3
    mp.set_start_method("fork", force=True)
    OUT_DIR.mkdir(exist_ok=True)
    logging.basicConfig(filename=OUT_DIR / "bench_phase.log", filemode="w", level=logging.INFO,
                        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "asyncio", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    info = machine_info()

    from p2ptrain.data.corpus import load_documents
    from p2ptrain.swarm.averaging import sync_tolerance
    docs = load_documents(None, 4096)
    rng = random.Random(args.seed)
    span = 2 * args.round_seconds
    offsets = [0.0] + sorted(rng.uniform(0, span) for _ in range(args.peers - 1))
    paths = (QUICK_PATHS if args.quick else PATHS * (args.peers // 4 + 1))[:args.peers]
    slow_index = 1  # the second peer to join: present in (almost) every round
    scenarios = [("staggered", 0.0), ("staggered + slow peer", args.slow_delay)]
    if args.only:
        scenarios = scenarios[:1] if args.only == "staggered" else scenarios[1:]
    runs = []
    with tempfile.TemporaryDirectory(prefix="p2ptrain-phase-") as tmp:
        for k, (name, delay) in enumerate(scenarios):
            config = phase_config(f"phase-{k}-{os.getpid()}", args.round_seconds, args.steps_per_round,
                                  args.matchmaking_time)
            peers = [Peer(i, paths[i], offsets[i], slow_delay=delay if i == slow_index else 0.0)
                     for i in range(args.peers)]
            print(f"scenario {name}: {args.peers} peers joining at "
                  f"{', '.join(f'{o:.1f}' for o in offsets)} s", flush=True)
            timeout = 120 + span + (args.rounds_after + 4) * args.round_seconds * 2
            scenario = Scenario(name, config, peers, docs, Path(tmp), args.rounds_after, timeout)
            t = time.monotonic()
            result = scenario.run()
            result["seconds"] = time.monotonic() - t
            result["load_average_after"] = list(os.getloadavg())
            runs.append(summarize(scenario, result, sync_tolerance("fp16", 0.0)))
            print(f"  done in {result['seconds']:.0f} s; p2pd left behind: {len(scenario.p2pd_left)}", flush=True)
    leftover = my_p2pd_pids()
    print_header("Aligned rounds: staggered joins, holder agreement, a slow peer", info, [
        f"{args.peers} real peers (own DHT, p2pd, one averager per module) in one process on 127.0.0.1, "
        f"paths {', '.join(paths)} in join order; the first creates the run, the others join at seeded random "
        f"moments over two rounds ({span:.0f} s) after it starts: "
        f"{', '.join(f'{o:.1f}' for o in offsets)} s (seed {args.seed})",
        f"run: d_model 32, 2x2 grid, shared stem, fp16 wire, round_seconds {args.round_seconds:g}, at most "
        f"{args.steps_per_round} steps per round, matchmaking {args.matchmaking_time:g} s; every peer stops after "
        f"the round {args.rounds_after} rounds past the moment all had joined",
        f"slow peer: peer {slow_index} (path {paths[slow_index]}), +{args.slow_delay:g} s per inner step",
        "(a) for each peer p, module m of its path and round r it reported, from p's second reported round: "
        "live holders = peers whose path holds m and that reported round r; complete when p's reported group "
        "for (m, r) contains all of them and no peer that did not report round r; module-rounds with no other "
        "live holder are not counted",
        "(b) over every module and round held by 2+ peers that reported it: the copies' global parameters and "
        "published fingerprints as captured when each reported the round; agreement threshold as "
        "consistency.agree (20 rounds of fp16 wire error × the last update's norm + fp32 round-off)",
        "(c) fast peers = all but the slowed one; outer = RoundReport.seconds_outer (averaging + fingerprint "
        "check after the round's end); wall between consecutive reported rounds; skipped = schedule rounds "
        "between a peer's first and last report that it did not report",
        f"p2pd daemons started here and still running at the end: {len(leftover)}"])
    print(table(runs))
    print()
    for run in runs:
        misses = run["completeness"]["misses"]
        if misses:
            print(f"{run['scenario']}: incomplete module-rounds (strict): "
                  + "; ".join(f"peer {m['peer']} r{m['round']} {m['module']} {m['group']}/{m['live']} "
                              f"({m['outcome']})" for m in misses[:12]) + (" …" if len(misses) > 12 else ""))
        errors = [p for p in run["peers"] if p["error"]]
        for p in errors:
            print(f"{run['scenario']}: peer {p['index']} failed: {p['error']}")
        if run["timed_out"]:
            print(f"{run['scenario']}: peers {run['timed_out']} did not finish in time")
    path = write_json("bench_phase", {"machine": info, "args": vars(args), "runs": runs,
                                      "p2pd_left_at_exit": sorted(leftover)})
    png = write_plot("bench_phase", draw_timeline(runs))
    print(f"({path.relative_to(OUT_DIR.parent)}{f', {png.relative_to(OUT_DIR.parent)}' if png else ''}; "
          "log: bench-out/bench_phase.log)")
    if leftover:
        sys.exit(1)


if __name__ == "__main__":
    main()
