"""One hivemind averager per module: all-reduce of pseudo-gradients among the peers whose
paths contain the module, with the checks hivemind itself does not make.

hivemind's reducers add whatever parts and weights senders declare, and a peer dying
mid all-reduce does not fail `step()`: the slice it was reducing silently keeps each
survivor's own values. Our averager (ModuleAverager, with CheckedAllReduceRunner):
  * refuses parts of the wrong size, non-finite values and weights outside (0, tokens
    per round], banning the sender from that all-reduce and reporting it;
  * reports the whole slice of a reducer that failed us (even the parts it did return),
    so every survivor can treat that slice alike (the node skips it this round) instead
    of drifting apart — and its own slice when at least half the group did not get all of
    it back (those members skip it: a group of two must not split over one late part);
  * reduces each slice with the run's aggregation rule (averaging.aggregation: hivemind's
    weighted mean, or CenteredClip / trimmed mean from aggregation.py, which bound what one
    sender can do), in a subclass of hivemind's reducer that keeps its wire format;
  * with a robust rule, checks every slice a reducer returns against our own part of it:
    one further than averaging.reducer_check × our part's norm (or non-finite) is not used
    — we keep our own values there, exactly like a failed reducer's slice — and the
    reducer is reported with how far past the bound the slice was (the node bans it from
    matchmaking for averaging.ban_seconds when that is far, or at its third refused slice);
  * serves its module's global state with a fingerprint, and downloads a peer's state
    with a byte cap known from the module's own size;
  * assembles its group as soon as all live holders of the module are in it.
Whether holders still agree after a round is consistency.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import typing
from typing import Any, Callable, Optional, Sequence

import torch

from p2ptrain.swarm.aggregation import OUTLIER_FACTOR, OUTLIER_SCALE, aggregate_reporting
from p2ptrain.swarm.progress import TransferProgress
from p2ptrain.swarm.wire_codec import (NF4_BYTES_PER_VALUE, deserialize_part, nf4_compression, nf4_roundtrip,
                                      returns_averages, serialize_part)

logger = logging.getLogger(__name__)

FINGERPRINT_DIMS = 8
_FINGERPRINT_SEED = 0x5EED


def fingerprint(tensors: Sequence[torch.Tensor], dims: int = FINGERPRINT_DIMS) -> tuple[list[float], float]:
    """Random projections of the concatenated tensors, and their L2 norm.

    Two peers holding the same values (up to wire-compression error) get fingerprints
    within a small fraction of the norm; a slice that differs by a sizeable fraction of
    the vector moves at least one projection by about its own norm.
    """
    projections = torch.zeros(dims, dtype=torch.float64)
    sq = 0.0
    for index, t in enumerate(tensors):
        flat = t.detach().reshape(-1).to(torch.float32)
        gen = torch.Generator().manual_seed(_FINGERPRINT_SEED + index)
        directions = torch.randn(dims, flat.numel(), generator=gen) if flat.numel() <= 1 << 20 else None
        if directions is not None:
            projections += (directions @ flat).double()
        else:  # large tensors: one direction at a time to bound memory
            for j in range(dims):
                projections[j] += float(torch.randn(flat.numel(), generator=gen) @ flat)
        sq += float((flat.double() ** 2).sum())
    return projections.tolist(), math.sqrt(sq)


# Relative fingerprint difference that wire compression alone can cause between peers
# holding "the same" average: each projection moves by about the codec's relative RMS
# error (fp16 ~7e-4 after the two compressions of an all-reduce, blockwise 8-bit ~1.5e-2),
# so these bounds sit at ~7 standard deviations. A slice left un-averaged moves a
# projection by about that slice's share of the vector's norm: far above them.
# 4-bit NF4 returns the average itself (wire_codec.returns_averages), so its holders end
# equal up to float32 rounding: fp16's bound is ample.
SYNC_TOLERANCE = {"none": 1e-5, "fp16": 5e-3, "8bit": 1e-1, "4bit": 5e-3}


def sync_tolerance(compression: str, configured: float) -> float:
    """The configured tolerance, or the codec's own bound when configured is 0 (auto)."""
    return configured if configured > 0 else SYNC_TOLERANCE[compression]


def fingerprint_distance(a: Sequence[float], b: Sequence[float], scale: float) -> float:
    """Largest projection difference as a fraction of the vector's norm (inf if incomparable)."""
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) for x, y in zip(a, b)) / max(scale, 1e-12)


def fingerprints_agree(a: Sequence[float], b: Sequence[float], scale: float, tolerance: float) -> bool:
    """True when two fingerprints differ by at most tolerance × scale in every projection."""
    return fingerprint_distance(a, b, scale) <= tolerance


# Bytes per value on the wire for each codec (hivemind's blockwise 8-bit: one fp32 absmax
# per 4096 values; each part also carries its 256-entry fp32 codebook, 1 KiB, not counted
# here; p2ptrain's NF4: one fp32 absmax per 64 values).
WIRE_BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "8bit": 1.0 + 4.0 / 4096, "4bit": NF4_BYTES_PER_VALUE}
MIN_PART_BYTES, MAX_PART_BYTES, PARTS_PER_MODULE = 1 << 10, 512 << 10, 16


