"""The swarm round driver: inner steps, then a DiLoCo outer step per module averaged with
the module's peers, then consistency checks, progress records and a checkpoint.

Round rule (step-based): every node runs H = inner.steps_per_round inner steps, then
looks for the peers of each of its modules. Peers that arrive within the matchmaking
window (averaging.matchmaking_time, at most 3× that in total) average together; a slow
peer that misses the window averages with whoever is there next time, and a module
whose peers are all gone is updated with the node's own pseudo-gradient. So a slow peer
delays fast ones by at most the window, and a lone peer never waits forever.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from p2ptrain.model.grid import path_name
from p2ptrain.run_state import RunState
from p2ptrain.swarm.averaging import (averaging_part_bytes, fingerprint, fingerprint_distance, fingerprints_agree,
                                      make_compression, module_averager_class, sync_tolerance)
from p2ptrain.swarm.membership import peers_holding
from p2ptrain.swarm.records import (PEER_RECORD_TTL_S, ModuleSync, PeerRecord, SwarmRecords, averager_prefix,
                                    new_peer_record)
from p2ptrain.swarm.signals import children_ignore_sigint
from p2ptrain.swarm.suspension import Suspension
from p2ptrain.train.session import PathSession

logger = logging.getLogger(__name__)

# Global copies of one module drift apart by wire-compression error each round (every
# peer adds its own decompressed share of the average). Drift is tolerated up to this
# many rounds' worth of that error, measured against the size of the last outer update,
# plus fp32 round-off relative to the parameters themselves.
DRIFT_ROUNDS = 20
FP32_ROUNDOFF = 1e-6
STATE_TIMEOUT_S = 30.0  # per-peer bound on a module state download
SYNC_POLL_S, SYNC_POLL_MAX_S = 0.2, 2.0  # reads of the group's post-round fingerprints


@dataclass
class ModuleRound:
    """What happened to one module in one round."""

    group: list[str] = field(default_factory=list)  # peer ids that averaged together (incl. us)
    alone: bool = False
    rejected: str | None = None  # why the average was not used, if it was not
    resynced_from: str | None = None
    partial: bool = False
    gathered: dict = field(default_factory=dict, repr=False)  # peer id → what it sent through `gather`


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


class ModuleSlot:
    """A module's averager, its shared pseudo-gradient buffers and a lock over its global state."""

    def __init__(self, module_id: str, session: PathSession, dht, run_state: RunState, client_mode: bool):
        cfg = run_state.config.averaging
        self.module_id = module_id
        self.outer = session.outer[module_id]
        self.lock = threading.Lock()
        self.round = 0
        self.last_step_norm = 0.0  # size of the last outer update, the yardstick for drift
        # One flat buffer, not one tensor per parameter: hivemind sends each tensor of an
        # all-reduce with its own metadata, about 1 KB of it on the wire (measured on
        # loopback: 400k values in 64 tensors cost 1.16-1.22x the all-reduce bound, in one
        # tensor 1.02x). The buffer is cut into 16 parts (see averaging_part_bytes), so that
        # even a small module is shared among up to 16 reducers.
        self.numels = [p.numel() for p in self.outer.global_params]
        buffers = [torch.zeros(sum(self.numels))]
        part_bytes = averaging_part_bytes(sum(self.numels), cfg.compression)
        mm = cfg.matchmaking_time
        with children_ignore_sigint():
            self.averager = module_averager_class()(
                buffers, dht, start=True, prefix=averager_prefix(run_state.config.run.id, module_id),
                state_provider=self.current_state, target_group_size=cfg.target_group_size, min_group_size=2,
                min_matchmaking_time=mm, request_timeout=min(3.0, mm / 2), allreduce_timeout=cfg.averaging_timeout,
                # a peer that stops sending (or dies) mid all-reduce is excluded after this long instead
                # of failing the whole round; its slice is then caught by verify_round
                next_chunk_timeout=max(2.0, cfg.averaging_timeout / 6),
                compression=make_compression(cfg.compression), part_size_bytes=part_bytes, client_mode=client_mode,
                declare_state_period=min(30.0, 6 * mm))

    @contextlib.contextmanager
    def buffers(self) -> Iterator[list[torch.Tensor]]:
        """The averager's shared buffer, as one view per parameter of the module."""
        with self.averager.get_tensors() as (flat,):
            yield [v.view_as(p) for v, p in zip(flat.split(self.numels), self.outer.global_params)]

    def current_state(self):
        """Served to peers that download this module (runs in hivemind's fetch thread)."""
        with self.lock:
            tensors = [p.clone() for p in self.outer.global_params] + [m.clone() for m in self.outer.momentum]
            return {"module": self.module_id, "round": self.round}, tensors

    def adopt(self, metadata, tensors) -> bool:
        n = len(self.outer.global_params)
        if (not isinstance(metadata, dict) or metadata.get("module") != self.module_id or len(tensors) != 2 * n
                or any(t.shape != p.shape for t, p in zip(tensors, self.outer.global_params * 2))
                or not all(torch.isfinite(t).all() for t in tensors)):
            return False
        with self.lock:
            for dst, src in zip(self.outer.global_params + self.outer.momentum, tensors):
                dst.copy_(src)
            self.round = int(metadata["round"])
        return True


