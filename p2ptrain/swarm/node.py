"""The swarm round driver: inner steps until the round's end on the swarm's clock, then a
DiLoCo outer step per module averaged with the module's holders, then a majority check
of every module's state, progress records and a checkpoint.

Round rule (see schedule.py): round r ends at the same DHT time on every node. A node
trains until then (a step that would end after the deadline is not started; at most
4 × inner.steps_per_round steps, or inner.steps_per_round with averaging.fill_round off),
then looks for the holders of each module, who arrive at the same moment. Peers that
arrive within the matchmaking window (at most 3× it) average together, weighted by
tokens; a module whose holders are all gone or suspended is updated with the node's own
pseudo-gradient without waiting. So a slow peer delays fast ones by at most the window,
and a lone peer never waits at all. A module with more live holders than one group holds
averages in two stages (staging.py); with averaging.fragments > 1 a round averages one
slice of each module; with averaging.peer_buckets > 1 the node reads a sample of the peer
records (records.py) and sizes its groups from it.

Threads and what each owns:
  * the driver (this file's `run`): the local model, the inner optimizer, the history;
  * the overlap thread (averaging.overlap): module globals while a background round runs;
  * the heartbeat: only reads (`status_record`) and publishes the peer record;
  * hivemind's fetch thread: reads a module's state under its slot lock to serve it.
Module globals, their round and their last step size are guarded by each slot's lock.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from p2ptrain.errors import DHTProcessExited
from p2ptrain.model.grid import path_name
from p2ptrain.run_state import RunState
from p2ptrain.swarm.admission import Admission
from p2ptrain.swarm.averaging import sync_tolerance
from p2ptrain.swarm.consistency import Vouch, choose_lineage, judge, voters_to_wait_for
from p2ptrain.swarm.healing import RecentPartners, heal_tie
from p2ptrain.swarm.membership import peers_holding
from p2ptrain.swarm.overlap import Anchors, BackgroundRound, FragmentRebase
from p2ptrain.swarm.protocol import Rejections, RoundClaim, parse
from p2ptrain.swarm.records import (ModuleSync, PeerRecord, SwarmRecords, heartbeat_period, new_peer_record,
                                    peer_record_ttl, status_record_fields)
from p2ptrain.swarm.schedule import RoundSchedule, search_seconds, stage_wait_seconds
from p2ptrain.swarm.slot import ModuleSlot, max_steps_per_round, tokens_per_round
from p2ptrain.swarm.staging import StagePlan, plan_stages, stage_group_bits, stage_two_weight_rounds
from p2ptrain.swarm.state_transfer import fetch_verified_state
from p2ptrain.swarm.suspension import Suspension
from p2ptrain.train.offload import off_device
from p2ptrain.train.session import PathSession

logger = logging.getLogger(__name__)

SYNC_POLL_S, SYNC_POLL_MAX_S = 0.2, 2.0  # reads of the holders' post-round fingerprints
# what a node does after a search that found nobody, or after its wait for the holders'
# fingerprints, before it can enter the next round: a fingerprint read and the record's store
# (DHT calls of ~0.1-1 s on a loaded machine)
AFTER_SEARCH_S = 1.5
CATCH_UP_ATTEMPTS = 3  # reads of the holders' records before a newcomer starts from its own state
STOP_GRACE_S = 30.0  # how long a stopping node lets the averaging in flight finish (systemd waits 90 s)


@dataclass
class ModuleRound:
    """What happened to one module in one round."""

    group: list[str] = field(default_factory=list)  # peer ids that averaged together (incl. us)
    alone: bool = False
    rejected: str | None = None  # why the average was not used, if it was not
    resynced_from: str | None = None
    partial: bool = False  # some values were left un-averaged by a failed reducer (skipped this round)
    split: bool = False  # holders disagree and no majority decides (nobody adopted another's state)
    healed_with: list[str] = field(default_factory=list)  # a split: tied holders whose states we averaged in
    failed: str | None = None  # the round's averaging itself failed (an error on the averaging thread)
    voters: int = 0  # holders whose fingerprints for this round were compared
    lying_reducers: list[str] = field(default_factory=list)  # reducers whose returned slice we refused
    # measured by the averager: from asking for a group to its forming, then the all-reduce;
    # wire bytes of tensor parts both ways (None: the module did not average this round)
    seconds_matchmaking: float | None = None
    seconds_allreduce: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    # the all-reduce's chunk timeout and the longest waits for a sender's next part and a
    # reducer's next average (None: the module did not average this round)
    chunk_timeout: float | None = None
    longest_sender_wait: float | None = None
    longest_reducer_wait: float | None = None
    expected: set[str] = field(default_factory=set, repr=False)  # live holders when the round began
    stage_groups: list[int] = field(default_factory=list)  # staged averaging: each stage's group size

    @property
    def outcome(self) -> str:
        return ("failed" if self.failed else "rejected" if self.rejected else "resynced" if self.resynced_from
                else "healed" if self.healed_with else "split" if self.split else "partial" if self.partial
                else "alone" if self.alone else "ok")


@dataclass
class RoundReport:
    round: int
    loss: float
    tokens: int
    tokens_per_s: float
    seconds_inner: float
    seconds_outer: float  # training stalled for averaging (with overlap: waiting for last round's)
    modules: dict[str, ModuleRound] = field(default_factory=dict)
    seconds_wall: float = 0.0  # the whole round, checkpoint included
    # where seconds_outer went (plain averaging): "average" (peer table read, matchmaking,
    # all-reduce and outer step of every module), "publish" (this node's record), "verify"
    # (waiting for the group's fingerprints, and any re-sync or healing), "checkpoint" (its start)
    outer_phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Landing:
    """Overlap: the last round's averaging, landed when `run()` stops. Each round report
    holds the averaging that landed during it (the round before's), so this one is in
    none of them."""

    round: int
    modules: dict[str, ModuleRound] = field(default_factory=dict)


# A reducer whose slice we refuse is banned at once only when the slice is far past the
# reducer check's bound (a garbage reducer's were 16–24× past it, NaN is infinitely). A
# slice just past it can come from an honest reducer: in a fault test one returned a slice
# 1.08× the bound (its aggregate, by our reading of the log, had missed a late part and
# kept the liar's). Banning it split the honest peers' groups for the 600 s ban, and they
# ended 0.22 apart (2026-12-05). Refused slices are still never used, and a reducer
# refused LIE_STRIKES times is banned whatever the margin.
GROSS_LIE = 4.0
LIE_STRIKES = 3


def bans_lying_reducer(excess: float, refused: int) -> bool:
    """Whether to ban a reducer whose slice we refused: `excess` is how many times past the
    reducer check's bound the slice was (inf: non-finite), `refused` how many of its slices
    we have refused so far, this one included."""
    return excess >= GROSS_LIE or refused >= LIE_STRIKES


def max_known(a: float | None, b: float | None) -> float | None:
    """The larger of two measurements, either of which may be missing (None)."""
    return b if a is None else a if b is None else max(a, b)


# A round's last step, when a whole one would end after the round's end: a shorter batch
# sized to the time left (whole steps left ~0.3 s of each 16 s demo round unused, measured).
# A step of a fraction f of the batch is taken to last (a + (1 - a) f) whole steps: a is the
# part that does not shrink with the batch (the optimizer update, launches; near 1 on a GPU
# that a small batch leaves idle), learnt from the node's own shorter steps, starting from a
# cautious guess. The step must fit in LAST_STEP_MARGIN of the time left, and take at least a
# quarter of the batch (a smaller one buys little for a whole optimizer update).
LAST_STEP_MARGIN = 0.8
LAST_STEP_MIN_FRACTION = 0.25
LAST_STEP_FIXED_GUESS = 0.25


class StepDeadline:
    """`should_stop` for the inner loop: stop before a step that would end after `end`
    (estimated from the previous steps), when stopping, or when suspended; and
    `last_step_rows`: how many sequences a shorter last step may take instead."""

    def __init__(self, schedule: RoundSchedule, end: float, stop: threading.Event, suspension: Suspension,
                 step_seconds: float, fixed_fraction: float = LAST_STEP_FIXED_GUESS):
        self.schedule, self.end, self.stop, self.suspension = schedule, end, stop, suspension
        self.step_seconds = step_seconds  # running estimate of one step, carried across rounds
        self.fixed_fraction = fixed_fraction  # a, above: carried across rounds too
        self._last: Optional[float] = None
        self._shorter: Optional[tuple[float, float]] = None  # (start, fraction of the batch) of a shorter step

    def __call__(self) -> bool:
        now = self.schedule.clock()
        if self._last is not None:
            self.step_seconds = 0.7 * self.step_seconds + 0.3 * (now - self._last)
        self._last = now
        return self.stop.is_set() or self.suspension.active or now + self.step_seconds > self.end

    def last_step_rows(self, batch: int) -> int:
        """Sequences of a last step that ends before the round's end, fewer than `batch`; 0
        when stopping, suspended, or too little time is left for a quarter of the batch.
        (step_seconds is the estimate of a whole batch's step, and stays so: the inner loop
        ends after a shorter step.)"""
        if self.stop.is_set() or self.suspension.active or self.step_seconds <= 0 or self.fixed_fraction >= 1:
            return 0
        now = self.schedule.clock()
        fits = LAST_STEP_MARGIN * (self.end - now) / self.step_seconds  # in whole steps
        rows = int(batch * (fits - self.fixed_fraction) / (1 - self.fixed_fraction))
        if not max(1, math.ceil(batch * LAST_STEP_MIN_FRACTION)) <= rows < batch:
            return 0
        self._shorter = (now, rows / batch)
        return rows

    def finished(self) -> None:
        """The inner loop returned: learn the fixed part of a step from a shorter last step."""
        if self._shorter is None or self.step_seconds <= 0:
            return
        start, fraction = self._shorter
        self._shorter = None
        took = (self.schedule.clock() - start) / self.step_seconds  # in whole steps
        observed = min(max((took - fraction) / (1 - fraction), 0.0), 1.0)
        self.fixed_fraction = 0.5 * self.fixed_fraction + 0.5 * observed


class SwarmNode:
    def __init__(self, run_state: RunState, session: PathSession, dht, records: SwarmRecords,
                 schedule: RoundSchedule, client_mode: bool = False, maddrs: list[str] | None = None,
                 feed=None, upload_mbps: float | None = None):
        self.run_state = run_state
        self.cfg = run_state.config
        self.session = session
        self.dht = dht
        self.records = records
        self.schedule = schedule
        records.record_ttl_s = peer_record_ttl(schedule.round_seconds)  # a creator never read the run record
        self.client_mode = client_mode
        self.maddrs = maddrs or []
        self.peer_id = dht.peer_id.to_base58()
        self.feed = feed  # data.sources.DocumentFeed: new files each round, the contribution ledger
        self.since_install: dict | None = None  # the ledger's totals, published in our record
        self._read_since_install()
        self.credential: str | None = None  # closed runs: the creator's invite, shown in our record
        path_values = sum(p.numel() for m in session.module_ids for p in session.outer[m].global_params)
        self.slots = {m: ModuleSlot(m, session, dht, run_state, client_mode, upload_mbps, path_values)
                      for m in session.module_ids}
        self.codec_tolerance = sync_tolerance(self.cfg.averaging.compression, self.cfg.averaging.sync_tolerance)
        self.history: list[RoundReport] = []
        self.final_landing: Landing | None = None  # overlap: the last round's averaging, landed at stop
        self._averagings: list[dict[str, ModuleRound]] = []  # every averaging's outcomes, in order
        self.sync: dict[str, ModuleSync] = {}
        self.rejections = Rejections()
        # module → states installed from a peer (catch-up before a round, re-sync after one)
        self.state_downloads: collections.Counter[str] = collections.Counter()
        self.bans: dict[str, float] = {}  # peer → when (time.monotonic) its matchmaking ban ends
        self.bans_issued: Counter = Counter()  # peer → how many times it was banned
        self.refused_slices: Counter = Counter()  # reducer → how many of its slices we refused
        self.silent: Counter = Counter()  # peers that did not post their fingerprints in time, last round
        self.absent: dict[str, set[str]] = {}  # module → holders that did not join its group last round
        self.searched_alone: set[str] = set()  # modules whose last search for a group found nobody
        self.partners = RecentPartners()  # module → who it averaged with lately: who a tie may heal with
        self.last_loss: float | None = None
        self.last_tps = 0.0
        self.step_seconds = 0.0
        self.step_fixed_fraction = LAST_STEP_FIXED_GUESS  # of a step, not shrinking with its batch (StepDeadline)
        self.stop_requested = threading.Event()
        self._stop_seen_at: float | None = None  # when the outer step first saw the stop request
        self.suspension = Suspension()  # set by the daemon's policy; read at safe points
        self.offloaded = False  # suspended with the model and optimizer state moved off the GPU
        self.phase = "starting"  # starting | training | averaging | suspended | stopped
        self.started_at = time.time()
        self._peers_cache: list[PeerRecord] = []
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        self._published_at = -math.inf  # time.monotonic() of the last publish of our record
        self._background: BackgroundRound | None = None  # overlap: last round's averaging
        # overlap: whole modules rebase on anchors, fragments one slice at a time (overlap.py)
        self._anchors = FragmentRebase() if self.cfg.averaging.fragments > 1 else Anchors()
        for slot in self.slots.values():
            slot.round = session.round
        self._update_sync()

    @property
    def round(self) -> int:
        return self.session.round

    # ------------------------------------------------------------------ start

    def catch_up(self, attempts: int = CATCH_UP_ATTEMPTS) -> dict[str, str]:
        """Adopt, for each module, the state the majority of its live holders vouch for, if it
        differs from ours. Returns module → peer it came from. A newcomer follows the
        majority, not the highest claim; with no majority it keeps its own state. A node with
        rounds of its own (a restart, a node whose averaging overran rounds) votes too, for
        its own state: one other holder is not a majority over it, or a lone stranger could
        hand it any lineage just by being a round ahead."""
        got: dict[str, str] = {}
        for attempt in range(attempts):
            peers = self.fetch_peers()
            undecided = 0
            for module_id, slot in self.slots.items():
                if module_id in got:
                    continue
                claims = self._claims(peers, module_id)
                if not claims:
                    continue
                mine = slot.vouch(self.peer_id)
                voters = claims + [mine] if mine.round > 0 else claims
                lineage = choose_lineage(voters, self.schedule.max_plausible_round(), self.codec_tolerance)
                if lineage is None:
                    undecided += 1
                    continue
                reference = lineage[0]
                if reference.round < mine.round or judge(mine, lineage, self.codec_tolerance).outcome == "agree":
                    continue
                source = fetch_verified_state(slot, [c.peer_id for c in lineage], reference, self.codec_tolerance,
                                              self.rejections, self.peer_id)
                if source is not None:
                    got[module_id] = source
                else:
                    undecided += 1
            if not undecided or attempt + 1 == attempts:
                break
            logger.info("catch-up: no verified majority yet for %d module(s); reading the records again",
                        undecided)
            time.sleep(2.0)
        self.state_downloads.update(got.keys())
        if got:
            self.session.round = max(slot.round for slot in self.slots.values())
            for module_id in got:
                self.session.adopt_global(module_id)
            # overlap: what the rebase kept was measured against the state just replaced
            self._anchors.reset()
            self._update_sync()
        return got

    def _claims(self, peers: list[PeerRecord], module_id: str) -> list[Vouch]:
        """The live holders' (not suspended) fingerprints of a module, as published."""
        out = []
        for peer in peers_holding(self.run_state.grid, peers, module_id, self.peer_id):
            entry = peer.sync.get(module_id)
            if entry is not None:
                out.append(Vouch(peer.peer_id, entry.round, tuple(entry.fingerprint), entry.norm, entry.step))
        return out

    # ------------------------------------------------------------------ rounds

    def wait_for_peers(self, count: int, timeout_s: float) -> int:
        """Block until `count` peers (this one included) have published records, or the
        timeout passes; returns how many were seen. Rounds are aligned on the swarm's
        clock anyway; this only lets a demo start with everyone in."""
        deadline = time.monotonic() + timeout_s
        seen = 1
        while not self.stop_requested.is_set():
            self.publish_status()
            found = self.records.fetch_peers()  # the whole table, even a split one
            seen = 1 + len([p for p in found if p.peer_id != self.peer_id])
            if seen >= count or time.monotonic() >= deadline:
                break
            self.stop_requested.wait(1.0)
        return seen

    def run(self, max_rounds: int | None = None, max_minutes: float | None = None,
            on_round: Callable[[RoundReport], None] | None = None,
            on_step: Callable | None = None,
            on_landing: Callable[[Landing], None] | None = None) -> list[RoundReport]:
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
        self.publish_status()
        self.start_heartbeat()
        self.final_landing = None
        done = 0
        while not self.stop_requested.is_set() and (max_rounds is None or done < max_rounds):
            if time.monotonic() >= deadline:
                logger.info("--max-minutes reached; stopping between rounds")
                break
            if self.suspension.active:
                self._sit_out_suspension()
                continue
            # --- enter the round in progress on the swarm's clock (the next one if too little is left)
            round_ = self.schedule.next_round_to_enter(self._entry_seconds())
            if self._stale_before(round_):
                # our globals are older than the round before this one (we joined while the holders
                # were averaging, or our last outer phase overran whole rounds): take the majority's
                # newer state first, or this round's average would start a lineage of its own
                logger.info("module state older than round %d; catching up before it", round_ - 1)
                # one read, no waiting: with no majority (a stranger's claims can block one), waiting
                # would make us late for every following round too
                self.catch_up(attempts=1)
            report = self.run_round(round_, on_step=on_step)
            if report is None:  # stopped, or the swarm moved on while suspended: nothing to report
                continue
            done += 1
            self.history.append(report)
            if report.modules:  # empty: overlap's first round, nothing landed yet
                self._averagings.append(report.modules)
            if on_round is not None:
                on_round(report)
        if self._background is not None and not self.stop_requested.is_set():
            # overlap: land the last round's average so the model and checkpoint include it
            # (its outcomes are reported on their own: the last round report holds the round before's)
            modules = self._land_background()
            self.final_landing = Landing(self.session.round, modules)
            self._averagings.append(modules)
            for module_id in self.session.module_ids:
                self.session.adopt_global(module_id)
            self._anchors.reset()
            self.session.save_checkpoint()
            if on_landing is not None:
                on_landing(self.final_landing)
        self.phase = "stopped"
        self.session.store.wait()  # the last round's checkpoint is on disk when run() returns
        return self.history

    def _stale_before(self, round_: int) -> bool:
        """Would round_ start from globals older than the last completed round (with overlap,
        the round before that, whose average lands during round_)?"""
        lag = 2 if self.cfg.averaging.overlap else 1
        return any(slot.round < round_ - lag for slot in self.slots.values())

    def run_round(self, round_: int, on_step=None) -> Optional[RoundReport]:
        # time-based rounds: train until the round's end (at most 4 H steps; tokens weigh the
        # average), following the swarm's lr schedule; else at most H steps, then wait
        H = max_steps_per_round(self.cfg)
        if self.cfg.averaging.fill_round:
            self.session.inner.enter_round(round_)
        end = self.schedule.end_of(round_)
        # --- data: pick up added or changed files of the registered sources (only those are re-read)
        if self.feed is not None:
            self.feed.begin_round(self.session)
        # --- inner: steps until the round's end on the swarm's clock, at most H of them
        self.phase = "training"
        t0 = time.perf_counter()
        tokens, losses, inner_seconds = 0, [], 0.0
        while True:
            deadline = StepDeadline(self.schedule, end, self.stop_requested, self.suspension, self.step_seconds,
                                    self.step_fixed_fraction)
            t_start = time.perf_counter()
            n_tokens, loss = self.session.inner_steps(H - self._steps(tokens), on_step=on_step, should_stop=deadline,
                                                      last_step_rows=deadline.last_step_rows)
            inner_seconds += time.perf_counter() - t_start
            deadline.finished()
            self.step_seconds, self.step_fixed_fraction = deadline.step_seconds, deadline.fixed_fraction
            if n_tokens:
                tokens += n_tokens
                losses.append((loss, n_tokens))
            if self.stop_requested.is_set():
                self._abandon_round()
                return None
            if not self.suspension.active:
                break
            # --- suspended mid-round: continue if the round is still on, else drop its steps
            self._sit_out_suspension(catch_up=False)
            if self.schedule.clock() + max(self.step_seconds, 0.05) >= end:
                logger.info("round %d ended while suspended: dropping its %d stale inner steps and catching up",
                            round_, self._steps(tokens))
                self._abandon_round()
                self.catch_up()
                return None
        if tokens == 0:
            return None  # entered too late for even one step: the next round is ours
        # a node that reached its step cap early waits for the round's end: everyone averages at once
        self.schedule.sleep_until(end, self.stop_requested)
        if self.stop_requested.is_set():
            self._abandon_round()
            return None
        loss = sum(l * n for l, n in losses) / tokens
        report = RoundReport(round_, loss, tokens, tokens / max(inner_seconds, 1e-9), inner_seconds, 0.0)
        self.last_loss, self.last_tps = loss, report.tokens_per_s
        # --- outer: average each module's pseudo-gradient with its holders, Nesterov step, verify
        self.phase = "averaging"
        t1 = time.perf_counter()
        if self.cfg.averaging.overlap:
            # the report is of the round whose average just landed
            report.round, report.modules = self._overlapped_outer_step(round_, tokens)
        else:
            report.modules = self.outer_step(round_, tokens)
            averaged = time.perf_counter()
            self.publish_status()
            published = time.perf_counter()
            self.verify_round(round_, report.modules)
            verified = time.perf_counter()
            self.session.save_checkpoint(background=True)
            report.outer_phases = {"average": averaged - t1, "publish": published - averaged,
                                   "verify": verified - published, "checkpoint": time.perf_counter() - verified}
        report.seconds_outer = time.perf_counter() - t1
        report.seconds_wall = time.perf_counter() - t0
        self._record_contribution(round_, report)
        self.phase = "training"
        return report

    def _record_contribution(self, round_: int, report: RoundReport) -> None:
        """The ledger: what each data source contributed to this round (kept across restarts)."""
        if self.feed is None:
            return
        averaged = [m for m, r in report.modules.items() if len(r.group) > 1]
        try:
            self.feed.end_round(self.session, round_, report.seconds_wall, averaged_modules=averaged)
        except OSError as e:  # a full disk must not stop training; the ledger catches up next round
            logger.error("could not write the contribution ledger: %s", e)
        self._read_since_install()

    def _read_since_install(self) -> None:
        """The home ledger's since-install totals, for status and our peer record (read at start
        and after each recorded round, not per heartbeat)."""
        ledger = getattr(self.feed, "ledger", None)
        if ledger is None:
            return
        try:
            self.since_install = ledger.summary()
        except (OSError, ValueError) as e:
            logger.warning("could not read the contribution ledger: %s", e)

    def _steps(self, tokens: int) -> int:
        return tokens // (self.cfg.inner.batch_size * self.cfg.model.context)

    def _abandon_round(self) -> None:
        """Stop between rounds only: discard this round's local progress, keep the agreed
        global state (with overlap, the average still in flight lands first so the
        checkpoint has it)."""
        if self._background is not None:
            self._land_background()
            self._anchors.reset()
            self.session.save_checkpoint()
        for module_id in self.session.module_ids:
            self.session.adopt_global(module_id)
        if self.feed is not None:
            self.feed.discard_round(self.session)  # dropped steps are not credited to any source

    def _sit_out_suspension(self, catch_up: bool = True) -> None:
        """Stay a polite DHT member (the heartbeat says why we are suspended; we are not
        counted as a holder) until resumed; then catch up if the swarm moved on."""
        self.phase = "suspended"
        self.publish_status()
        logger.info("suspended — %s", self.suspension.describe())
        # leave_apps_in_memory = false: the path's model and inner optimizer state wait in RAM,
        # and are back on the device before the next inner step (even when stopping: the
        # checkpoint reads them)
        with off_device(self.session.model, self.session.inner.optimizer, self.session.device,
                        leave_in_memory=self.suspension.leave_in_memory) as moved:
            self.offloaded = moved is not None
            self.suspension.wait_until_resumed(self.stop_requested)
        self.offloaded = False
        self.phase = "training"
        self.publish_status()
        if catch_up and not self.stop_requested.is_set():
            got = self.catch_up()
            if got:
                logger.info("resumed: caught up %s from peers", ", ".join(got))

    # ------------------------------------------------------------------ outer step

    def outer_step(self, round_: int, tokens: int, deltas: dict[str, list[torch.Tensor]] | None = None,
                   adopt: bool = True) -> dict[str, ModuleRound]:
        """Average each module's pseudo-gradient with its holders and apply the outer step.

        deltas: the pseudo-gradients to average (default: global − local now).
        adopt: continue training from the new globals (False while training runs on).
        """
        peers = self.fetch_peers(round_)
        avg_cfg = self.cfg.averaging
        sampled = self.records.buckets > 1  # we see about 1 / buckets of the holders
        weight = int(min(max(tokens, 1), tokens_per_round(self.run_state)))  # a larger claim would be refused
        admission = self.admission(peers)
        own, results, plans = {}, {}, {}
        required: dict[str, set[str]] = {}  # single-stage modules: the holders whose arrival assembles the group
        for module_id, slot in self.slots.items():
            if deltas is None:
                delta = slot.outer.pseudo_gradient_flat(self.session.local_state(module_id))
            else:
                delta = torch.cat([d.reshape(-1) for d in deltas[module_id]])
            start, end = slot.fragment(round_)  # all of it unless averaging.fragments > 1
            part = delta[start:end]  # delta is ours alone: a view, no copy
            if not torch.isfinite(part).all():
                # local training diverged: contribute nothing rather than poison the module
                logger.error("module %s: this node's pseudo-gradient is not finite; contributing zero", module_id)
                part.zero_()
            slot.load_buffer(part)
            own[module_id] = part
            results[module_id] = ModuleRound()
            holders = peers_holding(self.run_state.grid, peers, module_id, self.peer_id)
            if not holders and not sampled:
                results[module_id].alone = True  # nobody else trains it now: don't wait for a group
                continue
            results[module_id].expected = {p.peer_id for p in holders}
            if sampled:
                # a sample cannot tell when every holder is in: groups fill up to target_group_size
                # or form when the matchmaking window ends; staging follows the estimated count
                estimate = len(holders) * self.records.buckets + 1
                plan = plan_stages(estimate, avg_cfg.target_group_size, avg_cfg.staged)
                plans[module_id] = plan if plan.stages == 2 else StagePlan(1, avg_cfg.target_group_size)
            else:
                # assemble as soon as every holder that showed up last round is in: one that did not
                # (dead, slow, or a stranger that never joins) costs the window once, not every round.
                # The group is still sized for every holder, so one of those that is in by then stays
                expected = results[module_id].expected - self.absent.get(module_id, set())
                plans[module_id] = plan_stages(len(expected) + 1, avg_cfg.target_group_size, avg_cfg.staged)
                if plans[module_id].stages == 1:
                    required[module_id] = expected
                    plans[module_id] = plan_stages(len(results[module_id].expected) + 1,
                                                   avg_cfg.target_group_size, staged=False)
            slot.averager.set_admission(admission)

        # stage 1: every module with live holders, all at once
        means = dict(own)
        requests = {m: self._request_average(m, round_, 1, weight, plans[m].first_size, required=required.get(m))
                    for m in plans}
        second = {}
        for module_id in self.slots:
            if module_id not in requests:
                continue
            result, plan = results[module_id], plans[module_id]
            outcome = self._finish_average(module_id, round_, requests[module_id], result, own[module_id])
            if outcome is None:
                self.absent[module_id] = set()
                self.searched_alone.add(module_id)
                continue
            self.searched_alone.discard(module_id)
            means[module_id] = outcome[0]
            # absent holders only size single-stage groups of a whole table: a stage-1 group, or a
            # group among holders we did not all see, is not expected to hold every one
            self.absent[module_id] = (result.expected - set(result.group) if plan.stages == 1 and not sampled
                                      else set())
            if plan.stages == 2:
                second[module_id] = (result.group.index(self.peer_id), outcome[1])

        # stage 2 (modules with more holders than one group holds): across the stage-1 groups
        requests = {}
        for module_id, (index, group_tokens) in second.items():
            self.slots[module_id].load_buffer(means[module_id])
            plan = plans[module_id]
            requests[module_id] = self._request_average(module_id, round_, 2, group_tokens, plan.second_size,
                                                        index=index, weight_rounds=stage_two_weight_rounds(
                                                            plan, self.cfg.averaging.target_group_size),
                                                        wait=self._stage_wait_seconds(round_))
        for module_id, request in requests.items():
            result = results[module_id]
            first = ModuleRound(group=list(result.group), seconds_matchmaking=result.seconds_matchmaking,
                                seconds_allreduce=result.seconds_allreduce, bytes_sent=result.bytes_sent,
                                bytes_received=result.bytes_received, chunk_timeout=result.chunk_timeout,
                                longest_sender_wait=result.longest_sender_wait,
                                longest_reducer_wait=result.longest_reducer_wait)
            result.group, result.bytes_sent, result.bytes_received = [], 0, 0
            result.seconds_matchmaking = result.seconds_allreduce = None
            outcome = self._finish_average(module_id, round_, request, result, means[module_id], stage=2)
            result.stage_groups = [len(first.group), len(result.group) if outcome is not None else 1]
            if outcome is not None:
                means[module_id] = outcome[0]
            result.alone = False  # stage 1 averaged with peers even if stage 2 found nobody
            result.group = sorted(set(first.group) | set(result.group))
            result.seconds_matchmaking = (first.seconds_matchmaking or 0.0) + (result.seconds_matchmaking or 0.0)
            result.seconds_allreduce = (first.seconds_allreduce or 0.0) + (result.seconds_allreduce or 0.0)
            result.bytes_sent += first.bytes_sent
            result.bytes_received += first.bytes_received
            for field_name in ("chunk_timeout", "longest_sender_wait", "longest_reducer_wait"):
                setattr(result, field_name, max_known(getattr(first, field_name), getattr(result, field_name)))

        for module_id, slot in self.slots.items():
            mean = means[module_id]
            start, end = slot.fragment(round_)
            slot.apply_outer_step(mean, start, self._sharing_scale(module_id), self.cfg.outer.lr, round_)
            if adopt:
                self.session.adopt_global(module_id, None if slot.fragments == 1 else (start, end))
        self.session.round = round_
        self._update_sync()
        return results

    def _request_average(self, module_id: str, round_: int, stage: int, weight: int, group_size: int,
                         index: int = 0, weight_rounds: int = 1, required: Optional[set[str]] = None,
                         wait: Optional[float] = None) -> tuple:
        """Start one stage of a module's all-reduce in its averager's process; (control, asked at,
        search seconds). required: the holders whose arrival assembles the group (default:
        group_size peers do). wait: a group we lead that is not full starts this many seconds
        from now (default: one matchmaking window), and the search lasts a window longer."""
        slot = self.slots[module_id]
        slot.averager.set_target_group_size(group_size, required)
        # the round (and stage) is part of the group key: a node late for round r never lands in
        # round r+1's group; a stage-2 key names the member's index in its stage-1 group
        slot.averager.set_group_bits(stage_group_bits(round_, stage, index))
        # a declared weight may hold this many rounds' tokens: 1, or a whole stage-1 group's in stage 2
        slot.averager.set_max_weight(float(tokens_per_round(self.run_state) * weight_rounds))
        asked_at = time.time()  # wall clock, as the averager's process stamps the group
        search = self._search_seconds(module_id, round_)
        timing = {}
        if wait is not None and wait > self.cfg.averaging.matchmaking_time:
            timing["scheduled_time"] = self.schedule.clock() + wait
            search = max(search, wait + self.cfg.averaging.matchmaking_time)
        control = slot.averager.step(gather=RoundClaim(round=round_, tokens=weight, stage=stage).dict(),
                                     weight=float(weight), timeout=search, allow_retries=True, wait=False, **timing)
        return control, asked_at, search

    def _finish_average(self, module_id: str, round_: int, request: tuple, result: ModuleRound,
                        own: torch.Tensor, stage: int = 1) -> Optional[tuple[torch.Tensor, int]]:
        """Wait for one stage's all-reduce; (the mean to go on with, the group's total tokens),
        or None when no group formed in time or the all-reduce failed (the module goes on alone)."""
        control, asked_at, search = request
        try:
            outcome = self._await_average(control, time.monotonic() + max(search, self._matchmaking_timeout())
                                          + self.cfg.averaging.averaging_timeout + 30)
            mean = self._accept_average(module_id, round_, outcome, result, own, asked_at, stage=stage)
        except Exception as e:  # no group found in time, or the all-reduce failed
            result.alone = True
            logger.info("module %s averaged alone this round%s: %s", module_id,
                        " (stage 2)" if stage == 2 else "", e)
            return None
        return mean, self._group_tokens(outcome, round_, stage)

    def _group_tokens(self, outcome: dict, round_: int, stage: int) -> int:
        """The tokens behind a group's mean: the declared weights of the members whose claims
        parsed for this round and stage, less those whose parts our reducer refused."""
        refused = set(outcome.get("rejected", {}))
        total = 0
        for peer, claim in outcome.get("gathered", {}).items():
            parsed, _ = parse(RoundClaim, claim)
            if parsed is not None and parsed.round == round_ and parsed.stage == stage \
                    and peer.to_base58() not in refused:
                total += parsed.tokens
        return max(total, 1)

    def _await_average(self, control, deadline: float) -> dict:
        """The averaging step's outcome, waiting until `deadline` (monotonic). Once a stop is
        requested, at most STOP_GRACE_S more for the whole round: then the averaging in
        flight is cancelled (the module steps alone, as when a group fails), so a stopping
        node exits well inside a service manager's stop timeout."""
        while True:
            now = time.monotonic()
            if self.stop_requested.is_set() and self._stop_seen_at is None:
                self._stop_seen_at = now
            stop_deadline = math.inf if self._stop_seen_at is None else self._stop_seen_at + STOP_GRACE_S
            if now >= min(deadline, stop_deadline):
                control.cancel()
                raise TimeoutError("stopping: the averaging in flight was abandoned" if now >= stop_deadline
                                   else "no averaging result in time")
            try:
                return control.result(timeout=min(min(deadline, stop_deadline) - now, 1.0))
            except TimeoutError:
                if control.done():  # the averaging itself timed out: a real outcome, not our poll
                    raise

    def _accept_average(self, module_id: str, round_: int, outcome: dict, result: ModuleRound,
                        own: torch.Tensor, asked_at: float | None = None, stage: int = 1) -> torch.Tensor:
        """Read what the all-reduce returned: who was in the group and what they claimed (each
        claim parsed, a bad one reported), whom our reducer refused, and which values a failed
        reducer left un-averaged. Returns the mean pseudo-gradient of this round's fragment
        (flat, as long as `own`) to step with."""
        slot = self.slots[module_id]
        gathered = outcome.get("gathered", {})
        result.group = sorted(peer.to_base58() for peer in gathered)
        if isinstance(outcome.get("group_formed_at"), float) and asked_at is not None:
            result.seconds_matchmaking = max(0.0, outcome["group_formed_at"] - asked_at)
            result.seconds_allreduce = float(outcome.get("seconds_allreduce", 0.0))
        result.bytes_sent = int(outcome.get("bytes_sent", 0))
        result.bytes_received = int(outcome.get("bytes_received", 0))
        for field_name in ("chunk_timeout", "longest_sender_wait", "longest_reducer_wait"):
            value = outcome.get(field_name)  # from our own averager process, a float or absent
            setattr(result, field_name, float(value) if isinstance(value, (int, float)) else None)
        for peer, claim in gathered.items():
            peer_id = peer.to_base58()
            if peer_id == self.peer_id:
                continue
            parsed, why = parse(RoundClaim, claim)
            if parsed is None:
                self.rejections.add(peer_id, "malformed round claim", why)
            elif parsed.round != round_:
                self.rejections.add(peer_id, "a claim for another round", f"{parsed.round} vs {round_}")
            elif parsed.stage != stage:
                self.rejections.add(peer_id, "a claim for another stage", f"{parsed.stage} vs {stage}")
        for peer_id, why in outcome.get("rejected", {}).items():
            self.rejections.add(peer_id, "all-reduce part refused by our reducer", why)
            self.ban(peer_id)
        for peer_id, why in outcome.get("outliers", {}).items():
            # dropped by our robust rule, but not banned: whether a part is past the outlier
            # bound can differ between reducers, and bans that differ between honest peers
            # would split their groups (measured: honest modules then stay apart)
            self.rejections.add(peer_id, "all-reduce part dropped as an outlier by our reducer", why)
        for peer_id, (why, excess) in outcome.get("lying", {}).items():
            # a reducer returned a slice the rule cannot produce from our part: its range is in
            # `failed` below (we keep our own values there, as for a reducer that died)
            self.rejections.add(peer_id, "reduced slice refused (lying reducer)", why)
            result.lying_reducers.append(peer_id)
            self.refused_slices[peer_id] += 1
            if bans_lying_reducer(excess, self.refused_slices[peer_id]):
                self.ban(peer_id)
            else:
                logger.warning("refused a slice from reducer …%s, not banned (%d of %d strikes): a slice "
                               "just past the check can come from an honest reducer", peer_id[-8:],
                               self.refused_slices[peer_id], LIE_STRIKES)
        with slot.averager.get_tensors() as (flat,):
            averaged = flat[:own.numel()].clone()  # past it: the zero padding of the last fragment
        failed = outcome.get("failed", [])
        if failed:
            # a reducer failed us: `failed` is its whole slice (even parts it returned before
            # failing). Every survivor that saw it fail skips that same slice this round, so
            # the globals stay equal. Our own slice is in it when half the group did not get
            # it back (they skip it: CheckedAllReduceRunner.own_slice_split).
            for offset, length in failed:
                averaged[offset:offset + length] = 0.0
            result.partial = True
            logger.warning("module %s: %d values were left un-averaged by a failed reducer; skipped this round",
                           module_id, sum(n for _, n in failed))
        if not torch.isfinite(averaged).all():
            result.rejected = "non-finite values in the average (a reducer returned NaN/inf)"
            logger.warning("module %s: %s; using our own pseudo-gradient this round", module_id, result.rejected)
            return own
        return averaged

    def admission(self, peers: list[PeerRecord]) -> Admission:
        """Who may average with us this round: in a closed run the credentialed peers (their
        records were checked when read), in an open one anybody — less the peers we banned."""
        banned = frozenset(self.banned())
        if self.records.closed_run is None:
            return Admission(banned=banned)
        return Admission(allowed=frozenset({self.peer_id, *(p.peer_id for p in peers)}), banned=banned)

    def ban(self, peer_id: str) -> None:
        """Refuse a peer in this node's matchmaking (as leader and as follower) for
        averaging.ban_seconds: its all-reduce parts were refused, or a slice it reduced was."""
        seconds = self.cfg.averaging.ban_seconds
        if seconds <= 0 or peer_id == self.peer_id:
            return
        self.bans[peer_id] = time.monotonic() + seconds
        self.bans_issued[peer_id] += 1
        logger.warning("banned peer …%s from this node's averaging groups for %.0f s", peer_id[-8:], seconds)

    def banned(self) -> set[str]:
        """Peers whose ban has not ended yet (expired ones are forgotten)."""
        now = time.monotonic()
        for peer_id in [p for p, until in self.bans.items() if until <= now]:
            del self.bans[peer_id]
        return set(self.bans)

    def _matchmaking_timeout(self) -> float:
        """The longest a module looks for its holders: 3 windows, so a slow peer delays fast
        ones by at most that (everyone arrives at the same moment of the schedule)."""
        return search_seconds(self.cfg.averaging.matchmaking_time, None)

    def _search_seconds(self, module_id: str, round_: int) -> float:
        """This round's search for module_id's holders. After a search that found nobody it
        ends in time to enter the next round: holders whose outer phases fell into opposite
        rounds (a peer slowed once by more than a search) then meet again in the next round
        instead of searching alone for alternate rounds forever. A search that found a group
        last time keeps its full 3 windows, so a failed first group can be retried."""
        window = self.cfg.averaging.matchmaking_time
        if module_id not in self.searched_alone:
            return search_seconds(window, None)
        return search_seconds(window, self._seconds_to_spare(round_))

    def _stage_wait_seconds(self, round_: int) -> float:
        """How long round_'s second stages wait for holders still in their first (schedule.py).
        Only with overlap, where the wait passes while the next round trains: in plain
        averaging every member's training would stall for it, and a second-stage group waits
        out the whole wait whenever a member at its index vanished in its first stage, which
        at scale is most rounds (the simulator, gpu preset at 10,000 peers, plain: utilization
        0.59 with one window, 0.46 waiting a fifth of the round)."""
        avg = self.cfg.averaging
        fraction = avg.stage_wait if avg.overlap else 0.0
        return stage_wait_seconds(avg.matchmaking_time, avg.round_seconds, fraction, self._seconds_to_spare(round_))

    def _seconds_to_spare(self, round_: int) -> float:
        """How long round_'s outer phase may still wait (a search, the fingerprint check) and
        the node still enter round_ + 1."""
        return self.schedule.seconds_left(round_ + 1) - self._entry_seconds() - AFTER_SEARCH_S

    def _entry_seconds(self) -> float:
        """The inner time a round must still have for this node to enter it."""
        return max(1.5 * self.step_seconds, 0.05)

    def _sharing_scale(self, module_id: str) -> float:
        """DiPaCo's optional rescaling of a module's outer gradient by the paths sharing it."""
        if not self.cfg.outer.rescale_by_sharing:
            return 1.0
        return 1.0 / len(self.run_state.grid.paths_containing(module_id))

    def _update_sync(self) -> None:
        """The fingerprints this node vouches for in its peer record."""
        for module_id, slot in self.slots.items():
            v = slot.vouch(self.peer_id)
            self.sync[module_id] = ModuleSync(round=v.round, fingerprint=list(v.fingerprint), norm=v.norm,
                                              step=v.step)

    # ------------------------------------------------------------- overlapped rounds

    def _overlapped_outer_step(self, round_: int, tokens: int) -> tuple[int, dict[str, ModuleRound]]:
        """Land round k−1's average and start round k's in the background; (the round that
        landed, its outcomes)."""
        deltas = self._anchors.progress(self.slots, self.session, round_)
        finished = self._land_background()  # round k−1's average, applied to the globals
        # read before round k's averaging starts: its thread sets the round when it is done
        landed = self.session.round
        self._anchors.rebase(self.slots, self.session, deltas, finished)
        # checkpoint now: the globals are consistent and no averaging thread is touching them
        self.session.save_checkpoint(background=True)

        def average_in_background() -> dict[str, ModuleRound]:
            results = self.outer_step(round_, tokens, deltas=deltas, adopt=False)
            self.publish_status()
            self.verify_round(round_, results, adopt=False)
            return results

        self._background = BackgroundRound(round_, average_in_background)
        return landed, finished

    def _land_background(self) -> dict[str, ModuleRound]:
        """Wait for the averaging started one round ago; its results (empty if none)."""
        if self._background is None:
            return {}
        background, self._background = self._background, None
        results, error = background.finish(timeout=self._matchmaking_timeout() + self.cfg.averaging.round_seconds
                                           + 2 * self.cfg.averaging.averaging_timeout + 60)
        if error is not None:
            logger.error("round %d: averaging failed on its thread: %r; training goes on from the last "
                         "agreed state", background.round, error)
            return {m: ModuleRound(failed=repr(error)[:200]) for m in self.slots}
        return results

    # ------------------------------------------------------------------ checks

    def verify_round(self, round_: int, results: dict[str, ModuleRound], adopt: bool = True) -> None:
        """Compare every module's new global state with the other holders' for this round, and
        re-sync a module whose state a strict majority of them does not share."""
        mine = {m: slot.vouch(self.peer_id) for m, slot in self.slots.items()}
        claims = self._wait_for_claims(round_, results, mine)
        for module_id, result in results.items():
            verdict = judge(mine[module_id], claims.get(module_id, []), self.codec_tolerance)
            result.voters = verdict.voters
            self.partners.record(module_id, result.group)
            if verdict.outcome == "tie":
                result.split = True
                logger.warning("module %s: round %d holders disagree and no majority decides (%d voters); "
                               "healing with the tied holders it averaged with", module_id, round_, verdict.voters)
                # a peer banned since (it lied in a group) heals nobody
                heal = heal_tie(self.slots[module_id], self.peer_id, verdict.tied,
                                self.partners.of(module_id) - self.banned(), self.codec_tolerance, self.rejections)
                result.healed_with = heal.partners
                if heal.partners and adopt:
                    self.session.adopt_global(module_id)
            elif verdict.outcome == "minority":
                logger.warning("module %s: this node's round %d state differs from the majority of %d "
                               "holders; re-syncing from it", module_id, round_, verdict.voters)
                source = fetch_verified_state(self.slots[module_id], verdict.sources, verdict.reference,
                                              self.codec_tolerance, self.rejections, self.peer_id)
                if source is not None:
                    result.resynced_from = source
                    self.state_downloads[module_id] += 1
                    if adopt:
                        self.session.adopt_global(module_id)
        if any(r.resynced_from for r in results.values()):
            self._update_sync()
            self.publish_status()

    def _wait_for_claims(self, round_: int, results: dict[str, ModuleRound],
                         mine: dict[str, Vouch]) -> dict[str, list[Vouch]]:
        """The other holders' fingerprints for this round, per module.

        Waits (bounded by twice the matchmaking window) for the members of each module's
        group, or, for a module that found no group, for the listed holders it averaged with
        lately (consistency.voters_to_wait_for), but not for peers that were silent last
        round, and stops early once a strict majority of the expected voters agrees with us:
        the remaining answers could not change the verdict. One DHT read serves all modules;
        reads back off.

        Never past the moment this node must enter the next round: a wait that ran over would
        make it skip that round and average out of phase with the holders it just averaged
        with (measured with a split table: a member whose fresh record went to other buckets
        was waited for 12 s, and two of four peers skipped a round, every module they share
        with the other two then averaged alone).
        """
        was_silent, banned = {p for p, n in self.silent.items() if n}, self.banned()
        expected = {m: voters_to_wait_for(self.peer_id, r.group, r.expected, self.partners.of(m) - banned, was_silent)
                    for m, r in results.items()}
        avg_cfg = self.cfg.averaging
        room = self._seconds_to_spare(round_)
        bound = time.monotonic() + max(0.0, min(avg_cfg.averaging_timeout, 2 * avg_cfg.matchmaking_time, room))
        pause = SYNC_POLL_S
        claims: dict[str, list[Vouch]] = {}
        max_round = self.schedule.max_plausible_round()
        group_members = set().union(*expected.values()) if expected else set()
        while True:
            peers = self._fetch_group_members(round_, group_members)
            if self.records.buckets > 1:
                # a split table: a member with no record in the buckets read is not waited for
                seen = {p.peer_id for p in peers}
                expected = {m: members & seen for m, members in expected.items()}
            for peer in peers:
                for entry in peer.sync.values():
                    if entry.round > max_round:
                        self.rejections.add(peer.peer_id, "a round that has not happened yet",
                                            f"{entry.round} > {max_round}")
                        break
            claims = {m: [c for c in self._claims(peers, m) if c.round == round_] for m in results}
            pending = {m: expected[m] - {c.peer_id for c in claims[m]} for m in results}
            decided = all(not pending[m] or self._majority_agrees(mine[m], claims[m], len(expected[m]) + 1)
                          for m in results)
            if decided or time.monotonic() >= bound:
                break
            time.sleep(pause)
            pause = min(pause * 1.5, SYNC_POLL_MAX_S)
        silent = set().union(*pending.values()) if results else set()
        self.silent = Counter({p: 1 for p in silent})
        if silent:
            logger.info("round %d: %d group member(s) posted no fingerprints in time; not waited for next round",
                        round_, len(silent))
        return claims

    def _majority_agrees(self, mine: Vouch, claims: list[Vouch], voters: int) -> bool:
        agreeing = 1 + sum(judge(mine, [c], self.codec_tolerance).outcome == "agree" for c in claims)
        return 2 * agreeing > voters

    # ------------------------------------------------------------------ status

    def fetch_peers(self, round_: int | None = None) -> list[PeerRecord]:
        """Live peers' records: all of them, or with a split table (averaging.peer_buckets > 1)
        the sample in this node's bucket for `round_` (default: the round in progress)."""
        round_ = self.schedule.current_round() if round_ is None else round_
        try:
            self._peers_cache = self.records.fetch_peers(round_, self.peer_id)
        except DHTProcessExited:  # not a slow or failed lookup: no later one can succeed
            raise
        except Exception as e:  # the DHT is best effort: keep the last view
            logger.warning("could not read peer records: %s", e)
        return self._peers_cache

    def _fetch_group_members(self, round_: int, members: set[str]) -> list[PeerRecord]:
        """The records that hold round_'s fingerprints of these group members (with a split
        table, their buckets as well as ours); none when the DHT fails (nobody is waited for)."""
        try:
            return self.records.fetch_group_members(round_, self.peer_id, members)
        except DHTProcessExited:
            raise
        except Exception as e:  # the DHT is best effort
            logger.warning("could not read peer records: %s", e)
            return []

    def publish_status(self) -> None:
        self._published_at = time.monotonic()  # an attempt counts: a failing DHT is not retried in a loop
        loss = self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None
        record = new_peer_record(peer_id=self.peer_id, path=list(self.session.path), round=self.round, loss=loss,
                                 tokens_per_s=float(self.last_tps), tokens=int(self.session.tokens_seen),
                                 reachability="client" if self.client_mode else "public", maddrs=self.maddrs,
                                 sync=dict(self.sync), paused=self.suspension.describe(),
                                 credential=self.credential, **status_record_fields(self.status()))
        try:
            self.records.publish_peer(record, round_=self.schedule.current_round())
        except DHTProcessExited:
            raise
        except Exception as e:
            logger.warning("could not publish this node's status: %s", e)

    def averagings(self) -> list[dict[str, ModuleRound]]:
        """Every averaging outcome of this node's rounds, oldest first: each round report's
        modules and (overlap) each last round's, landed when `run()` stopped."""
        return list(self._averagings)

    def status(self) -> dict:
        """A JSON-able snapshot of this node: what `p2ptrain status`, the daemon's control
        socket and the metrics endpoint report."""
        averagings = self.averagings()
        outcomes = {}
        if averagings:
            for module_id, r in averagings[-1].items():
                outcomes[module_id] = {"peers": len(r.group) if r.group else 1, "outcome": r.outcome}
                if r.stage_groups:
                    outcomes[module_id]["stage_groups"] = list(r.stage_groups)
        return {
            "peer_id": self.peer_id, "run_id": self.cfg.run.id, "path": path_name(self.session.path),
            "modules": list(self.session.module_ids), "state": self.phase,
            "suspended": sorted(self.suspension.reasons()), "round": self.round,
            "device": str(self.session.device), "offloaded": self.offloaded,
            "schedule_round": self.schedule.current_round(),
            "loss": self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None,
            "tokens_per_s": float(self.last_tps), "tokens": int(self.session.tokens_seen),
            "rounds_done": len(self.history), "uptime_s": round(time.time() - self.started_at, 1),
            "rounds_averaged": sum(any(len(r.group) > 1 for r in modules.values()) for modules in averagings),
            "since_install": self.since_install,
            "last_round": outcomes, "checkpoints": str(self.session.store.root),
            "reachability": "client" if self.client_mode else "public", "maddrs": list(self.maddrs),
            "rejected": self.rejections.snapshot(),
            "banned": {"now": sorted(self.banned()), "issued": sum(self.bans_issued.values())},
        }

    def describe(self) -> str:
        return f"path {path_name(self.session.path)} modules {', '.join(self.session.module_ids)}"

    def start_heartbeat(self, period_s: float | None = None) -> None:
        """Re-publish this node's record in the background when the round driver has not
        within the period (by default a round and 20 s, `heartbeat_period`): a suspended or
        stalled node must stay in others' view, and one that vanishes must drop out. A
        publish is ~34 KB on the wire in a 4-peer swarm, the largest fixed cost of a round,
        so a node keeping up with its rounds never beats."""
        if self._heartbeat is not None:
            return
        period_s = heartbeat_period(self.schedule.round_seconds) if period_s is None else period_s

        def beat():
            while True:
                due = self._published_at + period_s - time.monotonic()
                if due > 0:
                    if self._heartbeat_stop.wait(due):
                        return
                    continue
                try:
                    self.publish_status()
                except DHTProcessExited:  # the round driver stops on its next read and says why
                    return

        self._heartbeat = threading.Thread(target=beat, name="p2ptrain-heartbeat", daemon=True)
        self._heartbeat.start()

    def shutdown(self) -> None:
        if self._background is not None:
            self._background.finish(timeout=self.cfg.averaging.averaging_timeout + 30)
        self.session.store.wait()
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        # p2pd dies with the DHT process (parent-death signal): an averager asked to shut down
        # then fails to unregister its handlers there and prints the error; it holds nothing to save
        dht_gone = not self.records.dht.is_alive()
        for slot in self.slots.values():
            try:
                if dht_gone:
                    slot.averager.kill()
                    slot.averager.join(10)
                else:
                    slot.averager.shutdown()
            except Exception as e:
                logger.debug("averager shutdown: %s", e)