def averaging_part_bytes(values: int, compression: str) -> int:
    """Size of the parts an all-reduce cuts a module into: 1/16 of its compressed size, so
    that every reducer of a group of up to 16 gets a share of even a small module (and a
    reducer that dies always leaves a slice the fingerprints can see), within [1 KiB,
    512 KiB]. Measured on loopback, a part costs about 140 bytes of framing (4 KiB parts:
    1.054x the all-reduce bound, 50 KB parts 1.020x); 512 KiB is hivemind's default."""
    payload = values * WIRE_BYTES_PER_VALUE[compression]
    return int(min(max(payload / PARTS_PER_MODULE, MIN_PART_BYTES), MAX_PART_BYTES))


def make_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression
    return {"none": NoCompression, "fp16": Float16Compression, "8bit": BlockwiseQuantization,
            "4bit": nf4_compression}[name]()


BANDWIDTH_CLAIM_RANGE = 4.0  # a peer's reduce share follows its claimed bandwidth within 4x of the group's median


def claimed_rate(claim: Any) -> Optional[float]:
    """A rate a group member claimed in its gather data (a stranger's word): a finite number
    ≥ 0, or None for anything else (a string, a bool, NaN, a negative number)."""
    ok = isinstance(claim, (int, float)) and not isinstance(claim, bool) and math.isfinite(claim) and claim >= 0
    return float(claim) if ok else None


