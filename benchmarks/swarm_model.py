"""The swarm simulator's model: peers' rounds as events on one clock, p2ptrain's round rule
and hivemind's matchmaking simplified, vectorized with numpy so 10,000 peers take seconds.

Two round rules (README-sized):

Aligned (`AlignedSwarm`, p2ptrain's rule since issue 10): round r ends at r × T on the
swarm's clock (T = averaging.round_seconds) for every peer.
1. Each peer draws a machine: seconds per inner step (log-normal: a persistent spread
   between machines and a round-to-round jitter), upload/download bandwidth and RTT
   (log-normal), and a session length (exponential: churn). Peers join at random moments
   over the first two rounds (random phases).
2. A peer enters the round in progress if at least 1.5 steps of it are left (else the
   next one), trains until the round's end — at most H steps, never a step that would end
   after it — then looks for each module's holders, who arrive at the same moment.
3. Matchmaking, per module: the holders arriving at the round's end (plain: at once;
   overlap: once their previous average has landed) average together in groups of at
   most `target_group_size`: a group takes the arrivals within one `matchmaking_time`
   window of its first and starts when it is full. A group that expects more holders
   than arrive (the records of peers that left in the last 60 s, of peers that enter a
   later round; a holder that missed last round's group is not expected again) waits the
   whole window; a lone holder that expected others waits its 3-window timeout and
   averages alone; a lone holder that expected nobody does not wait.
4. A group's butterfly all-reduce takes 4 RTT + 2(n−1)/n × payload / the slowest member's
   link; a peer's link is shared by its modules in proportion to their payloads.
5. Plain: the outer step ends when its last module is done, plus a fixed cost (peer-table
   fetches, fingerprint check, checkpoint: fitted on the loopback swarm); the next round
   it can still enter starts then — one whose outer step runs past the next round's end
   skips rounds. Overlap: it trains on at once and waits only for the previous round's
   average.
6. Churn: a peer leaving mid-round loses it; a crash mid all-reduce makes its groups
   partial: the survivors stall for hivemind's chunk timeout and skip the slice the
   crashed peer reduced (all alike, so their copies stay equal; its 1/n of the values is
   not updated that round); a replacement joins after a fixed join time plus downloading
   its path's state (fp32 params + momentum) and enters the round in progress.
7. Effective tokens. Holders whose copies differ are not merged by averaging: p2ptrain's
   check re-syncs a minority from a strict majority and moves nobody on a tie. So per
   module and round only the largest group's update survives: its members keep their
   tokens for that module ((n−1)/n of them in a partial group), every other group's are
   lost. A peer
   that skipped rounds trains on a stale copy: its update is lost and it re-downloads the
   module. Module-rounds whose largest group is no strict majority of the round's holders
   are counted (`no_majority`): those splits do not heal by the rule above at all.
8. Time-to-target = target effective tokens / steady effective tokens per second.

Step-counted (`Swarm`, the rule before issue 10, kept for comparison): a round is H inner
steps, then the peer queues for each module; per module the earliest waiting holder opens
a `matchmaking_time` window and everyone arriving inside it averages together; a lone
holder waits for the next arrival up to its timeout (3 windows; 0.8 of its compute with
overlap). Peers start in phase (all at 0, what this model assumed until issue 10) or at
random phases (their first round starts anywhere within one round). Effective tokens use
the same largest-group rule, per round-long time bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
STATE_BYTES_PER_PARAM = 8.0  # a downloaded module state: fp32 global params + fp32 outer momentum
ALLREDUCE_RTTS = 4  # matchmaking handshake + the butterfly's two phases
RECORD_TTL_S = 60.0  # a departed peer's record stays visible this long (records.PEER_RECORD_TTL_S)
ENTER_MIN_STEPS = 1.5  # a peer enters the round in progress if this many steps of it are left


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
    round_seconds: float = 30.0  # s, the aligned schedule's round length (averaging.round_seconds)

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

    def __init__(self, work: Workload, vol: Volunteers, over: Overheads, n_peers: int, seed: int = 0,
                 random_phase: bool = True):
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
        # in phase: every peer starts its first round at 0; random phases: anywhere in one round
        self.round_start = (self.rng.uniform(0, work.steps_per_round * self.peers.step_s) if random_phase
                            else np.zeros(n_peers))
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
        # a crashed member: survivors wait hivemind's next_chunk_timeout and skip its slice
        penalty = partial * max(2.0, work.averaging_timeout / 6)
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


# ------------------------------------------------------------------ the aligned schedule

class AlignedSwarm:
    """One simulated swarm on the shared wall-clock schedule (p2ptrain's round rule since
    issue 10): rounds end at r × T for everyone; see the module docstring, points 1–7."""

    def __init__(self, work: Workload, vol: Volunteers, over: Overheads, n_peers: int, seed: int = 0,
                 join_spread_rounds: float = 2.0):
        self.work, self.vol, self.over, self.n = work, vol, over, n_peers
        self.rng = np.random.default_rng(seed)
        self.T = float(work.round_seconds)
        self.modules = list(work.module_params)
        self.holds_by_path = np.zeros((len(work.paths), len(self.modules)), bool)
        for p, path in enumerate(work.paths):
            self.holds_by_path[p, [self.modules.index(m) for m in path]] = True
        self.payload = np.array([work.module_params[m] * work.bytes_per_value for m in self.modules])
        self.params = np.array([work.module_params[m] for m in self.modules], float)
        self.peers = new_peers(self.rng, vol, len(work.paths), n_peers)
        self.holds = self.holds_by_path[self.peers.path].T.copy()  # (modules, peers); slots keep their path
        self.path_payload = self.holds.T @ self.payload
        self.path_params = self.holds.T @ self.params
        # random phases: the initial peers join at random moments over the first rounds
        self.ready = self.rng.uniform(0, join_spread_rounds * self.T, n_peers)  # can start its next round
        self.joined_at = self.ready.copy()  # when the slot's record first appeared
        self.min_round = np.ones(n_peers, int)  # a round it entered too late for a step: the next one
        self.avg_done = np.full(n_peers, -np.inf)  # overlap: when its last background average lands
        self.last_round = np.zeros(n_peers, int)  # the last round whose outer step it applied
        self.fresh = np.ones(n_peers, bool)  # its state was just downloaded (current): no stale base
        self.published = np.zeros(n_peers, bool)  # its record is on the DHT
        self.ghost_until: list[float] = []  # departed peers' records, visible until then
        self.ghost_path: list[int] = []
        self.ghost_last: list[int] = []  # the last round a departed peer took part in
        self.ghost_published: list[float] = []  # when its record first appeared
        self.rows: dict[str, list] = {k: [] for k in ("peer", "round", "wall_s", "compute_s", "tokens",
                                                      "potential_tokens", "stale", "skipped_before", "outer_s")}
        self.n_rows = 0
        self.last_row = np.full(n_peers, -1)
        self.last_participation = np.zeros(n_peers, int)
        self.group_module: list[np.ndarray] = []
        self.group_round: list[np.ndarray] = []
        self.group_size: list[np.ndarray] = []
        self.group_partial: list[np.ndarray] = []
        self.member_group: list[np.ndarray] = []
        self.member_row: list[np.ndarray] = []
        self.member_module: list[np.ndarray] = []
        self.n_groups = 0
        self.departures = self.crashes = 0
        self.round = 0  # the last round simulated

    # --------------------------------------------------------------- helpers

    def entry_round(self) -> np.ndarray:
        """The round each slot enters next: the first with 1.5 of its steps still left."""
        r = np.ceil((self.ready + ENTER_MIN_STEPS * self.peers.step_s) / self.T).astype(int)
        return np.maximum(np.maximum(r, 1), self.min_round)

    def table_fetch_s(self, slots: np.ndarray) -> np.ndarray:
        """One read of the peer table (one DHT key, a signed record per live peer)."""
        table = self.n * self.over.record_bytes
        hops = max(1.0, math.log2(self.n))
        return table / self.peers.down[slots] + self.peers.rtt[slots] * hops

    def download_s(self, slots: np.ndarray) -> np.ndarray:
        """Downloading a path's state (fp32 params + momentum) from peers."""
        return STATE_BYTES_PER_PARAM * self.path_params[slots] / np.minimum(self.peers.down[slots],
                                                                              np.median(self.peers.up))

    def add_row(self, slots: np.ndarray, r: int, wall, compute, tokens, potential, stale, skipped,
                outer=0.0) -> np.ndarray:
        rows = self.n_rows + np.arange(len(slots))
        self.n_rows += len(slots)
        for name, values in (("peer", slots), ("round", np.full(len(slots), r)), ("wall_s", wall),
                             ("compute_s", compute), ("tokens", tokens), ("potential_tokens", potential),
                             ("stale", stale), ("skipped_before", skipped), ("outer_s", outer)):
            self.rows[name].append(np.broadcast_to(np.asarray(values), len(slots)).copy())
        return rows

    def depart(self, end: float, r: int, entry: np.ndarray) -> None:
        """Slots whose volunteer leaves before this round's end: a round in progress is lost;
        the record stays visible for its TTL; a new volunteer joins, downloads its path's
        state and enters the round in progress."""
        while True:
            gone = np.flatnonzero(self.peers.session_end < end)
            if not len(gone):
                return
            left_at = self.peers.session_end[gone].copy()
            computing = (entry[gone] == r) & (self.ready[gone] < left_at)
            if computing.any():
                g = gone[computing]
                wasted = left_at[computing] - self.ready[g]
                self.add_row(g, r, wasted, wasted, 0, 0.0, False, 0)
            seen = self.published[gone] | (self.ready[gone] < left_at)
            self.ghost_until += list(left_at[seen] + RECORD_TTL_S)
            self.ghost_path += list(self.peers.path[gone[seen]])
            self.ghost_last += list(self.last_participation[gone[seen]])
            self.ghost_published += list(self.joined_at[gone[seen]])
            self.departures += len(gone)
            replace(self.peers, self.rng, self.vol, gone, left_at)
            self.ready[gone] = left_at + self.over.join_s + self.download_s(gone)
            self.joined_at[gone] = self.ready[gone]
            self.min_round[gone] = 1
            self.avg_done[gone] = -np.inf
            self.fresh[gone] = True
            self.published[gone] = False
            self.last_participation[gone] = 0
            entry = self.entry_round()

    # --------------------------------------------------------------- the rounds

    def run(self, rounds: int) -> "AlignedSwarm":
        """Simulate the next `rounds` rounds of the schedule."""
        work, T = self.work, self.T
        H = work.steps_per_round
        tgs = work.target_group_size
        first = self.round + 1
        self.round += rounds
        for r in range(first, self.round + 1):
            end = r * T
            entry = self.entry_round()
            self.depart(end, r, entry)
            entry = self.entry_round()
            slots = np.flatnonzero(entry == r)
            step = self.peers.step_s[slots] * lognormal(self.rng, 1.0, self.vol.step_sigma_round, len(slots))
            steps = np.minimum(H, np.floor((end - self.ready[slots]) / step)).astype(int)
            late = steps < 1  # entered too late for even one step: the next round is its own
            self.min_round[slots[late]] = r + 1
            self.published[slots] = True
            slots, step, steps = slots[~late], step[~late], steps[~late]
            if not len(slots):
                continue
            # visible holders that will not arrive (departed peers' records, peers waiting for a
            # later round) and are still expected: a holder listed last round that missed last
            # round's group is not waited for again (SwarmNode.absent)
            keep = np.array(self.ghost_until) > end
            self.ghost_until = list(np.array(self.ghost_until)[keep])
            self.ghost_path = list(np.array(self.ghost_path, int)[keep])
            self.ghost_last = list(np.array(self.ghost_last, int)[keep])
            self.ghost_published = list(np.array(self.ghost_published)[keep])
            listed_before = end - T
            expected_ghost = ((np.array(self.ghost_last, int) == r - 1)
                              | (np.array(self.ghost_published) > listed_before))
            ghost_paths = np.array(self.ghost_path, int)[expected_ghost]
            waiting = np.flatnonzero((entry > r) & (self.ready < end) | (entry == r) & np.isin(
                np.arange(self.n), slots, invert=True) & (self.ready < end))
            waiting = waiting[(self.last_participation[waiting] == r - 1) | (self.joined_at[waiting] > listed_before)]
            ghosts = (self.holds_by_path[ghost_paths].sum(axis=0) if len(ghost_paths) else 0) + \
                self.holds[:, waiting].sum(axis=1)
            # plain: at the round's end; overlap: once the previous round's average has landed
            arrive = (np.maximum(end, self.avg_done[slots]) if work.overlap else end) + self.table_fetch_s(slots)
            timeout = 3 * work.matchmaking_time
            crashing = ((self.peers.session_end[slots] < end + timeout + work.averaging_timeout)
                        & (self.rng.random(len(slots)) < self.vol.crash_fraction))
            self.crashes += int(crashing.sum())
            stale = ~self.fresh[slots] & (self.last_round[slots] < r - 1)
            compute = steps * step
            module_end = np.full((len(self.modules), len(slots)), -np.inf)
            member_local: list[tuple[int, np.ndarray, np.ndarray]] = []  # (module, local member idx, group id)
            for j in range(len(self.modules)):
                local = np.flatnonzero(self.holds[j, slots])
                if not len(local):
                    continue
                local = local[np.argsort(arrive[local], kind="stable")]
                ends, group_ids = self.average_module(j, r, slots, local, arrive, crashing, int(ghosts[j]), tgs)
                module_end[j, local] = ends
                member_local.append((j, local, group_ids))
            outer_end = (np.where(self.holds[:, slots], module_end, -np.inf).max(axis=0)
                         + self.table_fetch_s(slots) + self.over.outer_fixed_s)
            outer_end = outer_end + stale * self.download_s(slots)  # the check re-syncs a stale copy
            if work.overlap:
                ready_next = np.maximum(end, self.avg_done[slots]) + self.over.foreground_fixed_s
                self.avg_done[slots] = outer_end
            else:
                ready_next = outer_end
            skipped = np.where(self.last_participation[slots] > 0, r - self.last_participation[slots] - 1, 0)
            tps = work.tokens_per_step
            # outer_s: training stalled after the round's end (plain: the whole outer step;
            # overlap: landing the previous average), as RoundReport.seconds_outer
            rows = self.add_row(slots, r, ready_next - self.ready[slots], compute, steps * tps,
                                (ready_next - self.ready[slots]) / step * tps, stale, skipped, ready_next - end)
            for j, local, group_ids in member_local:
                self.member_row.append(rows[local])
                self.member_module.append(np.full(len(local), j))
                self.member_group.append(group_ids)
            self.ready[slots] = ready_next
            self.last_round[slots] = r
            self.last_participation[slots] = r
            self.fresh[slots] = False
        return self

    def average_module(self, j: int, r: int, slots: np.ndarray, local: np.ndarray, arrive: np.ndarray,
                       crashing: np.ndarray, ghosts: int, tgs: int) -> tuple[np.ndarray, np.ndarray]:
        """Module j's holders that arrived after round r's end (local: in arrival order):
        each group takes the arrivals within one window of its first, at most tgs; a full
        group starts at its last arrival, one short of the holders it expects waits out the
        window (a lone holder: its 3-window timeout, then it averages alone; the only
        holder: no wait). Returns each member's end time and its group id."""
        work, mm = self.work, self.work.matchmaking_time
        members = slots[local]
        t = arrive[local]
        n = len(members)
        expected = n + ghosts
        target = min(expected, tgs)
        group_of = np.empty(n, int)
        starts = []
        i = 0
        while i < n:
            k = min(int(np.searchsorted(t, t[i] + mm, side="right")), i + tgs)
            size = k - i
            if size >= target:
                start = t[k - 1]
            elif size == 1:
                start = t[i] + 3 * mm
            else:
                start = t[i] + mm
            group_of[i:k] = len(starts)
            starts.append(start)
            i = k
        n_groups = len(starts)
        start = np.array(starts)
        sizes = np.bincount(group_of, minlength=n_groups)
        link = np.minimum(self.peers.up[members], self.peers.down[members])
        share = link * self.payload[j] / self.path_payload[members]
        slowest = np.full(n_groups, np.inf)
        np.minimum.at(slowest, group_of, share)
        rtt = np.zeros(n_groups)
        np.maximum.at(rtt, group_of, self.peers.rtt[members])
        transfer = np.where(sizes > 1, 2 * (sizes - 1) / sizes * self.payload[j] / slowest + ALLREDUCE_RTTS * rtt, 0)
        partial = np.zeros(n_groups, bool)
        np.logical_or.at(partial, group_of, crashing[local])
        partial &= sizes > 1
        # a crashed member: survivors wait hivemind's next_chunk_timeout and skip its slice
        penalty = partial * max(2.0, work.averaging_timeout / 6)
        base = self.n_groups
        self.n_groups += n_groups
        self.group_module.append(np.full(n_groups, j))
        self.group_round.append(np.full(n_groups, r))
        self.group_size.append(sizes)
        self.group_partial.append(partial)
        return (start + transfer + penalty)[group_of], base + group_of

    # --------------------------------------------------------------- what it yields

    def columns(self) -> dict[str, np.ndarray]:
        out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.rows.items()}
        for name in ("group_module", "group_round", "group_size", "group_partial", "member_group", "member_row",
                     "member_module"):
            parts = getattr(self, name)
            out[name] = np.concatenate(parts) if parts else np.zeros(0, int)
        return out


