"""The swarm simulator's model: peers' rounds as events on one clock, p2ptrain's round rule
and hivemind's matchmaking simplified, vectorized with numpy so 10,000 peers take seconds.

The model, in short (README-sized):
1. Each peer draws a machine: seconds per inner step (log-normal: a persistent spread
   between machines and a round-to-round jitter), upload/download bandwidth and RTT
   (log-normal), and a session length (exponential: churn).
2. A round is H inner steps; then the peer joins the matchmaking queue of each of its modules.
3. Matchmaking, per module: the earliest waiting holder opens a window of
   `matchmaking_time`; everyone arriving inside it averages together, in groups of at most
   `target_group_size`. A lone holder waits for the next arrival up to its timeout (3
   windows plain, 0.8 of its inner time with overlap), else averages alone (its own Δ).
4. A group's butterfly all-reduce takes 4 RTT + 2(n−1)/n × payload / the slowest member's
   link; a peer's link is shared by its modules in proportion to their payloads.
5. Plain: the round ends when the last module is done, plus a fixed cost (peer-table
   fetches, fingerprint check, checkpoint: fitted on the loopback swarm). Overlap: the next
   round starts at once and waits only if the previous average is not done yet.
6. Churn: a peer leaving mid-compute loses its round; a crash mid all-reduce makes its
   groups partial (stall for hivemind's chunk timeout, re-download the module, the group's
   progress on it is lost); a replacement joins after a fixed join time plus downloading
   its path's state (fp32 params + momentum).
7. Effective tokens: copies of a module that averaged in different groups drift, and
   p2ptrain re-syncs drifted copies from one peer, so per round one lineage survives: with
   groups n_1..n_k of its M holders (within one round-long time bucket) a module keeps
   Σn²/M² of its tokens (1 when all meet). Overlap's one-round staleness is not discounted.
8. Time-to-target = target effective tokens / steady effective tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
STATE_BYTES_PER_PARAM = 8.0  # a downloaded module state: fp32 global params + fp32 outer momentum
ALLREDUCE_RTTS = 4  # matchmaking handshake + the butterfly's two phases


@dataclass
class Workload:
    """What a round of one run config costs, independent of who runs it."""

    name: str
    steps_per_round: int
    tokens_per_step: int
    module_params: dict[str, int]  # module id → parameters
    paths: list[list[str]]  # the module ids of each path
    bytes_per_value: float  # wire codec: fp16 2, blockwise 8-bit 1 + 4/64
    matchmaking_time: float  # s, the window a leader waits for its group
    averaging_timeout: float  # s
    target_group_size: int
    overlap: bool

    @property
    def tokens_per_round(self) -> int:
        return self.steps_per_round * self.tokens_per_step

    @property
    def all_params(self) -> int:
        return sum(self.module_params.values())


@dataclass
class Volunteers:
    """Who runs the peers: log-normal distributions given as (median, sigma of ln)."""

    step_s: float  # median seconds per inner step
    step_sigma_peer: float  # spread between machines (persists for a peer's session)
    step_sigma_round: float  # jitter of one machine from round to round
    up_mbps: float
    up_sigma: float
    down_mbps: float
    down_sigma: float
    rtt_ms: float
    rtt_sigma: float
    mean_session_h: float = math.inf  # exponential session lengths; inf: nobody leaves
    crash_fraction: float = 0.0  # share of departures that are crashes, not a clean stop


@dataclass
class Overheads:
    """Per-round costs that are neither compute nor transfer (calibrated on loopback)."""

    outer_fixed_s: float  # plain: DHT record/fetch, fingerprint check, hivemind's own work, checkpoint
    foreground_fixed_s: float  # overlap: what still stalls training (checkpoint, landing the average)
    join_s: float  # a replacement peer: start, DHT join, run record (its state download is added)
    record_bytes: int = 1500  # one signed peer record; the peer table is all N of them
    table_fetches_per_round: int = 2  # outer step + the group fingerprint check


@dataclass
class Peers:
    """Per-peer arrays; a departed peer's slot is reused by its replacement."""

    path: np.ndarray
    step_s: np.ndarray
    up: np.ndarray  # bytes/s
    down: np.ndarray  # bytes/s
    rtt: np.ndarray  # s
    session_end: np.ndarray  # s on the swarm clock


def lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(n)) if sigma > 0 else np.full(n, float(median))


