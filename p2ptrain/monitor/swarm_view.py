"""The swarm as its signed DHT records describe it: live peers, module coverage, swarm
speed, the outcomes of the peers' last rounds, and (for `monitor`) what the reachability
probe found. A pure function of the records, so `peers`, `monitor` and a node's own
dashboard all show the same thing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from p2ptrain.model.grid import Grid, path_name
from p2ptrain.swarm.records import ROUND_OUTCOMES, PeerRecord


@dataclass
class ProbeResult:
    """One dial of a peer's announced addresses from the monitor (see monitor.probe)."""

    peer_id: str
    reachable: bool
    seconds: float  # how long the dial took (or the timeout)
    checked_at: float  # unix time
    error: Optional[str] = None
    address: Optional[str] = None  # the announced address that answered


@dataclass
class PeerRow:
    peer_id: str
    short_id: str
    path: str
    round: int
    loss: Optional[float]
    tokens_per_s: float
    tokens: int  # contributed in its current session
    version: str
    reachability: str  # what the peer says: public | relay | client
    probe: Optional[str]  # what the monitor's dial found: reachable | unreachable | None (not probed)
    suspended: list[str]
    hardware: str
    age_s: float  # since the peer last published its record
    last_round: dict[str, str]  # module -> outcome of the peer's last round
    maddrs: list[str] = field(default_factory=list)
    # what the peer's home contributed since install, from its ledger: {"tokens", "rounds",
    # "rounds_averaged", "hours"}; None when its record does not say (no ledger, older version)
    since_install: Optional[dict] = None


@dataclass
class BootstrapState:
    address: str
    state: str  # reachable | unreachable | unknown
    error: Optional[str] = None


@dataclass
class SwarmView:
    run_id: str
    run_found: bool
    levels: list[int]
    modules: list[str]
    peers: list[PeerRow]
    coverage: dict[str, int]  # module -> live peers holding it
    tokens_per_s: float  # sum over live, unsuspended peers
    outcomes: dict[str, int]  # outcome -> modules with that outcome in the peers' last rounds
    outcomes_from: int  # peers whose records report their last round (older peers don't)
    bootstrap: list[BootstrapState]
    taken_at: float
    run_problem: Optional[str] = None  # why the run record could not be used (e.g. two creators)
    creator: Optional[str] = None  # peer id of the run's creator

    @property
    def uncovered(self) -> list[str]:
        return [m for m, n in self.coverage.items() if n == 0]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["uncovered"] = self.uncovered
        return out


def short_id(peer_id: str) -> str:
    return "…" + peer_id[-8:]


def reachability_of(record: PeerRecord) -> str:
    """public (accepts connections), relay (client mode, reachable through a relay), client."""
    if record.reachability == "public":
        return "public"
    if any("/p2p-circuit" in addr for addr in record.maddrs):
        return "relay"
    return "client"


def hardware_text(record: PeerRecord) -> str:
    info = record.hardware_info
    if info is None:
        return record.hardware
    ram = f"{info.ram_bytes / 2 ** 30:.0f}G"
    if info.gpu:
        gpu_mem = f" {info.gpu_memory_bytes / 2 ** 30:.0f}G" if info.gpu_memory_bytes else ""
        return f"{info.gpu}{gpu_mem}, {info.cpu_count} CPU, {ram} RAM"
    return f"{info.cpu_count}× {info.cpu}, {ram} RAM"