def simulate_aligned(work: Workload, vol: Volunteers, over: Overheads, n_peers: int, rounds: float = 12,
                     seed: int = 0, join_spread_rounds: float = 2.0, max_schedule_rounds: int = 2000) -> dict:
    """Run the aligned schedule (peers joining at random moments over the first
    join_spread_rounds) until the median peer slot has taken part in `rounds` rounds after
    its second; report those steady rounds (from the median slot's second participation)."""
    swarm = AlignedSwarm(work, vol, over, n_peers, seed, join_spread_rounds)
    need = int(math.ceil(rounds)) + 2
    chunk = need + 2
    while True:
        swarm.run(chunk)
        c = swarm.columns()
        taken = c["tokens"] > 0
        if np.median(np.bincount(c["peer"][taken].astype(int), minlength=n_peers)) >= need \
                or swarm.round >= max_schedule_rounds:
            break
        chunk = max(chunk, swarm.round // 2)
    # steady rounds: after the median slot's second participation
    second = []
    for slot in range(n_peers):
        rs = np.sort(c["round"][taken & (c["peer"] == slot)])
        if len(rs) >= 2:
            second.append(rs[1])
    warmup = int(np.median(second)) if second else swarm.round
    total = swarm.round
    group_size = c["group_size"].astype(float)
    key = c["group_module"] * (total + 1) + c["group_round"]
    alive, majority, shared = survivors(key, group_size, swarm.rng)
    share = group_share(alive, group_size, c["group_partial"].astype(bool))
    in_window_group = c["group_round"] > warmup
    keys_in_window = np.unique(key[in_window_group])
    all_keys = np.unique(key)
    pick = np.isin(all_keys, keys_in_window)
    no_majority = float((~majority & shared)[pick].sum() / max(shared[pick].sum(), 1))
    member_share = share[c["member_group"]] * ~c["stale"][c["member_row"]].astype(bool)
    weighted = np.zeros(swarm.n_rows)
    np.add.at(weighted, c["member_row"], swarm.params[c["member_module"]] * member_share)
    peer = c["peer"].astype(int)
    path_params = swarm.path_params[peer]  # slots keep their path
    effective = c["tokens"] * weighted / path_params
    window = c["round"] > warmup
    duration = (total - warmup) * swarm.T
    p = peer[window]
    count = np.bincount(p, minlength=n_peers)
    seen = count > 0
    peer_wall = np.bincount(p, weights=c["wall_s"][window], minlength=n_peers)[seen]
    util = np.bincount(p, weights=c["compute_s"][window], minlength=n_peers)[seen] / peer_wall
    tokens = c["tokens"]
    rate = effective[window].sum() / duration
    target = 20 * work.all_params
    member_window = window[c["member_row"]]
    member_size = group_size[c["member_group"]]
    is_stem = np.array([m == "stem" for m in swarm.modules])[c["member_module"]]
    bytes_row = np.zeros(swarm.n_rows)
    np.add.at(bytes_row, c["member_row"], 2 * (member_size - 1) / member_size * swarm.payload[c["member_module"]])
    counted = window & (tokens > 0)
    return {
        "model": "aligned", "peers": n_peers, "overlap": work.overlap, "round_seconds": swarm.T,
        "wall_per_round_s": float(np.median(peer_wall / count[seen])),
        "utilization": float(np.median(util)),
        "effective_utilization": float(effective[window].sum() / c["potential_tokens"][window].sum()),
        "tokens_per_s": float(tokens[window].sum() / duration),
        "effective_tokens_per_s": float(rate),
        "lineage_share": float(effective[window].sum() / max(tokens[window].sum(), 1.0)),
        "mean_group": {"stem": float(member_size[member_window & is_stem].mean()) if (member_window & is_stem).any()
                       else float("nan"),
                       "level": float(member_size[member_window & ~is_stem].mean())
                       if (member_window & ~is_stem).any() else float("nan")},
        "steps_per_round_median": float(np.median(tokens[counted] / work.tokens_per_step)) if counted.any() else 0.0,
        "skipped_fraction": float(c["skipped_before"][window].sum()
                                  / max(c["skipped_before"][window].sum() + window.sum(), 1)),
        "stale_fraction": float(c["stale"][window].mean()) if window.any() else 0.0,
        "no_majority": no_majority,
        "outer_s": float(np.median(c["outer_s"][counted])) if counted.any() else 0.0,
        "mb_sent_per_peer_round": float(np.median(bytes_row[counted]) / 1e6) if counted.any() else 0.0,
        "peer_table_mb": n_peers * over.record_bytes / 1e6,
        "target_tokens": target,
        "time_to_target_h": float(target / rate / 3600) if rate > 0 else math.inf,
        "departures": swarm.departures, "crashes": swarm.crashes,
        "simulated_s": float(total * swarm.T), "peer_rounds": int(window.sum()),
    }


# ------------------------------------------------------------------ what a run yields

def survivors(key: np.ndarray, size: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: whether its update survives, i.e. it is the largest group of its
    (module, round) key (ties broken at random); per key (in np.unique order): whether that
    group is a strict majority of the key's holders, and whether the key had 2+ holders."""
    order = np.lexsort((rng.random(len(key)), -size, key))  # per key: largest first
    first = np.ones(len(key), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    alive = np.zeros(len(key), bool)
    alive[order[first]] = True
    keys, inverse = np.unique(key, return_inverse=True)
    holders = np.bincount(inverse, weights=size)
    best = np.zeros(len(keys))
    np.maximum.at(best, inverse, np.where(alive, size, 0.0))
    return alive, 2 * best > holders, holders >= 2


def group_share(alive: np.ndarray, size: np.ndarray, partial: np.ndarray) -> np.ndarray:
    """Per group: the share of its members' tokens that survives (a partial group's crashed
    reducer left 1/n of the values un-averaged that round)."""
    return alive * np.where(partial, 1 - 1 / np.maximum(size, 1), 1.0)


def lineage_share(log: Log, bucket_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Per group member: the surviving share of its tokens (see group_share; its module's
    largest group among those starting in the same round-long time bucket survives); and
    the share of multi-holder module-buckets with no strict-majority group."""
    module = np.array(log.group_module, int)
    size = np.array(log.group_size, float)
    bucket = np.floor(np.array(log.group_start) / bucket_s).astype(int)
    key = module * (bucket.max() + 1) + bucket
    alive, majority, shared = survivors(key, size, rng)
    no_majority = float((~majority & shared).sum() / max(shared.sum(), 1))
    share = group_share(alive, size, np.array(log.group_partial, bool))
    return share[np.array(log.member_group, int)], {"no_majority": no_majority}


def per_row(swarm: Swarm, values: np.ndarray) -> np.ndarray:
    """Sum per-member values into their peer-round rows."""
    out = np.zeros(swarm.n_rows)
    np.add.at(out, np.array(swarm.log.member_row, int), values)
    return out


def effective_tokens(swarm: Swarm, rows: dict, bucket_s: float) -> tuple[np.ndarray, dict]:
    """Per peer-round: tokens × Σ over its modules (param-weighted) of the lineage share."""
    module = np.array(swarm.log.member_module, int)
    share, stats = lineage_share(swarm.log, bucket_s, swarm.rng)
    weighted = per_row(swarm, swarm.params[module] * share)
    path_params = (swarm.holds.T @ swarm.params)[np.nan_to_num(rows["peer"]).astype(int)]
    return rows["tokens"] * weighted / path_params, stats


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
             seed: int = 0, model: str = "aligned", random_phase: bool = True, join_spread_rounds: float = 2.0) -> dict:
    """model "aligned": p2ptrain's round rule (simulate_aligned); "steps": the step-counted
    rule it replaced (simulate_steps), with peers in phase or at random phases."""
    if model == "aligned":
        return simulate_aligned(work, vol, over, n_peers, rounds, seed, join_spread_rounds)
    if model == "steps":
        return simulate_steps(work, vol, over, n_peers, rounds, seed, random_phase)
    raise ValueError(f"unknown model {model!r}")


def simulate_steps(work: Workload, vol: Volunteers, over: Overheads, n_peers: int, rounds: float = 12,
                   seed: int = 0, random_phase: bool = True) -> dict:
    """Run a step-counted swarm until its median peer has done `rounds` rounds; report the
    steady state (rounds ending after the first two median rounds, before the last one)."""
    swarm = Swarm(work, vol, over, n_peers, seed, random_phase)
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
    effective, stats = effective_tokens(swarm, rows, bucket_s)
    effective = effective[window]
    potential = work.tokens_per_round * wall[window] / rows["nominal_compute_s"][window]
    rate = effective.sum() / (t1 - t0)
    target = 20 * work.all_params  # Chinchilla's 20 tokens per parameter, over all modules
    return {
        "model": "steps" + ("" if random_phase else " (in phase)"), "peers": n_peers, "overlap": work.overlap,
        "no_majority": stats["no_majority"], "skipped_fraction": 0.0, "stale_fraction": 0.0,
        "steps_per_round_median": float(work.steps_per_round),
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