def draw_machines(rng: np.random.Generator, vol: Volunteers, n: int, now: np.ndarray | float) -> dict:
    """Fresh machines for n peer slots joining at `now`."""
    session_s = vol.mean_session_h * 3600
    sessions = rng.exponential(session_s, n) if math.isfinite(session_s) else np.full(n, np.inf)
    return {"step_s": lognormal(rng, vol.step_s, vol.step_sigma_peer, n),
            "up": lognormal(rng, vol.up_mbps, vol.up_sigma, n) * MBIT,
            "down": lognormal(rng, vol.down_mbps, vol.down_sigma, n) * MBIT,
            "rtt": lognormal(rng, vol.rtt_ms, vol.rtt_sigma, n) / 1000,
            "session_end": now + sessions}


def new_peers(rng: np.random.Generator, vol: Volunteers, n_paths: int, n: int) -> Peers:
    # joiners pick the least-covered path, which keeps paths evenly covered: round-robin
    return Peers(path=np.arange(n) % n_paths, **draw_machines(rng, vol, n, 0.0))


def replace(peers: Peers, rng: np.random.Generator, vol: Volunteers, slots: np.ndarray, now: np.ndarray) -> None:
    for name, values in draw_machines(rng, vol, len(slots), now).items():
        getattr(peers, name)[slots] = values


def window_close(arrivals_sorted: np.ndarray, window: float, timeout: float) -> float:
    """When the matchmaking window opened by the first arrival closes: after `window`, or,
    if nobody else came, `window` after the next arrival, if that comes within the timeout."""
    close = arrivals_sorted[0] + window
    if len(arrivals_sorted) > 1 and close < arrivals_sorted[1] <= arrivals_sorted[0] + timeout:
        close = min(arrivals_sorted[1] + window, arrivals_sorted[0] + timeout)
    return close


@dataclass
class Log:
    """What the simulation records: per peer-round (by row id) and per all-reduce group."""

    row: list = field(default_factory=list)
    peer: list = field(default_factory=list)
    round_end: list = field(default_factory=list)
    wall_s: list = field(default_factory=list)
    compute_s: list = field(default_factory=list)  # useful compute (0 for a round lost to churn)
    nominal_compute_s: list = field(default_factory=list)  # what the round's compute takes at full speed
    tokens: list = field(default_factory=list)  # tokens of the round, 0 if the peer left mid-compute
    # per group: module index, start time, size, whether it was partial (a member crashed)
    group_module: list = field(default_factory=list)
    group_start: list = field(default_factory=list)
    group_size: list = field(default_factory=list)
    group_partial: list = field(default_factory=list)
    # per peer-round-module: which group it was in (index into the group lists)
    member_group: list = field(default_factory=list)
    member_row: list = field(default_factory=list)
    member_module: list = field(default_factory=list)
    departures: int = 0
    crashes: int = 0

    def rows(self, n_rows: int) -> dict[str, np.ndarray]:
        """Per-row arrays indexed by row id; rows still in flight at the end are NaN."""
        out = {}
        for name in ("peer", "round_end", "wall_s", "compute_s", "nominal_compute_s", "tokens"):
            column = np.full(n_rows, np.nan)
            column[np.array(self.row, int)] = getattr(self, name)
            out[name] = column
        return out