def balanced_bandwidths(claims: Sequence[Any], client: Sequence[bool]) -> list[Optional[float]]:
    """The bandwidths the all-reduce's load balancing may use, from what each group member
    claimed in its gather data (a stranger's word): a claim that is not a finite number ≥ 0
    counts as "not said" (None: the group's mean), client-mode peers reduce nothing (0), and
    every positive claim is clamped to [median / 4, median × 4] of the positive claims, so
    a peer that claims a huge link takes at most 4× a median member's share of the reducing,
    not the whole module (a reducer sees, and returns, the slices it reduces)."""
    valid = [0.0 if is_client else claimed_rate(claim) for claim, is_client in zip(claims, client)]
    positive = sorted(v for v in valid if v)
    if not positive:
        return [None if v is None or v > 0 else 0.0 for v in valid]
    median = positive[len(positive) // 2]
    lo, hi = median / BANDWIDTH_CLAIM_RANGE, median * BANDWIDTH_CLAIM_RANGE
    return [v if not v else min(max(v, lo), hi) for v in valid]


CHUNK_TIMEOUT_FLOOR_S = 2.0  # never shorter: a loaded machine stalls its averager for about this long
CHUNK_WAIT_MARGIN = 2.0  # times the slowest member's whole upload of the round (fixed before measuring)


def chunk_timeout_seconds(path_bytes: float, claims: Sequence[Any], fallback: float) -> float:
    """How long a member may keep us waiting for its next chunk before hivemind leaves its
    slice un-averaged (the sender timeout; a reducer gets twice this): `fallback`
    (averaging_timeout / 6), shortened for a group whose links are known to be fast.

    A chunk can wait for more than its own bytes: streams between two peers share one
    connection, so a small module's part queues behind a big module's parts in the
    sender's socket (measured with a 1 Mbit/s member: 7.8 s for a 4 kB part's average).
    What bounds the wait is the slowest member's whole upload of the round: each of the
    node's modules moves 2 (n − 1) / n of its bytes out (its values to the reducers, its
    slice's averages back), `path_bytes` in all at most. When every member declared its
    link (`join --upload-mbps`), the timeout is CHUNK_WAIT_MARGIN × that upload over the
    slowest declared link, at least CHUNK_TIMEOUT_FLOOR_S and never more than `fallback`:
    a member that vanishes mid all-reduce then costs a group of fast links seconds instead
    of `fallback`. Never more, because a timeout that follows a slow link's whole upload
    makes a vanished member cost 4× that upload (measured: it keeps an honest 1 Mbit/s
    member in; modelled: at the gpu preset's module sizes it stalls 10,000 peers). If any
    member declared nothing usable (or our path's size is unknown), `fallback` stands.

    A claim is a stranger's word: one that claims a crawl only brings back `fallback`."""
    links = [claimed_rate(claim) or None for claim in claims]  # a link of 0 Mbit/s declares nothing
    if len(links) < 2 or None in links or not path_bytes > 0:
        return fallback
    n = len(links)
    upload_s = path_bytes * 2 * (n - 1) / n / (min(links) * 1e6 / 8)
    return min(max(CHUNK_WAIT_MARGIN * upload_s, CHUNK_TIMEOUT_FLOOR_S), max(fallback, CHUNK_TIMEOUT_FLOOR_S))


MAX_SHARE_OF_EQUAL = 2.0  # no member reduces more than twice an equal share of a module


def capped_shares(sizes: Sequence[int], client: Sequence[bool], cap: float = MAX_SHARE_OF_EQUAL) -> tuple[int, ...]:
    """Reduce shares (values per member, as hivemind's load balancing returns them) with no
    member above `cap` × an equal share of the averaging members: load balancing is a
    minimax — when the slowest links set the pace it hands all the reducing to the fastest
    claim, and a reducer decides what its slice's average is. The excess goes to the other
    averaging members, in proportion to their shares (evenly if they have none)."""
    sizes = [int(v) for v in sizes]
    total, members = sum(sizes), [i for i, c in enumerate(client) if not c]
    if total == 0 or len(members) < 2:
        return tuple(sizes)
    limit = math.ceil(cap * total / len(members))
    while True:
        over = [i for i in members if sizes[i] > limit]
        if not over:
            return tuple(sizes)
        excess = sum(sizes[i] - limit for i in over)
        for i in over:
            sizes[i] = limit
        room = [i for i in members if sizes[i] < limit]
        base = sum(sizes[i] for i in room)
        given = 0
        for k, i in enumerate(room):
            add = (excess - given if k == len(room) - 1 else
                   (excess * sizes[i] // base if base else excess // len(room)))
            sizes[i] += add
            given += add


# at least this long for our reducer's last replies and the senders' receipts (bytes are final
# then, and who confirmed our slice is known); at least twice the sender timeout, since a
# handler whose receipt never comes ends after one sender timeout by itself
SERVED_WAIT_S = 5.0


# how long we keep the stream of a sender that is not in any group of ours open after
# telling it so, for it to hang up first (it does at once; see rpc_aggregate_part)
NOT_IN_GROUP_LINGER_S = 5.0


async def _timed(stream, note: Callable[[float], None]):
    """`stream`'s messages, each one's wait noted: the time from asking for it to its
    arrival (or to the timeout or error that ended the wait), which is what hivemind's
    sender and reducer timeouts bound."""
    iterator = stream.__aiter__()
    while True:
        asked = time.monotonic()
        try:
            msg = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except BaseException:
            note(time.monotonic() - asked)
            raise
        note(time.monotonic() - asked)
        yield msg


async def _drain(stream) -> None:
    async for _ in stream:
        pass


class _CountingStub:
    """A reducer's stub whose reply stream counts the wire bytes of the averaged parts it
    brings back (hivemind reads them inside `_communicate_with_peer`, past any hook), and
    tells the runner when that reducer is not in this group at all."""

    def __init__(self, stub, runner, peer):
        self._stub, self._runner, self._peer = stub, runner, peer

    async def rpc_aggregate_part(self, inputs):
        stream = await self._stub.rpc_aggregate_part(inputs)
        return self._counted(stream)

    async def _counted(self, stream):
        from hivemind.proto import averaging_pb2
        replies = 0
        try:
            async for msg in _timed(stream, self._runner.note_reducer_wait):
                if replies == 0 and msg.code == averaging_pb2.BAD_GROUP_ID:
                    await self._runner.sender_not_in_group(self._peer)
                replies += 1
                self._runner.bytes_received += len(msg.tensor_part.buffer)
                yield msg
        except ConnectionError:  # a broken pipe: it hung up on us mid-write
            if replies == 0:
                await self._runner.sender_not_in_group(self._peer)
            raise
        if replies == 0:
            # it closed our stream without a word. A BAD_GROUP_ID followed by a hang-up while
            # our parts are still being written is lost on the way (about half the time,
            # measured before our own handler learnt to let the sender hang up first; a
            # plain hivemind peer still hangs up at once), and a dead reducer says nothing
            await self._runner.sender_not_in_group(self._peer)

    def __getattr__(self, name):
        return getattr(self._stub, name)


def _averager_class():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
    from hivemind.averaging.load_balancing import load_balance_peers
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import (achain, aiter_with_timeout, amap_in_executor, anext, azip, as_aiter,
                                        enter_asynchronously)
    from hivemind.utils.mpfuture import MPFuture
    from hivemind.utils.streaming import combine_from_streaming
    from hivemind.utils.timed_storage import get_dht_time

    class RobustTensorPartReducer(TensorPartReducer):
        """hivemind's reducer with a pluggable rule (aggregation.py): it keeps the parts of its
        current slice, with their weights, and aggregates them once every live sender's part
        is in, instead of summing them as they arrive. Wire format, codecs, part order, sender
        bans and timeouts are hivemind's own.

        Two fixes to hivemind 1.1.12's reducer, both seen killing a round when a peer dies
        mid all-reduce (the fault suite's SIGKILL while sending):
          * every sender of a part awaits one shared future; hivemind awaits it bare, so when
            a dead peer's stream handler is cancelled the future is cancelled for everyone —
            the live senders' next part then raises InvalidStateError, our own slice never
            completes, and this member's whole all-reduce times out while the others' succeed
            (a split two survivors can never vote away). We await it shielded.
          * hivemind counts a part as received before it waits for the earlier parts; a sender
            banned while its part waits is then still expected for that part, which never
            arrives. We count a part when it is taken into the slice.
        """

        def __init__(self, part_shapes, num_senders: int, *, rule: str, tau: float,
                     on_outlier: Callable[[int], None] = lambda sender_index: None, own_rms: float = 0.0):
            self.rule, self.tau, self.on_outlier, self.own_rms = rule, tau, on_outlier, own_rms
            self.current_parts: list[tuple[torch.Tensor, float]] = []
            self.current_senders: list[int] = []
            super().__init__(part_shapes, num_senders)

        def reset_accumulators(self):
            super().reset_accumulators()
            self.current_parts = []
            self.current_senders = []

        async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                                  weight: float = 1.0) -> torch.Tensor:
            assert 0 <= sender_index < self.num_senders, "invalid sender index"
            assert 0 <= part_index < self.num_parts, "invalid part index"
            while part_index > self.current_part_index:
                await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                if self.finished.is_set():
                    raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
            if self.sender_failed_after[sender_index] != float("inf"):
                raise BannedException(f"sender {sender_index} was banned in background")
            assert part_index == self.current_part_index
            # counted only now (see the class docstring): a ban from here on leaves this part in
            self.num_parts_received[sender_index] += 1
            current_part_future = self.current_part_future
            self.current_parts.append((tensor_part, float(weight)))
            self.current_senders.append(sender_index)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
            # shielded: cancelling this sender's wait must not cancel the part for the others
            return await asyncio.shield(current_part_future)

        def check_current_part_finished(self):
            assert self.current_part_accumulated_from <= self.num_current_senders
            if self.current_part_accumulated_from == self.num_current_senders:
                if self.current_parts:
                    parts, weights = zip(*self.current_parts)
                    floor = (OUTLIER_SCALE * self.own_rms * math.sqrt(parts[0].numel()) if self.own_rms > 0
                             else math.inf)
                    result, outliers = aggregate_reporting(self.rule, parts, weights, self.tau, floor)
                    for index in outliers:
                        self.on_outlier(self.current_senders[index])
                else:  # every sender of this part failed: nobody is waiting for it
                    result = torch.zeros(self.part_shapes[self.current_part_index])
                self.current_part_future.set_result(result)
                self.reset_accumulators()

    class CheckedAllReduceRunner(AllReduceRunner):
        """hivemind's butterfly all-reduce, with the checks its reducer does not make.

        Each part a sender hands us to reduce must have the exact shape of our slice, finite
        values, a wire size no larger than the slice uncompressed, and a declared weight that
        is finite, positive and at most `max_weight` (the run's tokens per round): anything
        else bans the sender from this all-reduce (hivemind then averages the slice without
        it, the same for every member) and is reported. A reducer that fails us leaves its
        slice un-averaged; we record which values, so the node can treat that slice the same
        way on every survivor instead of keeping each survivor's own values.
        """

        def __init__(self, *, max_weight: float, claimed_weights: dict[str, Optional[float]], rule: str = "mean",
                     tau: float = 0.0, reducer_check: float = 0.0, **kwargs):
            super().__init__(**kwargs)
            self.max_weight = max_weight
            # sender → the weight its round claim declared (None: its claim was malformed, so
            # none of its parts is taken)
            self.claimed_weights = claimed_weights
            self.rule = rule
            self.rejected: dict[str, str] = {}  # sender → why its parts were refused
            self.failed_ranges: list[tuple[int, int]] = []  # (offset, length) of un-averaged values
            # reducer → (why the slice it returned was refused, how many times past the check's
            # bound it was: inf for non-finite values)
            self.lying_reducers: dict[str, tuple[str, float]] = {}
            self.outliers: dict[str, str] = {}  # sender → why our robust rule dropped some of its parts
            # wire bytes of tensor parts, both ways: our parts out and their averages back, and as
            # a reducer, the senders' parts in and our deltas out (metrics: bytes per module)
            self.bytes_sent = 0
            self.bytes_received = 0
            # the longest wait for a sender's next part (at our reducer) and for a reducer's next
            # average (at our sender): how close this all-reduce came to its chunk timeouts
            self.longest_sender_wait = 0.0
            self.longest_reducer_wait = 0.0
            # our reducer's replies to senders can still be on their way when our own parts are
            # all back: `served` is set once every sender's stream has ended (bytes are final)
            self._serving: set[str] = set()  # senders whose stream our reducer is still answering
            self.served = asyncio.Event()
            self.served.set()
            # senders that did not confirm getting every part of our slice back (their stream ended
            # early, they were banned, they gave up waiting): they skip our slice, see own_slice_split()
            self.undelivered: set[str] = set()
            # as a sender: averaged parts back from each reducer, and when all of them are in (then,
            # and only then, we send that reducer a receipt: see _generate_input_for_peer)
            self._results_from = [0] * len(self.ordered_peer_ids)
            self._all_results_from = [asyncio.Event() for _ in self.ordered_peer_ids]
            self._failed_reducers: set[int] = set()
            own_index = self.ordered_peer_ids.index(self.peer_id)
            # (offset, length) of our slice's parts, kept: hivemind drops the parts when it finishes
            self._own_ranges = [(part.storage_offset(), part.numel())
                                for part, _info in self.tensor_part_container._input_parts_by_peer[own_index]]
            plain = self.tensor_part_reducer
            self.tensor_part_reducer = self.make_reducer(plain, rule, tau)
            if self.tensor_part_reducer is not plain:
                plain.num_senders = 0  # discarded unused: no "received 0% of input tensors" warning
                plain.finalize()
            container = self.tensor_part_container
            register_failed = container.register_failed_reducer
            register_processed = container.register_processed_part
            total = sum(t.numel() for t in container.local_tensors)
            rms = math.sqrt(sum(float(t.double().pow(2).sum()) for t in container.local_tensors) / max(total, 1))
            own_weight = self.weight if self.weight and self.weight > 0 else max_weight
            # a peer that trained fewer tokens than a full round expects a proportionally larger gap
            check_scale = reducer_check * max(1.0, max_weight / own_weight)

            averages_back = returns_averages(container.compression.compression_type)

            def register_processed_part(peer_index: int, part_index: int, delta: torch.Tensor):
                """Check a slice a reducer returned (as a delta from our own part) before using it.
                With NF4 a reducer returns the average itself (wire_codec.returns_averages), and our
                own slice's average is rounded the way we send it to the others."""
                own = container._input_parts_by_peer[peer_index][part_index][0]
                zero_fill = peer_index in self._failed_reducers  # a failed reducer's: no result
                if averages_back and not zero_fill and delta.shape == own.shape:
                    delta = (delta if peer_index != own_index else nf4_roundtrip(own + delta)) - own
                if peer_index != own_index:
                    if not zero_fill:
                        self._results_from[peer_index] += 1
                        if self._results_from[peer_index] == container.num_parts_by_peer[peer_index]:
                            self._all_results_from[peer_index].set()
                    why, excess = None, math.inf
                    if delta.shape != own.shape:
                        why = "a slice of the wrong size"
                    elif not torch.isfinite(delta).all():
                        why = "non-finite values in the slice it reduced"
                    elif reducer_check > 0 and rule != "mean" and rms > 0:
                        bound = check_scale * max(float(own.norm()), rms * math.sqrt(own.numel()))
                        gap = float(delta.double().norm())
                        if gap > bound:
                            why = f"returned a slice {gap:.3g} from our part, more than the rule allows ({bound:.3g})"
                            excess = gap / bound
                    if why is not None:
                        peer = self.ordered_peer_ids[peer_index].to_base58()
                        self.lying_reducers.setdefault(peer, (why, excess))
                        self.failed_ranges.append((own.storage_offset(), own.numel()))
                        delta = torch.zeros_like(own)
                register_processed(peer_index, part_index, delta)

            container.register_processed_part = register_processed_part

            def register_failed_reducer(peer_index: int):
                # the reducer's whole slice, not only the parts it had not returned yet: a reducer
                # that fails mid-way can have returned a different number of parts to each member
                # (measured: one that raises after its first part left two honest peers one part
                # apart, and with two voters no majority ever re-syncs them); skipping all of it
                # keeps every member that saw it fail in agreement. A reducer whose every part
                # came back has our receipt (it keeps its slice), so we keep it too, even if its
                # stream then ends badly.
                if self._all_results_from[peer_index].is_set():
                    return
                self._failed_reducers.add(peer_index)
                for part, _info in container._input_parts_by_peer[peer_index]:
                    self.failed_ranges.append((part.storage_offset(), part.numel()))
                register_failed(peer_index)

            container.register_failed_reducer = register_failed_reducer

        def make_reducer(self, plain, rule: str, tau: float):
            """The reducer of our slice, for every rule (the weighted mean too: hivemind's own
            reducer has the faults RobustTensorPartReducer fixes)."""

            def on_outlier(sender_index: int):
                sender = self.sender_peer_ids[sender_index].to_base58()
                self.outliers.setdefault(sender, f"parts further than {OUTLIER_FACTOR:g} clip radii from the "
                                                 "robust aggregate (dropped)")

            local = self.tensor_part_container.local_tensors
            own_rms = math.sqrt(sum(float(t.double().pow(2).sum()) for t in local)
                                / max(sum(t.numel() for t in local), 1))
            return RobustTensorPartReducer(plain.part_shapes, plain.num_senders, rule=rule, tau=tau,
                                           on_outlier=on_outlier, own_rms=own_rms)

        async def _generate_input_for_peer(self, peer_index: int):
            async for msg in super()._generate_input_for_peer(peer_index):
                self.bytes_sent += len(msg.tensor_part.buffer)
                yield msg
            if self.should_delay_results(self.peer_id):
                return  # hivemind's client mode reads results only after sending: no receipt
            # the receipt: every averaged part of this reducer's slice is in (and used). The
            # reducer keeps its slice's average only with it, so a member that gives up on a
            # reducer's last parts and the reducer skip the same slice (see own_slice_split)
            await self._all_results_from[peer_index].wait()
            if peer_index not in self._failed_reducers:
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART)

        def note_sender_wait(self, seconds: float) -> None:
            self.longest_sender_wait = max(self.longest_sender_wait, seconds)

        def note_reducer_wait(self, seconds: float) -> None:
            self.longest_reducer_wait = max(self.longest_reducer_wait, seconds)

        def _get_peer_stub(self, peer):
            return _CountingStub(super()._get_peer_stub(peer), self, peer)

        async def sender_not_in_group(self, peer) -> None:
            """`peer` answered our parts with BAD_GROUP_ID, or hung up without a word: it runs
            no all-reduce of this group (a follower that gave up its search as the leader
            assembled the group counts in the leader's list but never got it; or it died), so
            it will send our reducer nothing either.
            Stop waiting for it now, as hivemind does for a sender silent for `sender_timeout`
            (10 s with the default settings, each round). A sender whose parts have started
            to arrive is left alone: the answer cannot be about this group then. So is a
            reducer of nothing, whose empty answer means nothing."""
            index = self.ordered_peer_ids.index(peer)
            if (peer in self.sender_peer_ids and peer not in self.active_senders
                    and self.tensor_part_container.num_parts_by_peer[index] > 0):
                await self._ban_sender(peer)

        def _part_problem(self, sender: str, part_index: int, msg, tensor) -> str | None:
            shapes = self.tensor_part_reducer.part_shapes
            if part_index >= len(shapes):
                return "more parts than its slice has"
            claimed = self.claimed_weights.get(sender)
            if claimed is None:
                return "its round claim was malformed or for another round"
            weight = msg.weight
            if not (math.isfinite(weight) and 0.0 < weight <= self.max_weight):
                return f"weight {weight!r} outside (0, {self.max_weight:g}]"
            if weight != claimed:
                return f"weight {weight!r} differs from the {claimed:g} tokens it claimed"
            if tensor is None or tuple(tensor.shape) != tuple(shapes[part_index]):
                return "a part of the wrong size"
            if not torch.isfinite(tensor).all():
                return "non-finite values"
            return None

        def _decode(self, part_index_box: list, msg):
            """Deserialize a part only if its wire size fits the slice (checked before allocation)."""
            shapes = self.tensor_part_reducer.part_shapes
            index = part_index_box[0]
            part_index_box[0] += 1
            limit = 4 * (math.prod(shapes[index]) if index < len(shapes) else 0) + 4096
            self.bytes_received += len(msg.tensor_part.buffer)
            if len(msg.tensor_part.buffer) > limit:
                return None, msg
            try:
                return deserialize_part(msg.tensor_part), msg
            except Exception:  # a malformed part: refused below like any other bad part
                return None, msg

        async def _accumulate_parts_streaming(self, stream, sender_index: int):
            sender = self.sender_peer_ids[sender_index].to_base58()
            self._serving.add(sender)
            self.served.clear()
            receipt: list[bool] = []
            try:
                async for msg in self._reduce_stream(_timed(stream, self.note_sender_wait), sender_index, receipt):
                    yield msg
            finally:
                if not receipt:
                    self.undelivered.add(sender)
                self._serving.discard(sender)
                if not self._serving:
                    self.served.set()

        def own_slice_split(self) -> bool:
            """Would keeping our slice's average split the group? Every sender that did not get
            all of it back (or still has not, when we stop waiting) sees us as a failed reducer
            and skips our slice; if they are at least half the group (us included), we skip it
            too, so that a strict majority holds the same values. The usual case is a group of
            two: one member gives up on our last parts (a stall under load, a broken stream)
            while we keep our average — two voters that never agree again.
            Senders whose parts we refused (NaN, a wrong size, a weight it did not claim) are
            left out of both counts: they broke the protocol, so which slice they keep is no
            vote among honest holders (and counting them made the outcome a race: our slice
            was skipped only if the liar's stream had started before our own parts were back)."""
            refused = set(self.rejected)
            missing = (self.undelivered | self._serving | {p.to_base58() for p in self.banned_senders}) - refused
            voters = {p.to_base58() for p in self.sender_peer_ids} - refused
            return bool(missing) and 2 * len(missing) >= len(voters)

        def skip_own_slice(self) -> None:
            """Report our whole slice as un-averaged (see own_slice_split)."""
            self.failed_ranges.extend(self._own_ranges)

        async def _reduce_stream(self, stream, sender_index: int, receipt: list[bool]):
            """Reduce a sender's parts and stream back the averages; `receipt` gets True once the
            sender confirms it has them all (a sender in hivemind's client mode never does: for
            it, the end of its parts stands in)."""
            part_index, decoded = 0, [0]
            sender = self.sender_peer_ids[sender_index]
            num_parts = self.tensor_part_reducer.num_parts
            sends_receipt = not self.should_delay_results(sender)
            try:
                loop = asyncio.get_event_loop()
                async for tensor_part, msg in amap_in_executor(
                        lambda m: self._decode(decoded, m), stream, max_prefetch=self.tensor_part_container.prefetch):
                    if part_index == num_parts and sends_receipt and msg.code == averaging_pb2.AVERAGED_PART:
                        receipt.append(True)
                        break
                    problem = self._part_problem(sender.to_base58(), part_index, msg, tensor_part)
                    if problem is not None:
                        self.rejected[sender.to_base58()] = problem
                        break  # the finally below bans the sender from this all-reduce
                    try:
                        averaged_part = await self.tensor_part_reducer.accumulate_part(
                            sender_index, part_index, tensor_part, weight=msg.weight)
                        part_index += 1
                    except BannedException:
                        break
                    compression = msg.tensor_part.compression
                    # hivemind's codecs answer with the difference from the sender's part, NF4
                    # with the average itself, so that every holder ends with the same values
                    answer = averaged_part if returns_averages(compression) else averaged_part - tensor_part
                    serialized_delta = await loop.run_in_executor(
                        None, lambda: serialize_part(answer, compression))
                    self.bytes_sent += len(serialized_delta.buffer)
                    yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized_delta)
                if part_index == num_parts and not sends_receipt:
                    receipt.append(True)
            finally:
                if part_index != num_parts:
                    await self._ban_sender(sender)

    class ModuleAverager(DecentralizedAverager):
        """A DecentralizedAverager for one module: checked all-reduce parts, a report of what
        failed, a module state served to peers, downloads from chosen peers with a size cap,
        and a group size that follows the module's live holders."""

        runner_class = CheckedAllReduceRunner  # the all-reduce each step runs
        reducer_class = RobustTensorPartReducer  # what reduces our slice of it

        def __init__(self, averaged_tensors, dht, *, state_provider: Callable[[], tuple[Any, list]],
                     max_weight: float, aggregation: str = "mean", clip_radius: float = 0.0,
                     reducer_check: float = 0.0, path_bytes: float = 0.0, **kwargs):
            self._state_provider = state_provider
            # wire bytes of one all-reduce of every module of the node's path: what sizes the chunk timeout
            self._path_bytes = path_bytes
            self._max_weight = max_weight
            self._robust = dict(rule=aggregation, tau=clip_radius, reducer_check=reducer_check)
            super().__init__(averaged_tensors, dht, **kwargs)

        async def _declare_for_download_periodically(self):
            """hivemind re-announces every averager under `<prefix>.all_averagers` after each
            all-reduce and every `declare_state_period`, for its `load_state_from_peers` to pick
            a donor. p2ptrain never reads that key: a state is fetched from holders named in
            signed peer records (state_transfer.py), and serving one needs no announcement.
            The announcements were 17 % of a tiny-model peer's bytes per round (six DHT RPCs
            each) and all of an idle swarm's traffic, so none are made."""
            return

        # ------------------------------------------------------------ all-reduce

        async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
            """As hivemind's, but returns {"gathered", "rejected", "failed", "lying", "outliers"} instead of
            the gathered values alone (runs in the averager's process; the result goes back through step()).
            A group that assembled with a peer we do not admit is left before any data moves."""
            admission = getattr(self, "_admission", None)
            if admission is not None:
                strangers = admission.strangers(p.to_base58() for p in group_info.peer_ids)
                if strangers:
                    raise MatchmakingException(f"left a group with {len(strangers)} peer(s) this node does "
                                               "not admit")
            formed_at = time.time()  # wall clock: the node subtracts the moment it asked for a group
            try:
                bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
                user_gathered = {}
                for peer_id, raw in zip(group_info.peer_ids, user_gathered_bytes):
                    try:
                        user_gathered[peer_id] = self.serializer.loads(raw)
                    except Exception:  # undecodable: the node's protocol parser rejects None
                        user_gathered[peer_id] = None
                modes = tuple(map(AveragingMode, mode_ids))
                is_client = [m == AveragingMode.CLIENT for m in modes]
                download_bandwidths = balanced_bandwidths(bandwidths, is_client)
                peer_fractions = await asyncio.get_event_loop().run_in_executor(
                    None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size)
                peer_fractions = capped_shares(peer_fractions, is_client)
                if kwargs.get("sender_timeout") is not None:  # hivemind's own: next_chunk_timeout
                    sender_timeout = chunk_timeout_seconds(self._path_bytes, bandwidths,
                                                           fallback=kwargs["sender_timeout"])
                    kwargs.update(sender_timeout=sender_timeout, reducer_timeout=2 * sender_timeout)
                claimed_weights = self._claimed_weights(user_gathered)
                async with enter_asynchronously(self.get_tensors()) as local_tensors:
                    runner = await self._run_allreduce_inplace_(local_tensors, group_info,
                                                                peer_fractions=peer_fractions,
                                                                claimed_weights=claimed_weights, **kwargs)
                    seconds_allreduce = time.time() - formed_at
                    try:  # wire bytes are final once our replies to every sender are out
                        await asyncio.wait_for(runner.served.wait(),
                                               max(SERVED_WAIT_S, 2 * (runner.sender_timeout or 0.0)))
                    except asyncio.TimeoutError:
                        pass  # a sender stopped reading: the count stays as it is (a lower bound)
                    if runner.own_slice_split():
                        runner.skip_own_slice()
                    return {"gathered": user_gathered, "rejected": dict(runner.rejected),
                            "failed": list(runner.failed_ranges), "lying": dict(runner.lying_reducers),
                            "outliers": dict(runner.outliers), "group_formed_at": formed_at,
                            "seconds_allreduce": seconds_allreduce,
                            "bytes_sent": runner.bytes_sent, "bytes_received": runner.bytes_received,
                            "chunk_timeout": runner.sender_timeout, "longest_sender_wait": runner.longest_sender_wait,
                            "longest_reducer_wait": runner.longest_reducer_wait}
            except BaseException as e:
                if isinstance(e, Exception):
                    logger.debug("all-reduce failed: %r", e)
                raise MatchmakingException(f"Unable to run All-Reduce: {e}")

        def _claimed_weights(self, gathered: dict) -> dict[str, Optional[float]]:
            """Each member's declared weight from its round claim, if the claim parses and names
            the round we average; None otherwise (its parts will be refused)."""
            from p2ptrain.swarm.protocol import RoundClaim, parse
            own, _ = parse(RoundClaim, gathered.get(self.peer_id))
            weights: dict[str, Optional[float]] = {}
            for peer, claim in gathered.items():
                parsed, _ = parse(RoundClaim, claim)
                ok = (parsed is not None and own is not None and parsed.round == own.round
                      and parsed.stage == own.stage)
                weights[peer.to_base58()] = float(parsed.tokens) if ok else None
            return weights

        async def rpc_aggregate_part(self, stream, context):
            """As hivemind's, but a sender whose parts arrive before our all-reduce has started waits
            for it shielded: hivemind awaits the group's future bare, so a sender that dies while
            waiting (its handler is cancelled) cancelled the future for us — our own all-reduce then
            failed with InvalidStateError while the other members' succeeded (measured: the fault
            suite's peer killed while sending left two survivors split)."""
            request = await anext(stream)
            if request.group_id not in self._running_groups:
                # the leader began the all-reduce before its answer reached us (hivemind's case)
                await self._pending_groups_registered.wait()
            future = self._running_groups.get(request.group_id)
            if future is None:
                yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                # the sender hangs up first: hanging up ourselves while it still wrote its parts
                # lost this answer on the way about half the time (measured on loopback), and
                # now and then its end of the stream never closed, so it waited for us until
                # its reducer timeout
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_drain(stream), NOT_IN_GROUP_LINGER_S)
                return
            group = await asyncio.shield(future)
            async for message in group.rpc_aggregate_part(achain(as_aiter(request), stream), context):
                yield message

        # hivemind registers RPCs from their type hints, resolved in hivemind's own module
        rpc_aggregate_part.__annotations__ = typing.get_type_hints(DecentralizedAverager.rpc_aggregate_part)

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            group_id = group_info.group_id if group_id is None else group_id
            runner = self.runner_class(
                p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
                ordered_peer_ids=group_info.peer_ids, max_weight=self._max_weight, **self._robust, **kwargs)
            self._running_groups[group_id].set_result(runner)
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update, alpha=self._averaging_alpha)
                    self.last_updated = get_dht_time()
                    self._state_updated.set()
            return runner

        async def _step(self, *, step, future_for_init):
            """As hivemind's, but once the step is over no group is pending any more. hivemind
            clears `_pending_groups_registered` as a search starts and sets it only when a
            group registers, so a step that ended without one (no group in time) left it
            cleared: a member that counted us in a group we never joined (a follower giving up
            its search as its leader assembled) then waited for our answer to its parts until
            our next round's group registered, or its reducer timeout (20 s with the default
            settings); with it set, we answer BAD_GROUP_ID at once (see sender_not_in_group)."""
            try:
                await super()._step(step=step, future_for_init=future_for_init)
            finally:
                self._pending_groups_registered.set()

        async def _shutdown(self, timeout: Optional[float]) -> None:
            """As hivemind's, then this process's connection to the DHT's p2pd is closed.
            hivemind never closes it, so every averager left its client socket
            (/tmp/hivemind-p2pclient-*.sock) behind: one file per module each time a node
            stopped, thousands on a volunteer's machine whose daemon pauses and resumes."""
            try:
                await super()._shutdown(timeout)
            finally:
                await self._p2p.shutdown()

        def set_admission(self, admission) -> None:
            """Who may be in this module's groups (swarm/admission.py); applied in the averager's process."""
            self._outer_pipe.send(("_set_admission", [admission], {}))

        async def _set_admission(self, admission):
            self._admission = admission
            self._matchmaking._p2ptrain_admission = admission

        def set_target_group_size(self, size: int, required: Optional[Sequence[str]] = None) -> None:
            """Assemble the group as soon as this many peers are in it (the module's live holders),
            instead of waiting out the whole matchmaking window every round; with `required`
            (peer ids), as soon as those are in it, up to `size` (hivemind_patches.py)."""
            self._outer_pipe.send(("_set_target_group_size",
                                   [int(size), None if required is None else sorted(required)], {}))

        async def _set_target_group_size(self, size: int, required: Optional[list[str]] = None):
            self._matchmaking.target_group_size = size
            self._matchmaking._p2ptrain_required = None if required is None else frozenset(required)

        def set_max_weight(self, weight: float) -> None:
            """The largest all-reduce weight a member may declare from now on (staged averaging's
            second stage weighs whole groups)."""
            self._outer_pipe.send(("_set_max_weight", [float(weight)], {}))

        async def _set_max_weight(self, weight: float):
            self._max_weight = weight

        # ---------------------------------------------------------- module state

        def get_current_state(self):
            metadata, tensors = self._state_provider()
            return metadata, tensors, None

        def download_state_from(self, peer: str, timeout: float, max_bytes: int,
                                what: str = "state download") -> Optional[tuple[Any, list]]:
            """(metadata, tensors) from one peer, or None; refuses more than max_bytes of tensors.
            A stream that ended early gives the whole tensors it carried (none, and metadata
            None, when it carried nothing).
            A download that takes a while shows progress (bytes, rate, ETA) under `what`."""
            future = MPFuture()
            self._outer_pipe.send(("_download_state_from", [], dict(peer=peer, timeout=timeout, what=what,
                                                                   max_bytes=max_bytes, future=future)))
            return future.result(timeout=timeout + 10)

        async def _download_state_from(self, peer: str, timeout: float, max_bytes: int, future,
                                       what: str = "state download"):
            try:
                result = await asyncio.wait_for(
                    self._download_one(PeerID.from_base58(peer), max_bytes, TransferProgress(what, max_bytes)),
                    timeout)
            except Exception as e:  # a dead, slow or misbehaving peer
                logger.warning("state download from …%s failed: %r", peer[-8:], e)
                result = None
            if not future.done():
                future.set_result(result)

        async def _download_one(self, peer, max_bytes: int, progress: Optional[TransferProgress] = None):
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, parts, tensors, received = None, [], [], 0
            async for message in stream:
                if message.metadata:
                    if metadata is not None or len(message.metadata) > 1 << 16:
                        raise ValueError("more than one, or an oversized, metadata message")
                    metadata = self.serializer.loads(message.metadata)
                received += len(message.tensor_part.buffer)
                if received > max_bytes:
                    raise ValueError(f"the state is larger than the module ({max_bytes} bytes)")
                if progress is not None:
                    progress.update(received)
                if message.tensor_part.dtype and parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                try:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                except (RuntimeError, ValueError):
                    # the stream ended inside its last tensor (hivemind ends a stream silently
                    # when the connection drops): hand back the whole tensors, which the
                    # caller sees are fewer than the module's (ModuleSlot.cut_short)
                    logger.info("state stream from …%s ended inside a tensor", str(peer)[-8:])
            if progress is not None:
                progress.finish(received)
            if metadata is None and tensors:
                raise ValueError("a state without metadata")
            return metadata, tensors  # (None, []) when the stream carried nothing: cut before it began

    return ModuleAverager


_CLASS = None


def module_averager_class():
    global _CLASS
    if _CLASS is None:
        from p2ptrain.swarm import hivemind_patches
        hivemind_patches.apply()
        _CLASS = _averager_class()
    return _CLASS