def build_view(run_id: str, grid: Optional[Grid], records: Iterable[PeerRecord], *,
               probes: Optional[Mapping[str, ProbeResult]] = None,
               bootstrap: Sequence[BootstrapState] = (), now: Optional[float] = None,
               run_problem: Optional[str] = None, creator: Optional[str] = None) -> SwarmView:
    """The swarm view of `records` (already signature- and schema-checked by the DHT)."""
    now = time.time() if now is None else now
    probes = probes or {}
    modules = grid.all_modules() if grid is not None else []
    coverage = {m: 0 for m in modules}
    outcomes = {o: 0 for o in ROUND_OUTCOMES}
    rows, speed, reporting = [], 0.0, 0
    newest: dict[str, PeerRecord] = {}
    for record in records:  # one row per peer: a restarted peer's older record may linger
        if record.peer_id not in newest or record.time > newest[record.peer_id].time:
            newest[record.peer_id] = record
    for record in newest.values():
        if grid is not None:
            try:
                for module in grid.modules_of(tuple(record.path)):
                    coverage[module] += 1
            except Exception:  # a record for another grid shape: shown, not counted
                pass
        suspended = list(record.suspended) or ([record.paused] if record.paused else [])
        if not suspended:
            speed += record.tokens_per_s
        reporting += bool(record.last_round)
        for entry in record.last_round:
            if entry.outcome in outcomes:
                outcomes[entry.outcome] += 1
        probe = probes.get(record.peer_id)
        rows.append(PeerRow(
            peer_id=record.peer_id, short_id=short_id(record.peer_id), path=path_name(record.path),
            round=record.round, loss=record.loss, tokens_per_s=record.tokens_per_s,
            tokens=record.contribution.tokens if record.contribution else record.tokens,
            version=record.version, reachability=reachability_of(record),
            probe=None if probe is None else ("reachable" if probe.reachable else "unreachable"),
            suspended=suspended, hardware=hardware_text(record), age_s=round(max(now - record.time, 0.0), 1),
            last_round={e.module: e.outcome for e in record.last_round}, maddrs=list(record.maddrs),
            since_install=record.since_install.dict() if record.since_install is not None else None))
    rows.sort(key=lambda r: (r.path, r.peer_id))
    return SwarmView(run_id=run_id, run_found=grid is not None, levels=list(grid.levels) if grid else [],
                     modules=modules, peers=rows, coverage=coverage, tokens_per_s=speed, outcomes=outcomes,
                     outcomes_from=reporting, bootstrap=list(bootstrap), taken_at=now,
                     run_problem=run_problem, creator=creator)


# ------------------------------------------------------------------ text

def format_view(view: SwarmView) -> str:
    """The `peers` table: one row per live peer, then every suspended peer's reasons in full,
    what each peer contributed since install, coverage, speed, outcomes, bootstrap."""
    lines = []
    if view.run_problem:
        lines.append(f"run {view.run_id}: {view.run_problem}")
    elif not view.run_found:
        lines.append(f"run {view.run_id}: no run record found on the DHT")
    lines.append(f"{len(view.peers)} live peers of run {view.run_id}")
    lines.append(f"{'peer':<10}{'path':<7}{'round':>6}{'loss':>8}{'tok/s':>9}  {'version':<8}{'reach':<12}"
                 f"{'state':<12}{'tokens':>12}{'seen':>6}  hardware")
    for r in view.peers:
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        reach = r.reachability if r.probe is None else f"{r.reachability}:{'ok' if r.probe == 'reachable' else 'NO'}"
        state = "suspended" if r.suspended else "training"
        lines.append(f"{r.short_id:<10}{r.path:<7}{r.round:>6}{loss:>8}{r.tokens_per_s:>9,.0f}  {r.version[:7]:<8}"
                     f"{reach:<12}{state:<12}{r.tokens:>12,}{r.age_s:>5.0f}s  {r.hardware[:40]}")
    for r in view.peers:
        if r.suspended:  # BOINC's words, never cut: `suspended — on batteries, user active`
            lines.append(f"{r.short_id} suspended — {', '.join(r.suspended)}")
    ledgers = [r for r in view.peers if r.since_install is not None]
    if ledgers:
        lines.append("contributed since install:")
        lines.append(f"{'peer':<10}{'tokens':>16}{'rounds':>8}{'averaged':>10}{'hours':>9}")
        for r in ledgers:
            c = r.since_install
            lines.append(f"{r.short_id:<10}{c['tokens']:>16,}{c['rounds']:>8,}{c['rounds_averaged']:>10,}"
                         f"{c['hours']:>9.1f}")
    if view.coverage:
        lines.append("coverage: " + "  ".join(f"{m}:{n}" for m, n in view.coverage.items())
                     + (f"   (uncovered: {', '.join(view.uncovered)})" if view.uncovered else ""))
    lines.append(f"swarm: {view.tokens_per_s:,.0f} tok/s")
    if view.outcomes_from:
        lines.append(f"last rounds of {view.outcomes_from} peers, by module: "
                     + "  ".join(f"{o} {n}" for o, n in view.outcomes.items()))
    else:
        lines.append("last rounds: no peer's record reports them")
    for b in view.bootstrap:
        lines.append(f"bootstrap {b.address}: {b.state}" + (f" ({b.error})" if b.error else ""))
    return "\n".join(lines)