class Swarm:
    """One simulated swarm: n peers of `vol` running `work` with `over` overheads.

    Each module has its own matchmaking queue (a peer enters all of its modules' queues
    when its inner steps end); windows are taken in time order across all modules, and a
    peer's round ends when its last module's group is done."""

    def __init__(self, work: Workload, vol: Volunteers, over: Overheads, n_peers: int, seed: int = 0):
        self.work, self.vol, self.over, self.n = work, vol, over, n_peers
        self.rng = np.random.default_rng(seed)
        self.modules = list(work.module_params)
        self.holds_by_path = np.zeros((len(work.paths), len(self.modules)), bool)
        for p, path in enumerate(work.paths):
            self.holds_by_path[p, [self.modules.index(m) for m in path]] = True
        self.payload = np.array([work.module_params[m] * work.bytes_per_value for m in self.modules])
        self.params = np.array([work.module_params[m] for m in self.modules], float)
        self.peers = new_peers(self.rng, vol, len(work.paths), n_peers)
        self.holds = self.holds_by_path[self.peers.path].T.copy()  # (modules, peers); slots keep their path
        self.path_payload = self.holds.T @ self.payload
        self.log = Log()
        self.n_rows = 0
        self.round_start = np.zeros(n_peers)
        self.compute = np.zeros(n_peers)
        self.arrive = np.zeros(n_peers)  # when this round's inner steps end
        self.start = np.zeros(n_peers)  # when its averaging starts (overlap: after the last one is done)
        self.avg_done = np.full(n_peers, -np.inf)  # overlap: when the last round's average finished
        self.row_of = np.zeros(n_peers, int)
        self.crashing = np.zeros(n_peers, bool)
        self.pending = np.full(self.holds.shape, np.inf)  # (modules, peers): time in that module's queue
        self.module_end = np.full(self.holds.shape, -np.inf)
        self.remaining = np.zeros(n_peers, int)  # modules of this round not averaged yet
        self.begin_rounds(np.arange(n_peers))

    # --------------------------------------------------------------- a peer's round

    def begin_rounds(self, slots: np.ndarray) -> None:
        """Draw the round's compute and enter the modules' queues; a peer that leaves before
        its compute ends loses the round, and its replacement begins one in turn."""
        while len(slots):
            jitter = lognormal(self.rng, 1.0, self.vol.step_sigma_round, len(slots))
            self.compute[slots] = self.work.steps_per_round * self.peers.step_s[slots] * jitter
            self.arrive[slots] = self.round_start[slots] + self.compute[slots]
            self.row_of[slots] = self.n_rows + np.arange(len(slots))
            self.n_rows += len(slots)
            left = self.peers.session_end[slots] < self.arrive[slots]
            self.enter_queues(slots[~left])
            slots = slots[left]
            if len(slots):
                self.lose_rounds(slots)

    def enter_queues(self, slots: np.ndarray) -> None:
        self.start[slots] = (np.maximum(self.arrive[slots], self.avg_done[slots]) if self.work.overlap
                             else self.arrive[slots])
        self.pending[:, slots] = np.where(self.holds[:, slots], self.start[slots], np.inf)
        self.module_end[:, slots] = -np.inf
        self.remaining[slots] = self.holds[:, slots].sum(axis=0)
        # a crash (not a clean stop) while it averages makes its groups partial
        session_end = self.peers.session_end[slots]
        during = session_end < self.start[slots] + self.timeout(slots) + self.work.averaging_timeout
        self.crashing[slots] = during & (self.rng.random(len(slots)) < self.vol.crash_fraction)
        self.log.crashes += int(self.crashing[slots].sum())

    def lose_rounds(self, gone: np.ndarray) -> None:
        """Peers that left mid-compute: the round is thrown away and a replacement joins."""
        started = self.round_start[gone].copy()
        left_at = self.peers.session_end[gone].copy()
        self.join_replacements(gone, left_at)
        self.record_rows(gone, started, left_at, useful=np.zeros(len(gone)), tokens=0)

    def finish_rounds(self, slots: np.ndarray) -> None:
        """Peers whose last module is averaged: fixed costs, then the next round."""
        ends = np.where(self.holds[:, slots], self.module_end[:, slots], -np.inf).max(axis=0)
        outer_end = ends + self.table_fetch_s(slots) + self.over.outer_fixed_s
        if self.work.overlap:
            # training went on at once; it waited only if the previous average was still running
            next_start = np.maximum(self.arrive[slots], self.avg_done[slots]) + self.over.foreground_fixed_s
            self.avg_done[slots] = outer_end
        else:
            next_start = outer_end
        started = self.round_start[slots].copy()
        self.round_start[slots] = next_start
        leaving = self.peers.session_end[slots] < next_start  # left after averaging: the round counts
        if leaving.any():
            self.join_replacements(slots[leaving], next_start[leaving])
        self.record_rows(slots, started, next_start, useful=self.compute[slots], tokens=self.work.tokens_per_round)
        self.begin_rounds(slots)

    def record_rows(self, slots: np.ndarray, started: np.ndarray, ended: np.ndarray, useful: np.ndarray,
                    tokens: int) -> None:
        """One row per peer-round; its wall runs to the slot's next round start, so a
        replacement's join and state download count against the round that lost the peer."""
        log = self.log
        log.row += list(self.row_of[slots])
        log.peer += list(slots)
        log.round_end += list(ended)
        log.wall_s += list(self.round_start[slots] - started)
        log.compute_s += list(useful)
        log.nominal_compute_s += list(self.compute[slots])
        log.tokens += [tokens] * len(slots)

    def join_replacements(self, slots: np.ndarray, left_at: np.ndarray) -> None:
        """A new volunteer takes the slot: joins, downloads its path's state, starts a round."""
        self.log.departures += len(slots)
        replace(self.peers, self.rng, self.vol, slots, left_at)
        path_params = self.holds[:, slots].T @ self.params
        download = STATE_BYTES_PER_PARAM * path_params / np.minimum(self.peers.down[slots], np.median(self.peers.up))
        self.round_start[slots] = left_at + self.over.join_s + download
        self.avg_done[slots] = -np.inf

    # --------------------------------------------------------------- matchmaking

    def timeout(self, slots: np.ndarray) -> np.ndarray:
        """How long a peer looks for partners (p2ptrain's _matchmaking_timeout)."""
        window = 3 * self.work.matchmaking_time
        if self.work.overlap:
            return np.maximum(window, 0.8 * self.compute[slots])
        return np.full(len(slots), window)

    def run(self, until_s: float) -> Log:
        """Take matchmaking windows in time order, across modules, until none opens before until_s."""
        while True:
            first = self.pending.min(axis=1)
            j = int(np.argmin(first))
            if first[j] > until_s:
                return self.log
            waiting = np.flatnonzero(self.pending[j] < np.inf)
            order = np.argsort(self.pending[j, waiting], kind="stable")
            queue, times = waiting[order], self.pending[j, waiting[order]]
            close = window_close(times, self.work.matchmaking_time, float(self.timeout(queue[:1])[0]))
            members = queue[:int(np.searchsorted(times, close, side="right"))]
            self.module_end[j, members] = self.average_module(j, members, close)
            self.pending[j, members] = np.inf
            self.remaining[members] -= 1
            done = members[self.remaining[members] == 0]
            if len(done):
                self.finish_rounds(done)

    def average_module(self, j: int, members: np.ndarray, close: float) -> np.ndarray:
        """Groups of module j among the window's members (in arrival order); each member's end time."""
        work = self.work
        n = len(members)
        if n == 1:  # nobody came within its timeout: it waited it out and uses its own Δ
            ends = self.start[members] + self.timeout(members)
            self.record_groups(j, members, np.zeros(1, int), ends, np.zeros(1, bool))
            return ends
        # groups of at most target_group_size (hivemind fills a leader's group, then the next)
        group_of = np.arange(n) // work.target_group_size
        n_groups = group_of[-1] + 1
        sizes = np.bincount(group_of)
        link = np.minimum(self.peers.up[members], self.peers.down[members])
        share = link * self.payload[j] / self.path_payload[members]  # a link is shared by the path's modules
        slowest = np.full(n_groups, np.inf)
        np.minimum.at(slowest, group_of, share)
        rtt = np.zeros(n_groups)
        np.maximum.at(rtt, group_of, self.peers.rtt[members])
        group_start = np.full(n_groups, close)
        transfer = 2 * (sizes - 1) / sizes * self.payload[j] / slowest + ALLREDUCE_RTTS * rtt
        partial = np.zeros(n_groups, bool)
        np.logical_or.at(partial, group_of, self.crashing[members])
        # a crashed member: survivors wait hivemind's next_chunk_timeout, then re-download the module
        penalty = partial * (max(2.0, work.averaging_timeout / 6)
                             + STATE_BYTES_PER_PARAM * self.params[j] / slowest)
        self.record_groups(j, members, group_of, group_start, partial)
        return (group_start + transfer + penalty)[group_of]

    def record_groups(self, j: int, members: np.ndarray, group_of: np.ndarray, group_start: np.ndarray,
                      partial: np.ndarray) -> None:
        log = self.log
        base = len(log.group_size)
        log.group_module += [j] * len(group_start)
        log.group_start += list(group_start)
        log.group_size += list(np.bincount(group_of, minlength=len(group_start)))
        log.group_partial += list(partial)
        log.member_group += list(base + group_of)
        log.member_row += list(self.row_of[members])
        log.member_module += [j] * len(members)

    def table_fetch_s(self, slots: np.ndarray) -> np.ndarray:
        """Fetching the peer table (one DHT key, a signed record per live peer)."""
        table = self.n * self.over.record_bytes
        hops = max(1.0, math.log2(self.n))
        return self.over.table_fetches_per_round * (table / self.peers.down[slots] + self.peers.rtt[slots] * hops)


