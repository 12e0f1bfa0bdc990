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
   lost, and when that group is a strict majority the others download the module's state
   (fp32 params + momentum) before their next round (overlap: before the next landing).
   A peer
   that skipped rounds trains on a stale copy: its update is lost and it re-downloads the
   module. Module-rounds whose largest group is no strict majority of the round's holders
   are counted (`no_majority`): those splits do not heal by the rule above at all.
8. Time-to-target = target effective tokens / steady effective tokens per second.

Levers (issue 16 B, `Levers`, aligned rule only; all off is the rule above): `fill` (train
until the round's end, no H cap), `staged` (Moshpit-style staged averaging that covers every
holder: `staged_mix` tracks the copies' actual mixing on random pseudo-gradients, and a
module-round counts whole only if its copies agree within the codec's tolerance),
`balanced` (hivemind's bandwidth-weighted butterfly shares), `fragments` (a fraction of each
module per round), `table` (one full peer table vs per-module keys with bounded sampled
reads) and `table_contention` (the DHT replicas that store a key serve all its readers).

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

from p2ptrain.swarm.averaging import CHUNK_TIMEOUT_FLOOR_S, CHUNK_WAIT_MARGIN
from p2ptrain.swarm.staging import plan_stages

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
STATE_BYTES_PER_PARAM = 8.0  # a downloaded module state: fp32 global params + fp32 outer momentum
NF4_BYTES_PER_VALUE = 0.5 + 4 / 64  # bench_outer_codecs' 4-bit codec: 4 bits a value, a float32 scale per 64


def chunk_timeout_s(averaging_timeout: float) -> float:
    """hivemind's next_chunk_timeout as p2ptrain sets it (swarm/slot.py) for a group with a
    member whose link is unknown: how long survivors wait for a silent sender's next part."""
    return max(2.0, averaging_timeout / 6)


# A member that vanishes mid all-reduce (its sockets left open) is waited for twice: as a
# sender for one chunk timeout, and as a reducer for hivemind's reducer timeout, twice that
# (its slice's averages never come). A killed process's sockets close at once and cost nothing.
REDUCER_TIMEOUT_FACTOR = 2.0


def declared_link_chunk_timeout_s(path_bytes: np.ndarray, sizes: np.ndarray, slowest_link: np.ndarray,
                                  averaging_timeout: float) -> np.ndarray:
    """p2ptrain's chunk timeout for groups whose members all declared their links
    (averaging.chunk_timeout_seconds, per group): the margin × the slowest member's upload
    of its round, 2 (n − 1) / n × `path_bytes` (the bytes of all its modules) over its link
    (bytes/s), within [floor, chunk_timeout_s(averaging_timeout)]."""
    upload = path_bytes * 2 * np.maximum(sizes - 1, 0) / np.maximum(sizes, 1) / slowest_link
    return np.clip(CHUNK_WAIT_MARGIN * upload, CHUNK_TIMEOUT_FLOOR_S,
                   max(chunk_timeout_s(averaging_timeout), CHUNK_TIMEOUT_FLOOR_S))


ALLREDUCE_RTTS = 4  # matchmaking handshake + the butterfly's two phases
RECORD_TTL_S = 60.0  # records.PEER_RECORD_TTL_S
ENTER_MIN_STEPS = 1.5  # a peer enters the round in progress if this many steps of it are left


def record_ttl(round_seconds: float) -> float:
    """How long a departed peer's record stays visible: records.peer_record_ttl, 2 rounds + 60 s."""
    return 2 * round_seconds + RECORD_TTL_S


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
    sync_tolerance: float = 0.1  # relative copy difference the codec alone causes (averaging.sync_tolerance)

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
    # the initial peers' own seconds per step, slot by slot (validation against a real swarm
    # whose peers' step times were measured one by one); replacements still draw from step_s
    step_s_each: tuple[float, ...] | None = None
    # the initial peers' own links (Mbit/s up, down), slot by slot (validation against a swarm
    # whose links were shaped one by one); replacements still draw from up/down_mbps
    links_each: tuple[tuple[float, float], ...] | None = None


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


@dataclass(frozen=True)
class Levers:
    """Changes to p2ptrain's round and averaging rules, each switchable on its own; the
    defaults are p2ptrain's behaviour today (the baseline).

    fill: train until the round's end (T seconds of inner work) whatever the step count,
        instead of at most H steps; the average is weighted by tokens already.
    staged: Moshpit-style staged averaging when a module has more holders than
        target_group_size: every holder gets coordinates in a grid of d = ceil(log_g L)
        axes (L holders listed, g = ceil(L^(1/d)) ≤ target_group_size); stage s averages
        the holders sharing every coordinate but the s-th, weighted by the weight each
        carries forward (see staged_mix). Each stage is a full all-reduce of the module.
        A module-round counts as agreed, all its holders' tokens effective, only when a
        strict majority of the final copies lies within the codec's sync tolerance of the
        true token-weighted mean (mixing tracked on random pseudo-gradients); otherwise
        only the largest last-stage group's carried weight counts.
    coords: how holders get coordinates. "rank": a random permutation (hash of peer id
        and round, sorted) of the holders the peer table lists, written in base g: a
        complete grid but for the peers listed that do not come (needs every holder's
        record of the module). "hash": independent uniform coordinates from hash(peer id,
        round): needs no list, but cells are empty or doubled by chance. "assembled": two
        stages whatever the count, coordinates from the groups matchmaking assembles
        (assembled_rows): complete but for crashes; needs no list, and its groups grow as
        sqrt(holders) (100 at 10,000), past target_group_size beyond 4,096 holders.
    extra_stages: stages beyond d, each on freshly drawn coordinates (more mixing for
        grids with holes, at one more all-reduce each).
    balanced: bandwidth-weighted butterfly shares (hivemind's load_balance_peers given each
        peer's bandwidth): a group takes payload × max(1/b_min, (2n−2)/Σb) instead of
        2(n−1)/n × payload / b_min with equal shares.
    table: "full": one DHT key holding every peer's record, read whole twice per round
        (today); "sampled": per-module record keys of which a lookup reads at most
        sample_records records (bounded cost whatever the swarm size).
    table_contention: also charge the full table's reads to the replicas that store it
        (hivemind stores a key on num_replicas = 5 nodes; every peer reads it at the
        round's end, so the replicas' uplinks serve N × table bytes at once).
    chunk_timeout_s: the sender timeout a group waits for a member that vanished mid
        all-reduce (its slice's reducer timeout, REDUCER_TIMEOUT_FACTOR × this, is what the
        crash costs the group); None: as p2ptrain sets it — sized to the group's slowest
        link when links are declared (with `balanced`: declared_link_chunk_timeout_s), else
        chunk_timeout_s().
    stage_window_rounds: how long (a fraction of the round) a staged module's later stages
        wait for members still busy with the previous stage, instead of one matchmaking
        window: a group late for its stage (a slow link, a member that vanished) then still
        meets the others, instead of averaging alone and re-syncing. p2ptrain:
        averaging.stage_wait (0.2 by default, with overlap only; before 2026-12-06 one window).
    column_fill: with coords "assembled", a short first-stage group's member 0 also takes
        the column the group lacks (double duty, assembled_rows), so every second-stage
        group meets every first-stage group. False: as p2ptrain builds it (staging.py), no
        double duty: all holders search under one first-stage key with plan_stages' target
        and matchmaking fills groups in arrival order (the last short); a member's
        second-stage column is its index in the group it actually got, so a column that a
        short or late group lacks ends with another mean and re-syncs; a member whose first
        stage found nobody skips the second.
    wire_bytes_per_value: the codec's bytes per value instead of the workload's (e.g.
        NF4_BYTES_PER_VALUE, 4-bit with error feedback). Bytes and time only: the copies'
        agreement keeps the workload's sync tolerance, and the codec's effect on loss is
        bench_outer_codecs' to measure.
    """

    fill: bool = False
    staged: bool = False
    coords: str = "rank"
    extra_stages: int = 0
    balanced: bool = False
    table: str = "full"
    sample_records: int = 128
    table_contention: bool = False
    fragments: int = 1
    wire_bytes_per_value: float | None = None
    chunk_timeout_s: float | None = None
    stage_window_rounds: float | None = None
    column_fill: bool = True

    # fragments: streaming sync (Streaming DiLoCo): each round averages 1/fragments of every
    # module (a different fragment each round), so an all-reduce moves payload / fragments.
    # Only its bytes and time are modelled; each fragment is then synced every `fragments`
    # rounds, whose effect on loss is not (Streaming DiLoCo reports parity at 4-8 fragments).

    def label(self) -> str:
        parts = [name for name, on in (("fill", self.fill), ("staged" + (f"-{self.coords}" if self.coords != "rank"
                                                                         else "")
                                                              + (f"+{self.extra_stages}" if self.extra_stages else ""),
                                                              self.staged),
                                       ("balanced", self.balanced), ("sampled table", self.table == "sampled"),
                                       (f"1/{self.fragments} fragments", self.fragments > 1),
                                       ("table contention", self.table_contention),
                                       ("no column fill", self.staged and self.coords == "assembled"
                                        and not self.column_fill)) if on]
        return " + ".join(parts) if parts else "baseline (today)"


DHT_REPLICAS = 5  # hivemind DHTNode num_replicas: the nodes that store (and serve) one key
MIX_PARTS = 16  # parts a module is cut into for the all-reduce (averaging.PARTS_PER_MODULE)


def staged_mix(x: np.ndarray, w: np.ndarray, stage_keys: list[np.ndarray], crash_stage: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Moshpit-style staged averaging of the holders' values x (holders × parts) with
    weights w: at stage s the holders sharing stage_keys[s] average together, each weighted
    by the weight it carries. After a stage every member of a group G holds G's mean, and
    carries W_G / (members of G in its next group), so each group G reaches each next group
    it meets with its whole weight once, however many of its members land there: with
    complete groups (one holder per grid cell, every cell filled) the last stage leaves the
    exact weighted mean everywhere.

    crash_stage[i] = s: holder i dies during stage s: it was the reducer of parts
    p ≡ its rank (mod group size) of its group, which stay un-averaged for the survivors
    (each keeps its own value there, as hivemind's partial all-reduce does); it takes no
    part in later stages. Returns the copies after the last stage (rows of crashed holders
    hold their last value), per stage each holder's group id (−1 once gone), and the
    weight each holder carries at the end."""
    n, parts = x.shape
    y = x.astype(float).copy()
    mass = w.astype(float).copy()
    crash = np.full(n, len(stage_keys)) if crash_stage is None else crash_stage
    groups = []
    for s, key in enumerate(stage_keys):
        alive = crash >= s
        idx = np.flatnonzero(alive)
        gid = np.full(n, -1)
        _, inv = np.unique(key[idx], return_inverse=True)
        gid[idx] = inv
        groups.append(gid)
        n_groups = int(inv.max()) + 1 if len(inv) else 0
        total = np.bincount(inv, weights=mass[idx], minlength=n_groups)
        sums = np.zeros((n_groups, parts))
        np.add.at(sums, inv, mass[idx, None] * y[idx])
        mean = sums / np.maximum(total, 1e-300)[:, None]
        new = mean[inv]
        dying = crash[idx] == s
        if dying.any():
            # the dying member's parts (by its rank in the group) are not reduced
            order = np.lexsort((idx, inv))
            sorted_inv = inv[order]
            starts = np.searchsorted(sorted_inv, np.arange(n_groups))
            rank = np.empty(len(idx), int)
            rank[order] = np.arange(len(idx)) - starts[sorted_inv]
            size = np.bincount(inv, minlength=n_groups)
            unreduced = np.zeros((n_groups, parts), bool)
            for k in np.flatnonzero(dying):
                g = inv[k]
                unreduced[g, np.arange(parts) % size[g] == rank[k]] = True
            keep = unreduced[inv]
            new = np.where(keep, y[idx], new)
        y[idx] = new
        # carried weight: W_G split among G's members that meet in the same next group
        if s + 1 < len(stage_keys):
            nxt = stage_keys[s + 1][idx]
            _, pair = np.unique(np.stack([inv, nxt]), axis=1, return_inverse=True)
            pair = pair.reshape(-1)
            mass[idx] = total[inv] / np.bincount(pair)[pair]
        else:
            mass[idx] = total[inv]
    return y, groups, mass


def assembled_rows(n: int, stages: int = 2) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Coordinates from the groups matchmaking actually assembles (coords = "assembled", two
    stages): the n arriving holders form B = ceil(n / ceil(sqrt(n))) first-stage groups of
    as equal sizes as can be (q + 1 or q members; matchmaking's target size set from the
    holder count), in arrival order; a member's second coordinate is its index in its group
    (peer ids sorted). A group of q members covers the missing index q by double duty: its
    member 0 also joins second-stage group q (a weight-0 row that holds its group's mean
    after stage 1). Every second-stage group then meets every first-stage group once: exact.
    Returns each row's owner (rows 0..n−1 are the members themselves), the per-stage keys and
    the group size each row's group expects. Stages beyond two repeat the pair."""
    n_groups = max(1, math.ceil(n / max(1, math.ceil(math.sqrt(n) - 1e-9))))
    q, rem = divmod(n, n_groups)
    sizes = np.where(np.arange(n_groups) < rem, q + 1, q)
    b = np.repeat(np.arange(n_groups), sizes)
    k = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    short = np.flatnonzero(sizes == q) if rem else np.zeros(0, int)
    firsts = np.cumsum(sizes) - sizes
    owner = np.concatenate([np.arange(n), firsts[short]])
    first = np.concatenate([b, short])
    second = np.concatenate([k, np.full(len(short), q)])
    expect = (np.full(len(owner), int(sizes.max())), np.full(len(owner), n_groups))
    keys = [first, second] * ((stages + 1) // 2)
    return owner, keys[:stages], [expect[i % 2] for i in range(stages)]


def built_rows(n: int, target_group_size: int, listed: int | None = None
               ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Coordinates as p2ptrain's staging.py assigns them (Levers.column_fill = False): one
    first-stage key for every holder, groups of plan_stages' first size (planned for the
    `listed` holders the peer table shows, n by default) as matchmaking fills them with the
    n that come; the second stage's key, a member's index in its first-stage group, is
    known only once that group has met (staged_timing sets it). Same returns as
    assembled_rows."""
    plan = plan_stages(listed or n, target_group_size, staged=True)
    first, n_groups = (plan.first_size, plan.second_size) if plan.stages == 2 else (n, 1)
    keys = [np.zeros(n, int), np.zeros(n, int)]
    return np.arange(n), keys, [np.full(n, first), np.full(n, n_groups)]


def index_in_group(group: np.ndarray, peer_id: np.ndarray) -> np.ndarray:
    """Each row's index in its group, members sorted by peer id; rows with group −1 (gone)
    get −1."""
    order = np.lexsort((peer_id, group))
    index = np.full(len(group), -1)
    g = group[order]
    start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(len(g)) - np.repeat(start, np.diff(np.r_[start, len(g)]))
    index[order] = rank
    return np.where(group >= 0, index, -1)


def window_groups(t: np.ndarray, window: float, target: int, cap: int, lone_wait: float
                  ) -> tuple[np.ndarray, list[float]]:
    """Groups as hivemind's matchmaking assembles them from ready times `t` (sorted): the first
    ready opens a window, those ready within it join (at most `cap`); a group holding `target`
    starts at its last arrival, a smaller one when its window closes, a lone one after
    `lone_wait` (its search, in vain: it goes on alone). Each row's group (0, 1, …) and each
    group's start."""
    group = np.empty(len(t), int)
    starts: list[float] = []
    i = 0
    while i < len(t):
        k = min(int(np.searchsorted(t, t[i] + window, side="right")), i + cap)
        size = k - i
        group[i:k] = len(starts)
        starts.append(t[k - 1] if size >= target else t[i] + (lone_wait if size == 1 else window))
        i = k
    return group, starts


def grid_keys(coords: np.ndarray, dims: int) -> list[np.ndarray]:
    """Per stage s: the group key of each holder, its coordinates with the s-th left out."""
    n, d = coords.shape
    keys = []
    for s in range(d):
        other = np.delete(coords, s, axis=1)
        keys.append(np.ravel_multi_index(other.T, (dims,) * (d - 1)) if d > 1 else np.zeros(n, int))
    return keys


def grid_shape(listed: int, tgs: int) -> tuple[int, int]:
    """Stages d and side g of the grid for `listed` holders and groups of at most tgs."""
    d = max(1, math.ceil(math.log(listed) / math.log(tgs) - 1e-12)) if listed > 1 else 1
    return d, max(1, math.ceil(listed ** (1 / d) - 1e-9))


def rank_coords(perm_rank: np.ndarray, d: int, g: int) -> np.ndarray:
    """Coordinates of each holder from its rank in the listed holders, in base g."""
    return np.stack(np.unravel_index(perm_rank, (g,) * d), axis=1) if d > 1 else perm_rank[:, None] * 0


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
    machines = draw_machines(rng, vol, n, 0.0)
    if vol.step_s_each is not None:  # drawn anyway, so the other draws stay the same
        machines["step_s"] = np.resize(np.asarray(vol.step_s_each, float), n)
    if vol.links_each is not None:
        up, down = np.asarray(vol.links_each, float).T
        machines["up"], machines["down"] = np.resize(up, n) * MBIT, np.resize(down, n) * MBIT
    return Peers(path=np.arange(n) % n_paths, **machines)


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
        # a crashed member: survivors wait out its parts and its slice's averages, then skip its slice
        penalty = partial * REDUCER_TIMEOUT_FACTOR * chunk_timeout_s(work.averaging_timeout)
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
                 join_spread_rounds: float = 2.0, levers: Levers = Levers()):
        self.work, self.vol, self.over, self.n = work, vol, over, n_peers
        self.levers = levers
        self.rng = np.random.default_rng(seed)
        self.T = float(work.round_seconds)
        self.modules = list(work.module_params)
        self.holds_by_path = np.zeros((len(work.paths), len(self.modules)), bool)
        for p, path in enumerate(work.paths):
            self.holds_by_path[p, [self.modules.index(m) for m in path]] = True
        bytes_per_value = levers.wire_bytes_per_value or work.bytes_per_value
        self.chunk_timeout_s = levers.chunk_timeout_s or chunk_timeout_s(work.averaging_timeout)
        # declared links (the balanced lever needs them): the timeout follows each group's slowest link
        self.links_declared = levers.balanced and levers.chunk_timeout_s is None
        self.payload = np.array([work.module_params[m] * bytes_per_value for m in self.modules])
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
        self.group_override: list[np.ndarray] = []  # staged: the share every member keeps (NaN: by group size)
        self.group_agreed: list[np.ndarray] = []  # staged: copies agreed after the stages (NaN: not staged)
        self.member_size: list[np.ndarray] = []  # the group size a member reports (staged: mean over stages)
        self.member_sent: list[np.ndarray] = []  # payloads it sends: Σ over its all-reduces of 2(n−1)/n
        self.staged_stats: list[tuple] = []  # (module, round, holders, stages, agreed, median and max deviation)
        self.n_groups = 0
        self.departures = self.crashes = 0
        self.round = 0  # the last round simulated

    # --------------------------------------------------------------- helpers

    def entry_round(self) -> np.ndarray:
        """The round each slot enters next: the first with 1.5 of its steps still left."""
        r = np.ceil((self.ready + ENTER_MIN_STEPS * self.peers.step_s) / self.T).astype(int)
        return np.maximum(np.maximum(r, 1), self.min_round)

    def table_fetch_s(self, slots: np.ndarray) -> np.ndarray:
        """One read of the peer table. Full: one DHT key, a signed record per live peer.
        Sampled: per-module keys, each bucket holding at most sample_records records, one
        bucket read per module of the path, in parallel. With table_contention, the key's
        replicas serve every reader at once (all read at the round's end)."""
        lev, rec = self.levers, self.over.record_bytes
        hops = max(1.0, math.log2(self.n))
        median_up = float(np.median(self.peers.up))
        if lev.table == "sampled":
            holders = self.holds.sum(axis=1)
            per_module = np.minimum(holders, lev.sample_records) * rec
            read = (self.holds[:, slots] * per_module[:, None]).sum(axis=0)
            # buckets of at most sample_records records, each read by the holders it lists
            per_bucket = holders / np.maximum(np.ceil(holders / lev.sample_records), 1)
            serve = float((per_bucket ** 2).max()) * rec / (DHT_REPLICAS * median_up)
        else:
            read = np.full(len(slots), self.n * rec, float)
            serve = self.n * self.n * rec / (DHT_REPLICAS * median_up)
        client = read / self.peers.down[slots] + self.peers.rtt[slots] * hops
        return np.maximum(client, serve) if lev.table_contention else client

    def download_s(self, slots: np.ndarray, module: int | None = None) -> np.ndarray:
        """Downloading a path's state (fp32 params + momentum) from peers, or one module's
        (a re-sync after the post-round check)."""
        params = self.path_params[slots] if module is None else self.params[module]
        return STATE_BYTES_PER_PARAM * params / np.minimum(self.peers.down[slots], np.median(self.peers.up))

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
            self.ghost_until += list(left_at[seen] + record_ttl(self.T))
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
            fits = np.floor((end - self.ready[slots]) / step)
            # fill: train until the round's end whatever the step count; else at most H steps
            steps = (fits if self.levers.fill else np.minimum(H, fits)).astype(int)
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
            # a peer's link is shared by its modules in proportion to the bytes each moves this
            # round (a staged module: one payload per stage), so without waits they end together
            stages = np.ones(len(self.modules))
            if self.levers.staged:
                listed = self.holds[:, slots].sum(axis=1) + ghosts
                for j in np.flatnonzero(listed > tgs):
                    stages[j] = ((2 if self.levers.coords == "assembled" else grid_shape(int(listed[j]), tgs)[0])
                                 + self.levers.extra_stages)
            self.stage_bytes = self.payload * stages
            self.path_bytes = self.holds.T @ self.stage_bytes
            member_local: list[tuple[int, np.ndarray, np.ndarray]] = []  # (module, local member idx, group id)
            for j in range(len(self.modules)):
                local = np.flatnonzero(self.holds[j, slots])
                if not len(local):
                    continue
                local = local[np.argsort(arrive[local], kind="stable")]
                if self.levers.staged and len(local) + int(ghosts[j]) > tgs:
                    ends, group_ids = self.average_staged(j, r, slots, local, arrive, crashing, int(ghosts[j]), tgs,
                                                          steps[local] * work.tokens_per_step)
                else:
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
        group_of, starts = window_groups(t, mm, target, tgs, lone_wait=3 * mm)
        n_groups = len(starts)
        start = np.array(starts)
        sizes = np.bincount(group_of, minlength=n_groups)
        link = np.minimum(self.peers.up[members], self.peers.down[members])
        share = link * self.stage_bytes[j] / self.path_bytes[members]  # a link is shared by the path's modules
        transfer = self.group_transfer_s(j, sizes, group_of, share, self.peers.rtt[members])
        # a crash costs the group only while its all-reduce runs: a member that vanishes after
        # the group is done (while the next round trains) is only missing from the next round
        died = crashing[local] & (self.peers.session_end[members] < (start + transfer)[group_of])
        partial = np.zeros(n_groups, bool)
        np.logical_or.at(partial, group_of, died)
        partial &= sizes > 1
        # a crashed member: survivors wait out its parts and its slice's averages, then skip its slice
        penalty = partial * self.crash_cost_s(j, sizes, group_of, share)
        base = self.n_groups
        self.n_groups += n_groups
        self.group_module.append(np.full(n_groups, j))
        self.group_round.append(np.full(n_groups, r))
        self.group_size.append(sizes)
        self.group_partial.append(partial)
        self.group_override.append(np.full(n_groups, np.nan))
        self.group_agreed.append(np.full(n_groups, np.nan))
        self.member_size.append(sizes[group_of].astype(float))
        self.member_sent.append(2 * (sizes[group_of] - 1) / sizes[group_of])
        ends = (start + transfer + penalty)[group_of]
        # copies off a strict majority's group: the post-round check re-syncs them from it,
        # downloading the state (their tokens are lost, see survivors); no strict majority: nobody moves
        if n_groups > 1 and 2 * sizes.max() > n:
            off = group_of != int(np.argmax(sizes))
            ends[off] += self.download_s(members[off], j)
        return ends, base + group_of

    def crash_cost_s(self, j: int, sizes: np.ndarray, group_of: np.ndarray, link: np.ndarray) -> np.ndarray:
        """What a member vanishing mid all-reduce adds to each group's all-reduce of module j:
        the reducer timeout of its slice (`link`: each member's share of its link for j, in
        proportion to j's bytes in its path, so that module j's bytes over it are the path's
        bytes over the whole link)."""
        if not self.links_declared:
            return np.full(len(sizes), REDUCER_TIMEOUT_FACTOR * self.chunk_timeout_s)
        slowest = np.full(len(sizes), np.inf)
        np.minimum.at(slowest, group_of, link)
        payload = self.payload[j] / self.levers.fragments
        return REDUCER_TIMEOUT_FACTOR * declared_link_chunk_timeout_s(payload, sizes, slowest,
                                                                      self.work.averaging_timeout)

    def group_transfer_s(self, j: int, sizes: np.ndarray, group_of: np.ndarray, link: np.ndarray,
                         rtt: np.ndarray) -> np.ndarray:
        """Each group's butterfly all-reduce of module j: 4 RTT plus the payload over the
        members' links (`link`: each member's share of its link for this module). Equal
        shares: 2(n−1)/n × payload / the slowest link. Balanced (hivemind's
        load_balance_peers, given bandwidths): peer i moves payload × (1 + (n−2) f_i) for
        its share f_i; the LP's optimum is payload × max(1/b_min, (2n−2)/Σb)."""
        n_groups = len(sizes)
        slowest = np.full(n_groups, np.inf)
        np.minimum.at(slowest, group_of, link)
        total = np.bincount(group_of, weights=link, minlength=n_groups)
        worst_rtt = np.zeros(n_groups)
        np.maximum.at(worst_rtt, group_of, rtt)
        if self.levers.balanced:
            per_byte = np.maximum(1 / slowest, (2 * sizes - 2) / np.maximum(total, 1e-300))
        else:
            per_byte = 2 * (sizes - 1) / np.maximum(sizes, 1) / slowest
        payload = self.payload[j] / self.levers.fragments
        return np.where(sizes > 1, payload * per_byte + ALLREDUCE_RTTS * worst_rtt, 0.0)

    def staged_timing(self, j: int, keys: list[np.ndarray], crash_stage: np.ndarray, owner: np.ndarray,
                      real: np.ndarray, coverage: np.ndarray, arrive_rows: np.ndarray, link: np.ndarray,
                      rtt: np.ndarray, expected_size: list[np.ndarray], peer_id: np.ndarray
                      ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
        """Stage by stage, the groups matchmaking assembles and when each row is done. Rows
        sharing a stage's key meet as hivemind's matchmaking meets them (average_module's
        rule): the first to be ready opens a window of matchmaking_time; those ready within
        it join, and the group starts when it holds every row the key expects, else when the
        window closes; rows ready later form the next group the same way (late rows are not
        waited for: they average among themselves, or alone after the 3-window search). A
        member dying in a stage costs its group the crash cost. Returns per stage each row's
        end time and its group key (the stage key split by window), each member's summed
        group size (per row covered) and the share of its payload it sent. peer_id: each
        row's peer id, as an integer (the order within a group, for Levers.column_fill)."""
        lev, work, mm = self.levers, self.work, self.work.matchmaking_time
        n_rows, n = len(owner), len(coverage)
        t = arrive_rows.astype(float).copy()
        size_sum = np.zeros(n)
        sent = np.zeros(n)
        ends, split_keys = [], []
        as_built = lev.coords == "assembled" and not lev.column_fill
        for s, key in enumerate(keys):
            expected = expected_size[s]
            if as_built and s == 1:
                # the column: the index in the first-stage group it got; a member whose first
                # stage found nobody does not search again (p2ptrain skips its second stage)
                first_sizes = np.bincount(gid[gid >= 0])
                lone = (gid >= 0) & (first_sizes[np.maximum(gid, 0)] == 1)
                key = np.where(lone, -2 - np.arange(n_rows), index_in_group(gid, peer_id))
                expected = np.where(lone, 1, expected)
            alive_rows = crash_stage >= s
            # a double duty (weight 0) rides along in its owner's first-stage group: no extra bytes
            moving = alive_rows & (real | (s > 0) | (lev.coords != "assembled"))
            alive = np.flatnonzero(moving)
            order = alive[np.lexsort((t[alive], key[alive]))]
            gid = np.full(n_rows, -1)
            starts = []
            window = mm if s == 0 or lev.stage_window_rounds is None else max(mm, lev.stage_window_rounds * self.T)
            bounds = np.flatnonzero(np.diff(key[order])) + 1
            # a lone row searched max(3 windows, the wait and one window) in vain: it goes on alone
            lone_wait = max(3 * mm, window + mm if window > mm else 0.0)
            for block in np.split(order, bounds):
                target = int(expected[block].max())
                block_group, block_starts = window_groups(t[block], window, target, max(target, 1), lone_wait)
                gid[block] = len(starts) + block_group
                starts += block_starts
            start = np.array(starts)
            gi = gid[alive]
            ng = len(starts)
            sizes = np.bincount(gi, minlength=ng)
            transfer = self.group_transfer_s(j, sizes, gi, link[alive], rtt[alive])
            partial = np.zeros(ng, bool)
            np.logical_or.at(partial, gi, crash_stage[alive] == s)
            penalty = (partial & (sizes > 1)) * self.crash_cost_s(j, sizes, gi, link[alive])
            done = start + transfer + penalty
            riding = np.flatnonzero(alive_rows & ~moving)
            gid[riding] = gid[owner[riding]]
            t = t.copy()
            t[alive] = done[gi]
            t[riding] = done[gid[riding]]
            ends.append(t)
            split_keys.append(np.where(gid >= 0, gid, ng + np.arange(n_rows)))  # gone rows: keys of their own
            np.add.at(size_sum, owner[alive], sizes[gi] / coverage[owner[alive]])
            np.add.at(sent, owner[alive], 2 * (sizes[gi] - 1) / sizes[gi])
        return ends, split_keys, size_sum, sent

    def average_staged(self, j: int, r: int, slots: np.ndarray, local: np.ndarray, arrive: np.ndarray,
                       crashing: np.ndarray, ghosts: int, tgs: int, tokens: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Module j's holders average in stages (Levers.staged): the listed holders (those
        arriving plus `ghosts`, listed but not coming: empty cells) get grid coordinates;
        stage s's group starts when its last member is done with stage s−1 (plus the
        matchmaking window if a listed member is missing) and takes one all-reduce. A
        crashing member dies in the stage its session ends in (timed as if nobody crashed),
        or costs nothing if it ends after its last stage. The copies' mixing is tracked on
        random pseudo-gradients (staged_mix). Logs one accounting group for the module-round."""
        lev, work = self.levers, self.work
        members = slots[local]
        n = len(members)
        listed = n + ghosts
        d, g = (2, 0) if lev.coords == "assembled" else grid_shape(listed, tgs)
        stages = d + lev.extra_stages
        if lev.coords == "assembled":
            if not lev.column_fill and stages != 2:
                raise ValueError("p2ptrain's staging (column_fill = False) has two stages: no extra_stages")
            owner, keys, expected_size = assembled_rows(n, stages) if lev.column_fill else built_rows(n, tgs, listed)
        else:
            owner = np.arange(n)
            keys = []
            while len(keys) < stages:
                if lev.coords == "rank":  # rank in a random order of the listed holders (members first)
                    coords = rank_coords(self.rng.permutation(listed), d, g)
                else:
                    coords = self.rng.integers(0, g, (listed, d))
                keys += grid_keys(coords, g)[:stages - len(keys)]
            # a group waits out the window when a holder the table lists with its key is missing
            expected_size = []
            for k in keys:
                _, inv, count = np.unique(k, return_inverse=True, return_counts=True)
                expected_size.append(count[inv.reshape(-1)[:n]])
            keys = [k[:n] for k in keys]
        real = owner == np.arange(len(owner))  # a member's own row; others are its double duties
        x = self.rng.standard_normal((n, MIX_PARTS))
        w = np.maximum(tokens.astype(float), 1.0)
        coverage = np.bincount(owner, minlength=n)
        # a member covering c rows has 1/c of its link for each
        link = (np.minimum(self.peers.up[members], self.peers.down[members]) * self.stage_bytes[j]
                / self.path_bytes[members] / coverage)[owner]
        rtt = self.peers.rtt[members][owner]
        arrive_rows = arrive[local].astype(float)[owner]
        # in which stage does a crashing member's session end? timed as if nobody crashed
        no_crash = np.full(len(owner), stages)
        peer_id = members[owner]  # any fixed order stands in for peer ids
        stage_ends, _, _, _ = self.staged_timing(j, keys, no_crash, owner, real, coverage, arrive_rows, link, rtt,
                                                 expected_size, peer_id)
        session_end = self.peers.session_end[members]
        crash_member = np.full(n, stages)
        for s in reversed(range(stages)):
            crash_member[crashing[local] & (session_end < stage_ends[s][:n])] = s
        crash_stage = crash_member[owner]
        stage_ends, met_keys, size_sum, sent = self.staged_timing(j, keys, crash_stage, owner, real, coverage,
                                                                  arrive_rows, link, rtt, expected_size, peer_id)
        y_rows, groups, _ = staged_mix(x[owner], np.where(real, w[owner], 0.0), met_keys, crash_stage)
        y = y_rows[:n]
        t = stage_ends[-1]
        t_member = np.full(n, -np.inf)
        np.maximum.at(t_member, owner, t)
        t = t_member
        groups = [np.where(real, gr, -1)[:n] for gr in groups]
        crash_stage = crash_member
        # did the copies agree? a strict majority of the surviving copies within the codec's
        # tolerance (in units of the pseudo-gradients' spread) of one center: the true weighted
        # mean, or one of 16 surviving copies (a lineage that agrees with itself, off the mean)
        true = (w[:, None] * x).sum(axis=0) / w.sum()
        spread = x.std()
        deviation = np.sqrt(((y - true) ** 2).mean(axis=1)) / spread
        survivors_ = np.flatnonzero(crash_stage == stages)
        centers = np.vstack([true[None], y[self.rng.choice(survivors_, min(16, len(survivors_)), replace=False)]]) \
            if len(survivors_) else true[None]
        near = np.sqrt(((y[None, survivors_] - centers[:, None]) ** 2).mean(axis=2)) / spread <= work.sync_tolerance
        best = int(np.argmax(near @ w[survivors_])) if len(survivors_) else 0
        agreed = bool(len(survivors_)) and 2 * int(near[best].sum()) > len(survivors_)
        # agreed: the agreed copy carries every holder's tokens but those of the surviving copies
        # off it (a group late for a stage averaged without the rest: its tokens are not in the
        # majority's copy), which re-sync to it, downloading the state; else, as for split groups
        # today, only the largest agreeing cluster's own tokens count
        off = survivors_[~near[best]] if agreed else np.zeros(0, int)
        share = (1.0 - float(w[off].sum() / w.sum()) if agreed else
                 (float(w[survivors_][near[best]].sum() / w.sum()) if len(survivors_) else 0.0))
        t[off] += self.download_s(members[off], j)
        self.staged_stats.append((j, r, n, stages, agreed, float(np.median(deviation[survivors_]))
                                  if len(survivors_) else math.nan,
                                  float(deviation[survivors_].max()) if len(survivors_) else math.nan))
        base = self.n_groups
        self.n_groups += 1
        self.group_module.append(np.array([j]))
        self.group_round.append(np.array([r]))
        self.group_size.append(np.array([n]))
        self.group_partial.append(np.array([False]))
        self.group_override.append(np.array([min(share, 1.0)]))
        self.group_agreed.append(np.array([float(agreed)]))
        self.member_size.append(size_sum / np.maximum((np.stack(groups) >= 0).sum(axis=0), 1))
        self.member_sent.append(sent)
        return t, np.full(n, base)

    # --------------------------------------------------------------- what it yields

    def columns(self) -> dict[str, np.ndarray]:
        out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.rows.items()}
        for name in ("group_module", "group_round", "group_size", "group_partial", "member_group", "member_row",
                     "member_module", "group_override", "group_agreed", "member_size", "member_sent"):
            parts = getattr(self, name)
            out[name] = np.concatenate(parts) if parts else np.zeros(0, int)
        return out


def simulate_aligned(work: Workload, vol: Volunteers, over: Overheads, n_peers: int, rounds: float = 12,
                     seed: int = 0, join_spread_rounds: float = 2.0, max_schedule_rounds: int = 2000,
                     levers: Levers = Levers()) -> dict:
    """Run the aligned schedule (peers joining at random moments over the first
    join_spread_rounds) until the median peer slot has taken part in `rounds` rounds after
    its second; report those steady rounds (from the median slot's second participation)."""
    swarm = AlignedSwarm(work, vol, over, n_peers, seed, join_spread_rounds, levers)
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
    # staged module-rounds (one accounting group each): their share and majority come from the mixing check
    override = c["group_override"].astype(float)
    share = np.where(np.isnan(override), share, override)
    agreed = c["group_agreed"].astype(float)
    all_keys_, first_group = np.unique(key, return_index=True)
    staged_key = ~np.isnan(agreed[first_group])
    majority = np.where(staged_key, agreed[first_group] > 0, majority)
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
    member_size = c["member_size"].astype(float)
    is_stem = np.array([m == "stem" for m in swarm.modules])[c["member_module"]]
    bytes_row = np.zeros(swarm.n_rows)
    np.add.at(bytes_row, c["member_row"], c["member_sent"] * swarm.payload[c["member_module"]] / levers.fragments)
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
        "levers": levers.label(), "table_fetch_s": float(np.median(swarm.table_fetch_s(np.arange(n_peers)))),
        "staged": staged_summary(swarm.staged_stats, warmup),
        # per slot (its path: slot % paths), steady rounds: median steps and tokens per round, compute / wall
        "by_peer": {"path": [int(x) for x in swarm.peers.path],
                    "steps_per_round": [float(np.median(tokens[counted & (peer == s)] / work.tokens_per_step))
                                        if (counted & (peer == s)).any() else 0.0 for s in range(n_peers)],
                    "utilization": [float(u) for u in np.bincount(p, weights=c["compute_s"][window],
                                                                  minlength=n_peers)
                                    / np.maximum(np.bincount(p, weights=c["wall_s"][window], minlength=n_peers),
                                                 1e-12)],
                    "outer_s": [float(np.median(c["outer_s"][counted & (peer == s)]))
                                if (counted & (peer == s)).any() else 0.0 for s in range(n_peers)]},
    }


def staged_summary(stats: list[tuple], warmup: int) -> dict:
    """Staged module-rounds in the steady window: how many, their stages, the share whose
    copies agreed, and the copies' deviation from the true weighted mean (in units of the
    pseudo-gradients' spread)."""
    rows = [s for s in stats if s[1] > warmup]
    if not rows:
        return {"module_rounds": 0}
    return {"module_rounds": len(rows), "stages_max": int(max(s[3] for s in rows)),
            "agreed_fraction": float(np.mean([s[4] for s in rows])),
            "deviation_median": float(np.nanmedian([s[5] for s in rows])),
            "deviation_max": float(np.nanmax([s[6] for s in rows]))}


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
             seed: int = 0, model: str = "aligned", random_phase: bool = True, join_spread_rounds: float = 2.0,
             levers: Levers = Levers()) -> dict:
    """model "aligned": p2ptrain's round rule (simulate_aligned); "steps": the step-counted
    rule it replaced (simulate_steps), with peers in phase or at random phases."""
    if model == "aligned":
        return simulate_aligned(work, vol, over, n_peers, rounds, seed, join_spread_rounds, levers=levers)
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