class SwarmNode:
    def __init__(self, run_state: RunState, session: PathSession, dht, records: SwarmRecords,
                 client_mode: bool = False, maddrs: list[str] | None = None):
        self.run_state = run_state
        self.cfg = run_state.config
        self.session = session
        self.dht = dht
        self.records = records
        self.client_mode = client_mode
        self.maddrs = maddrs or []
        self.peer_id = dht.peer_id.to_base58()
        self.slots = {m: ModuleSlot(m, session, dht, run_state, client_mode) for m in session.module_ids}
        self.history: list[RoundReport] = []
        self.sync: dict[str, ModuleSync] = {}
        self.last_loss: float | None = None
        self.last_tps = 0.0
        self.stop_requested = threading.Event()
        self.suspension = Suspension()  # set by the daemon's policy; read at safe points
        self.phase = "starting"  # starting | training | averaging | suspended | stopped
        self.started_at = time.time()
        self._peers_cache: list[PeerRecord] = []
        self._heartbeat: threading.Thread | None = None
        self._background: threading.Thread | None = None  # overlap: last round's averaging
        self._background_results: dict[str, ModuleRound] = {}
        self._anchor: dict[str, list[torch.Tensor]] | None = None  # overlap: where this round started
        self._heartbeat_stop = threading.Event()
        for slot in self.slots.values():
            slot.round = session.round

    @property
    def round(self) -> int:
        return self.session.round

    # ------------------------------------------------------------------ start

    def catch_up(self) -> dict[str, str]:
        """Download each module's global state from the most advanced peer holding it, if
        that peer is ahead of our own checkpoint. Returns module → peer it came from."""
        peers = self.fetch_peers()
        got = {}
        for module_id, slot in self.slots.items():
            holders = sorted(peers_holding(self.run_state.grid, peers, module_id, self.peer_id),
                             key=lambda p: (-p.round, p.peer_id))
            holders = [p for p in holders if p.round > slot.round]
            if holders and self._download(slot, [p.peer_id for p in holders], min_round=slot.round + 1):
                got[module_id] = holders[0].peer_id
        if got:
            self.session.round = max(slot.round for slot in self.slots.values())
            for slot in self.slots.values():
                slot.round = self.session.round
        return got

    # ------------------------------------------------------------------ rounds

    def wait_for_peers(self, count: int, timeout_s: float) -> int:
        """Block until `count` peers (this one included) have published records, or the
        timeout passes; returns how many were seen. Starting a run together keeps the
        first rounds of all peers aligned."""
        deadline = time.monotonic() + timeout_s
        seen = 1
        while not self.stop_requested.is_set():
            self.publish_status()
            seen = 1 + len([p for p in self.fetch_peers() if p.peer_id != self.peer_id])
            if seen >= count or time.monotonic() >= deadline:
                break
            self.stop_requested.wait(1.0)
        return seen

    def run(self, max_rounds: int | None = None, max_minutes: float | None = None,
            on_round: Callable[[RoundReport], None] | None = None,
            on_step: Callable | None = None) -> list[RoundReport]:
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
        self.publish_status()
        self.start_heartbeat()
        done = 0
        while not self.stop_requested.is_set() and (max_rounds is None or done < max_rounds):
            if time.monotonic() >= deadline:
                logger.info("--max-minutes reached; stopping between rounds")
                break
            report = self.run_round(on_step=on_step)
            if report is None:  # stopped mid-round: the round is abandoned
                break
            done += 1
            self.history.append(report)
            if on_round is not None:
                on_round(report)
        if self._background is not None and not self.stop_requested.is_set():
            # overlap: land the last round's average so the model and checkpoint include it
            self.history[-1].modules = self._finish_background()
            self.history[-1].round = self.round
            for module_id in self.session.module_ids:
                self.session.adopt_global(module_id)
            self._anchor = None
            self.session.save_checkpoint()
        self.session.store.wait()  # the last round's checkpoint is on disk when run() returns
        return self.history

    def run_round(self, on_step=None) -> Optional[RoundReport]:
        H = self.cfg.inner.steps_per_round
        # --- inner: H steps of the inner optimizer on this path's shard
        t0 = time.perf_counter()
        tokens, loss = self.session.inner_steps(H, on_step=on_step, should_stop=self.stop_requested.is_set)
        t_inner = time.perf_counter() - t0
        if self.stop_requested.is_set():
            # stop between rounds only: discard the partial round, keep the agreed global state
            # (with overlap, the average still in flight lands first so the checkpoint has it)
            if self._background is not None:
                self._finish_background()
                self.session.save_checkpoint()
            for module_id in self.session.module_ids:
                self.session.adopt_global(module_id)
            return None
        report = RoundReport(self.round + 1, loss, tokens, tokens / max(t_inner, 1e-9), t_inner, 0.0)
        self.last_loss, self.last_tps = loss, report.tokens_per_s
        t1 = time.perf_counter()
        if self.cfg.averaging.overlap:
            report.modules = self.overlapped_outer_step(tokens)
            report.round = self.round
        else:
            # --- outer: average each module's pseudo-gradient with its peers, Nesterov step
            report.modules = self.outer_step(tokens)
            self.publish_status()
            # --- verify: peers of each module must now hold the same global state
            self.verify_round(report.modules)
        report.seconds_outer = time.perf_counter() - t1
        self.session.save_checkpoint(background=True)
        report.seconds_wall = time.perf_counter() - t0
        return report

    # ------------------------------------------------------- overlapped rounds
    #
    # With averaging.overlap the all-reduce of round k runs in the background while round
    # k+1 computes, and its outer update lands one round late (as in Streaming DiLoCo and
    # hivemind's delayed updates). At the end of round k:
    #     δ_k = local − anchor_k                 (this round's progress)
    #     wait for round k−1's average; G ← Nesterov(G, mean Δ_{k−1})
    #     local ← G + δ_k ;  anchor_{k+1} ← local
    #     start averaging Δ_k = −δ_k in the background
    # so the local model always equals the latest agreed global plus the progress whose
    # average has not landed yet.

    def overlapped_outer_step(self, tokens: int) -> dict[str, ModuleRound]:
        if self._anchor is None:
            self._anchor = {m: [g.clone() for g in self.slots[m].outer.global_params] for m in self.slots}
        deltas = {}
        for module_id, anchor in self._anchor.items():
            local = self.session.local_state(module_id)
            deltas[module_id] = [a - local[n].detach().to("cpu", torch.float32)
                                 for a, n in zip(anchor, self.slots[module_id].outer.names)]
        finished = self._finish_background()  # round k−1's average, applied to the globals
        for module_id, slot in self.slots.items():
            state = {n: g - d for n, g, d in zip(slot.outer.names, slot.outer.global_params, deltas[module_id])}
            self.session.model.load_module_state(module_id, state)
            self._anchor[module_id] = [state[n].clone() for n in slot.outer.names]

        def average_in_background():
            results = self.outer_step(tokens, deltas=deltas, adopt=False)
            self.publish_status()
            self.verify_round(results, adopt=False)
            self._background_results = results

        self._background = threading.Thread(target=average_in_background, name="p2ptrain-averaging", daemon=True)
        self._background.start()
        return finished

    def _finish_background(self) -> dict[str, ModuleRound]:
        """Wait for the averaging started one round ago; its results (empty if none)."""
        if self._background is None:
            return {}
        self._background.join()
        self._background = None
        results, self._background_results = self._background_results, {}
        return results

    def outer_step(self, tokens: int, deltas: dict[str, list[torch.Tensor]] | None = None,
                   adopt: bool = True) -> dict[str, ModuleRound]:
        """Average each module's pseudo-gradient with its peers and apply the outer step.

        deltas: the pseudo-gradients to average (default: global − local now).
        adopt: continue training from the new globals (False while training runs on).
        """
        peers = self.fetch_peers()
        avg_cfg = self.cfg.averaging
        controls, own, gathers, results = {}, {}, {}, {}
        weight = float(max(tokens, 1))
        for module_id, slot in self.slots.items():
            with slot.buffers() as buffers:
                if deltas is None:
                    slot.outer.pseudo_gradient_into(self.session.local_state(module_id), buffers)
                else:
                    for buf, d in zip(buffers, deltas[module_id]):
                        buf.copy_(d)
                own[module_id] = [b.clone() for b in buffers]
                if not all(torch.isfinite(b).all() for b in buffers):
                    # local training diverged: contribute nothing rather than poison the module
                    logger.error("module %s: this node's pseudo-gradient is not finite; contributing zero",
                                 module_id)
                    for b, o in zip(buffers, own[module_id]):
                        b.zero_()
                        o.zero_()
            global_fp, global_norm = fingerprint(slot.outer.global_params)
            gathers[module_id] = {"round": slot.round, "global": global_fp, "norm": global_norm,
                                  "step": slot.last_step_norm}
            results[module_id] = ModuleRound()
            if not peers_holding(self.run_state.grid, peers, module_id, self.peer_id):
                results[module_id].alone = True  # nobody else holds it: don't wait for a group
                continue
            controls[module_id] = slot.averager.step(
                gather=gathers[module_id], weight=weight,
                timeout=self._matchmaking_timeout(), allow_retries=True, wait=False)

        for module_id, slot in self.slots.items():
            result = results[module_id]
            mean = own[module_id]
            if module_id in controls:
                try:
                    group = controls[module_id].result(timeout=self._matchmaking_timeout()
                                                       + avg_cfg.averaging_timeout + 30)
                    result.group = sorted(peer.to_base58() for peer in group)
                    result.gathered = {peer.to_base58(): g for peer, g in group.items()}
                    with slot.buffers() as buffers:
                        averaged = [b.clone() for b in buffers]
                    if all(torch.isfinite(t).all() for t in averaged):
                        mean = averaged
                    else:
                        result.rejected = "non-finite values in the average (a peer sent NaN/inf)"
                        logger.warning("module %s: %s; using our own pseudo-gradient this round",
                                       module_id, result.rejected)
                except Exception as e:  # no group found in time, or the all-reduce failed
                    result.alone = True
                    logger.info("module %s averaged alone this round: %s", module_id, e)
            with slot.lock:
                scale = self._sharing_scale(module_id)
                slot.outer.apply(mean, scale)
                slot.round += 1
            slot.last_step_norm = self.cfg.outer.lr * scale * math.sqrt(sum(float((d.double() ** 2).sum())
                                                                            for d in mean))
            if adopt:
                self.session.adopt_global(module_id)
            fp, norm = fingerprint(mean)
            self.sync[module_id] = ModuleSync(round=slot.round, fingerprint=fp, scale=norm)
        self.session.round = max(slot.round for slot in self.slots.values())
        return results

    def _matchmaking_timeout(self) -> float:
        """How long a module looks for its peers: up to 3 windows, so a slow peer delays fast
        ones by at most that. With overlap nobody waits on it (training goes on), so peers
        out of phase get up to most of a round to meet."""
        window = 3 * self.cfg.averaging.matchmaking_time
        if self.cfg.averaging.overlap and self.history:
            return max(window, 0.8 * self.history[-1].seconds_inner)
        return window

    def _sharing_scale(self, module_id: str) -> float:
        """DiPaCo's optional rescaling of a module's outer gradient by the paths sharing it."""
        if not self.cfg.outer.rescale_by_sharing:
            return 1.0
        return 1.0 / len(self.run_state.grid.paths_containing(module_id))

    # ------------------------------------------------------------------ checks

    def verify_round(self, results: dict[str, ModuleRound], adopt: bool = True) -> None:
        """Re-sync any module that this round left inconsistent with its group."""
        tolerance = sync_tolerance(self.cfg.averaging.compression, self.cfg.averaging.sync_tolerance)
        sources: dict[str, tuple[str, int]] = {}  # module → (peer to download from, least round)
        to_compare: dict[str, dict[str, int]] = {}  # module → {member: round its sync entry must carry}
        for module_id, result in results.items():
            if not result.gathered or result.alone:
                continue
            source = self._source_if_behind_or_drifted(module_id, result.gathered, tolerance)
            if source is not None:
                sources[module_id] = source
            else:
                to_compare[module_id] = {p: int(g.get("round", -1)) + 1
                                         for p, g in result.gathered.items() if p != self.peer_id}
        # a partial all-reduce: compare fingerprints of the averaged Δ with the group
        for module_id, others in self._wait_for_group_sync(to_compare).items():
            slot, mine = self.slots[module_id], self.sync[module_id]
            distances = {p: fingerprint_distance(mine.fingerprint, s.fingerprint, max(s.scale, mine.scale))
                         for p, s in others.items()}
            logger.debug("module %s round %d: fingerprint distances %s (tolerance %g)", module_id, slot.round,
                         {p[-8:]: round(d, 6) for p, d in distances.items()}, tolerance)
            mismatched = [p for p, d in distances.items() if d > tolerance]
            if mismatched:
                results[module_id].partial = True
                reference = min([self.peer_id, *others])  # the same choice on every survivor
                logger.warning("module %s: round %d was only partly averaged (%d of %d peers disagree)%s",
                               module_id, slot.round, len(mismatched), len(others),
                               "" if reference == self.peer_id else f"; re-syncing from {reference[-8:]}")
                if reference != self.peer_id:
                    sources[module_id] = (reference, slot.round)
        for module_id, (source, min_round) in sources.items():
            result = results[module_id]
            fallback = [p for p in result.group if p not in (source, self.peer_id)]
            if self._download(self.slots[module_id], [source, *fallback], min_round=min_round):
                result.resynced_from = source
                if adopt:
                    self.session.adopt_global(module_id)
        self.session.round = max(slot.round for slot in self.slots.values())

    def _source_if_behind_or_drifted(self, module_id: str, gathered: dict[str, dict],
                                     tolerance: float) -> Optional[tuple[str, int]]:
        """(the most advanced member, the round to download) if this node was behind it or had
        drifted from it before this round, else None."""
        ahead = max(gathered.items(), key=lambda kv: (kv[1].get("round", -1), _neg(kv[0])))
        if ahead[0] == self.peer_id:
            return None
        mine, their = gathered.get(self.peer_id, {}), ahead[1]
        behind = mine.get("round", -1) < their.get("round", -1)
        allowed = (DRIFT_ROUNDS * tolerance * float(their.get("step", 0.0))
                   + FP32_ROUNDOFF * float(their.get("norm", 0.0)))
        drifted = not fingerprints_agree(mine.get("global", []), their.get("global", []), 1.0, allowed)
        if not (behind or drifted):
            return None
        logger.warning("module %s: %s peer %s before this round; re-syncing from it", module_id,
                       "behind" if behind else "drifted from", ahead[0][-8:])
        return ahead[0], int(their.get("round", 0)) + 1

    def _wait_for_group_sync(self, expected: dict[str, dict[str, int]]) -> dict[str, dict[str, ModuleSync]]:
        """Group members' fingerprints of this all-reduce's averaged Δ, for every module at once.

        expected: module → {member → the round its entry for this all-reduce carries (its
        round before the step, as sent through `gather`, plus one)}. Members finish at
        different times (a dead peer costs the others up to the reducer timeout), so wait up
        to averaging_timeout; a member that has already posted a later round is not waited
        for. One DHT read serves all modules, and reads back off from SYNC_POLL_S to
        SYNC_POLL_MAX_S: most members post within a fraction of a second, and the reads are
        the largest DHT traffic of a round.
        """
        deadline = time.monotonic() + self.cfg.averaging.averaging_timeout
        found: dict[str, dict[str, ModuleSync]] = {m: {} for m in expected}
        settled: dict[str, set[str]] = {m: set() for m in expected}
        pause = SYNC_POLL_S
        while expected:
            for peer in self.records.fetch_peers():
                for module_id, rounds in expected.items():
                    entry = peer.sync.get(module_id)
                    if peer.peer_id not in rounds or entry is None:
                        continue
                    if entry.round == rounds[peer.peer_id]:
                        found[module_id][peer.peer_id] = entry
                    if entry.round >= rounds[peer.peer_id]:
                        settled[module_id].add(peer.peer_id)
            if all(settled[m] >= set(rounds) for m, rounds in expected.items()) or time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 1.5, SYNC_POLL_MAX_S)
        return found

    def _download(self, slot: ModuleSlot, peers: list[str], min_round: int) -> bool:
        """Adopt a module's global state from the first of `peers` that has round ≥ min_round."""
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while time.monotonic() < deadline:
            got = slot.averager.download_state_from(peers, timeout=STATE_TIMEOUT_S)
            if got is not None:
                metadata, tensors = got
                if isinstance(metadata, dict) and int(metadata.get("round", -1)) >= min_round:
                    if slot.adopt(metadata, tensors):
                        logger.info("module %s: adopted round %d state from a peer", slot.module_id, slot.round)
                        return True
                    logger.warning("module %s: a peer sent a state of the wrong shape or with NaN; ignored",
                                   slot.module_id)
                    peers = peers[1:]
                    if not peers:
                        return False
            time.sleep(0.5)
        logger.warning("module %s: could not download its state from %d peers; continuing with ours",
                       slot.module_id, len(peers))
        return False

    # ------------------------------------------------------------------ status

    def fetch_peers(self) -> list[PeerRecord]:
        try:
            self._peers_cache = self.records.fetch_peers()
        except Exception as e:  # the DHT is best effort: keep the last view
            logger.warning("could not read peer records: %s", e)
        return self._peers_cache

    def publish_status(self, paused: str | None = None) -> None:
        record = new_peer_record(peer_id=self.peer_id, path=list(self.session.path), round=self.round,
                                 loss=self.last_loss if self.last_loss is None or math.isfinite(self.last_loss)
                                 else None, tokens_per_s=float(self.last_tps), tokens=int(self.session.tokens_seen),
                                 reachability="client" if self.client_mode else "public", maddrs=self.maddrs,
                                 sync=dict(self.sync), paused=paused)
        try:
            self.records.publish_peer(record)
        except Exception as e:
            logger.warning("could not publish this node's status: %s", e)

    def status(self) -> dict:
        """A JSON-able snapshot of this node: what `p2ptrain status`, the daemon's control
        socket and the metrics endpoint report."""
        last = self.history[-1] if self.history else None
        outcomes = {}
        if last is not None:
            for module_id, r in last.modules.items():
                outcome = ("rejected" if r.rejected else "partial" if r.partial else
                           "resynced" if r.resynced_from else "alone" if r.alone else "ok")
                outcomes[module_id] = {"peers": len(r.group) if r.group else 1, "outcome": outcome}
        return {
            "peer_id": self.peer_id, "run_id": self.cfg.run.id, "path": path_name(self.session.path),
            "modules": list(self.session.module_ids), "state": self.phase,
            "suspended": sorted(self.suspension.reasons()), "round": self.round,
            "loss": self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None,
            "tokens_per_s": float(self.last_tps), "tokens": int(self.session.tokens_seen),
            "rounds_done": len(self.history), "uptime_s": round(time.time() - self.started_at, 1),
            "last_round": outcomes, "checkpoints": str(self.session.store.root),
            "reachability": "client" if self.client_mode else "public", "maddrs": list(self.maddrs),
        }

    def describe(self) -> str:
        return f"path {path_name(self.session.path)} modules {', '.join(self.session.module_ids)}"

    def start_heartbeat(self, period_s: float = PEER_RECORD_TTL_S / 3) -> None:
        """Re-publish this node's record in the background: rounds can be longer than the
        record's lifetime, and a node that vanishes must drop out of others' view."""
        if self._heartbeat is not None:
            return

        def beat():
            while not self._heartbeat_stop.wait(period_s):
                self.publish_status()

        self._heartbeat = threading.Thread(target=beat, name="p2ptrain-heartbeat", daemon=True)
        self._heartbeat.start()

    def shutdown(self) -> None:
        if self._background is not None:
            self._background.join(timeout=self.cfg.averaging.averaging_timeout + 30)
        self.session.store.wait()
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        for slot in self.slots.values():
            try:
                slot.averager.shutdown()
            except Exception as e:
                logger.debug("averager shutdown: %s", e)


def _neg(peer_id: str) -> tuple:
    """Sort key so that, among equal rounds, the smallest peer id wins a max()."""
    return tuple(-ord(c) for c in peer_id)