# ------------------------------------------------------------------ what a run yields

def lineage_share(log: Log, bucket_s: float) -> np.ndarray:
    """Per group member: the share of its module tokens that survive (n_g / M, M = the
    module's holders that averaged in the same round-long time bucket; 0 if partial)."""
    module = np.array(log.group_module, int)
    size = np.array(log.group_size, float)
    bucket = np.floor(np.array(log.group_start) / bucket_s).astype(int)
    key = module * (bucket.max() + 1) + bucket
    holders = np.bincount(key, weights=size)
    share = size / holders[key] * ~np.array(log.group_partial, bool)
    return share[np.array(log.member_group, int)]


def per_row(swarm: Swarm, values: np.ndarray) -> np.ndarray:
    """Sum per-member values into their peer-round rows."""
    out = np.zeros(swarm.n_rows)
    np.add.at(out, np.array(swarm.log.member_row, int), values)
    return out


def effective_tokens(swarm: Swarm, rows: dict, bucket_s: float) -> np.ndarray:
    """Per peer-round: tokens × Σ over its modules (param-weighted) of the lineage share."""
    module = np.array(swarm.log.member_module, int)
    weighted = per_row(swarm, swarm.params[module] * lineage_share(swarm.log, bucket_s))
    path_params = (swarm.holds.T @ swarm.params)[np.nan_to_num(rows["peer"]).astype(int)]
    return rows["tokens"] * weighted / path_params


def allreduce_bytes(swarm: Swarm) -> np.ndarray:
    """Per peer-round: the butterfly bound Σ over its modules of 2(n−1)/n × payload."""
    log = swarm.log
    size = np.array(log.group_size, float)[np.array(log.member_group, int)]
    return per_row(swarm, 2 * (size - 1) / size * swarm.payload[np.array(log.member_module, int)])


def mean_group_seen(swarm: Swarm, in_window: np.ndarray, stem: bool) -> float:
    """Mean group size as a member reports it (the `peers_per_module` of a round event)."""
    log = swarm.log
    is_stem = np.array([m == "stem" for m in swarm.modules])[np.array(log.member_module, int)]
    pick = in_window[np.array(log.member_row, int)] & (is_stem if stem else ~is_stem)
    sizes = np.array(log.group_size)[np.array(log.member_group, int)][pick]
    return float(sizes.mean()) if len(sizes) else float("nan")


def simulate(work: Workload, vol: Volunteers, over: Overheads, n_peers: int, rounds: float = 12,
             seed: int = 0) -> dict:
    """Run a swarm until its median peer has done `rounds` rounds; report the steady state
    (rounds ending after the first two median rounds, before the last one)."""
    swarm = Swarm(work, vol, over, n_peers, seed)
    horizon = rounds * (work.steps_per_round * vol.step_s + 2 * work.matchmaking_time)
    while True:
        swarm.run(horizon)
        finished = np.array(swarm.log.peer, int)
        if np.median(np.bincount(finished, minlength=n_peers)) >= rounds:
            break
        horizon *= 1.5
    rows = swarm.log.rows(swarm.n_rows)
    end, wall, tokens = rows["round_end"], rows["wall_s"], rows["tokens"]
    bucket_s = float(np.nanmedian(wall))
    t0, t1 = 2 * bucket_s, np.nanmax(end) - bucket_s
    window = (end > t0) & (end <= t1)
    # per peer, then the median peer: as bench_swarm measures a real swarm
    peer = rows["peer"][window].astype(int)
    count = np.bincount(peer, minlength=n_peers)
    seen = count > 0
    peer_wall = np.bincount(peer, weights=wall[window], minlength=n_peers)[seen]
    util = np.bincount(peer, weights=rows["compute_s"][window], minlength=n_peers)[seen] / peer_wall
    effective = effective_tokens(swarm, rows, bucket_s)[window]
    potential = work.tokens_per_round * wall[window] / rows["nominal_compute_s"][window]
    rate = effective.sum() / (t1 - t0)
    target = 20 * work.all_params  # Chinchilla's 20 tokens per parameter, over all modules
    return {
        "peers": n_peers, "overlap": work.overlap,
        "wall_per_round_s": float(np.median(peer_wall / count[seen])),
        "utilization": float(np.median(util)),
        "effective_utilization": float(effective.sum() / potential.sum()),
        "tokens_per_s": float(tokens[window].sum() / (t1 - t0)),
        "effective_tokens_per_s": float(rate),
        "lineage_share": float(effective.sum() / max(tokens[window].sum(), 1.0)),
        "mean_group": {"stem": mean_group_seen(swarm, window, True), "level": mean_group_seen(swarm, window, False)},
        "mb_sent_per_peer_round": float(np.median(allreduce_bytes(swarm)[window & (tokens > 0)]) / 1e6),
        "peer_table_mb": n_peers * over.record_bytes / 1e6,
        "target_tokens": target,
        "time_to_target_h": float(target / rate / 3600) if rate > 0 else math.inf,
        "departures": swarm.log.departures, "crashes": swarm.log.crashes,
        "simulated_s": float(np.nanmax(end)), "peer_rounds": int(window.sum()),
    }
