"""A hostile peer for tests: a real hivemind DHT node and a real hivemind averager on a
module's group prefix, with its own libp2p identity and signed records — everything an
honest node has, except that it lies.

It publishes a peer record saying it holds the module (so honest nodes count it and wait
for it), steps its averager at the end of every round of the run's schedule, and can
  * send any `gather` value (not a dict, wrong types, a huge round);
  * declare any weight on the parts it sends to honest reducers (huge, negative);
  * send 1-element parts instead of its slices;
  * damage every part it sends (lie "damage_parts": a function of the message), or every
    averaged part it answers as a reducer (lie "damage_answers"): a 4-bit part cut short,
    one with a NaN block scale, one in a codec nobody knows;
  * take part as hivemind's client mode does: sending its parts, reducing nothing (lie
    "client_mode": True);
  * claim any fingerprint and round in its record (or a claim made afresh each round);
  * serve an oversized or random module state (or one made afresh at each download);
  * end its first few state downloads early, between tensors or inside one (lie
    "cut_state"), as a stream looks whose connection dropped;
  * publish a run record of its own;
  * lie in its records only, never joining an all-reduce (lie "average": False);
  * as a reducer, return the first averaged part of its slice to each sender and then
    raise, mid all-reduce (lie "raise_as_reducer": True): the way a buggy or crashing
    reducer fails, as opposed to one that dies (hivemind answers the sender with an
    INTERNAL_ERROR message and the sender's stream ends there);
  * walk away from every group it is counted in (lie "leave_group": True): it never runs
    the all-reduce, and answers the members' parts with BAD_GROUP_ID, as a follower does
    that gave up its search just as its leader assembled the group.
Otherwise, as a reducer of its own slice it behaves (its own part counts with a tiny
weight), so the tests measure what the honest reducers' checks do.
"""

from __future__ import annotations

import contextlib
import threading
import typing
from typing import Any, Optional

import torch

from p2ptrain.swarm.averaging import averaging_part_bytes, make_compression, module_averager_class
from p2ptrain.swarm.dht import start_dht
from p2ptrain.swarm.identity import Identity
from p2ptrain.swarm.staging import stage_group_bits
from p2ptrain.swarm.records import (ModuleSync, SwarmRecords, averager_prefix, make_validators, new_peer_record)
from p2ptrain.swarm.schedule import RoundSchedule
from p2ptrain.swarm.wire_codec import deserialize_part, serialize_part


def _evil_averager_class():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import as_aiter, azip

    class EvilRunner(AllReduceRunner):
        def __init__(self, *, lie: dict, **kwargs):
            super().__init__(**kwargs)
            self.lie = lie
            self.weight = 1e-3  # for its own part in its own slice: it barely counts there

        async def _generate_input_for_peer(self, peer_index: int):
            parts = self.tensor_part_container.iterate_input_parts_for(peer_index)
            weight = self.lie.get("weight", 100.0)
            first = True
            async for part in parts:
                if self.lie.get("one_element_parts"):
                    part = serialize_torch_tensor(torch.zeros(1))
                if self.lie.get("damage_parts"):
                    part = self.lie["damage_parts"](part)
                yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING if first else 0,
                                                  group_id=self.group_id if first else b"", tensor_part=part,
                                                  weight=weight)
                first = False

        async def _accumulate_parts_streaming(self, stream, sender_index: int):
            if self.lie.get("damage_answers"):
                async for message in self._damaged_answers(stream, sender_index):
                    yield message
                return
            returned = 0
            async for message in super()._accumulate_parts_streaming(stream, sender_index):
                if self.lie.get("raise_as_reducer") and returned >= 1:
                    raise RuntimeError("adversary: reducer fails mid all-reduce")
                yield message
                returned += 1

        async def _damaged_answers(self, stream, sender_index: int):
            """Reduce each part and answer with the average itself, as p2ptrain's 4-bit reducers
            do, damaged as the lie says."""
            part_index = 0
            async for message in stream:
                if part_index == self.tensor_part_reducer.num_parts:
                    return  # the sender's receipt
                part = deserialize_part(message.tensor_part)
                averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                          weight=message.weight)
                part_index += 1
                answer = serialize_part(averaged, message.tensor_part.compression)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                  tensor_part=self.lie["damage_answers"](answer))

    # hivemind names its RPCs after the servicer class ("<prefix>::ModuleAverager.rpc_join_group"):
    # a peer that wants into p2ptrain's groups must use p2ptrain's class name
    class ModuleAverager(DecentralizedAverager):
        def __init__(self, *args, lie: dict, served_state: Optional[tuple] = None, **kwargs):
            self.lie = lie
            self.served_state = served_state
            super().__init__(*args, **kwargs)

        @contextlib.contextmanager
        def _register_allreduce_group(self, group_info):
            if self.lie.get("leave_group"):
                self._pending_groups_registered.set()  # no group pending: parts get BAD_GROUP_ID
                raise MatchmakingException("adversary: leaves the group it is counted in")
            with super()._register_allreduce_group(group_info):
                yield

        async def rpc_aggregate_part(self, stream, context):
            # a walker answers as a p2ptrain node does that is not in the group
            answers = (module_averager_class().rpc_aggregate_part(self, stream, context)
                       if self.lie.get("leave_group") else super().rpc_aggregate_part(stream, context))
            async for message in answers:
                yield message

        rpc_aggregate_part.__annotations__ = typing.get_type_hints(DecentralizedAverager.rpc_aggregate_part)

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            group_id = group_info.group_id if group_id is None else group_id
            runner = EvilRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                group_id=group_id, ordered_peer_ids=group_info.peer_ids, lie=self.lie, **kwargs)
            self._running_groups[group_id].set_result(runner)
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update)

        async def rpc_download_state(self, _request, _context):
            # lie "cut_state": (downloads, messages, inside): each of the first `downloads`
            # downloads ends after `messages` messages, followed by the first half of the next
            # one when `inside`: what a client sees whose connection dropped part-way
            self.downloads_served = getattr(self, "downloads_served", 0) + 1
            cut = self.lie.get("cut_state")
            cutting = cut is not None and self.downloads_served <= cut[0]
            sent = 0
            async for message in super().rpc_download_state(_request, _context):
                if cutting and sent == cut[1]:
                    if cut[2]:
                        half = averaging_pb2.DownloadData()
                        half.CopyFrom(message)
                        half.tensor_part.buffer = message.tensor_part.buffer[:len(message.tensor_part.buffer) // 2]
                        yield half
                    return
                yield message
                sent += 1

        rpc_download_state.__annotations__ = typing.get_type_hints(DecentralizedAverager.rpc_download_state)

        def get_current_state(self):
            if self.served_state is None:
                return super().get_current_state()
            metadata, tensors = self.served_state() if callable(self.served_state) else self.served_state
            return metadata, tensors, None

    return ModuleAverager


class Adversary:
    """A stranger in the run: joins through `initial_peers`, holds `path`, lies as told."""

    def __init__(self, honest, path: list[int], module_id: str, lie: dict[str, Any],
                 served_state: Optional[tuple] = None):
        run_state = honest.run_state
        self.run_id = run_state.config.run.id
        self.module_id = module_id
        self.path = path
        self.lie = lie
        self.identity = Identity(None)
        self.signer, validators = make_validators(self.run_id, self.identity.private_key)
        self.dht = start_dht(honest.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(self.identity.path),
                             record_validators=validators, check_identity_free=False)
        self.identity.discard_temporary()
        self.peer_id = self.dht.peer_id.to_base58()
        self.records = SwarmRecords(self.dht, self.run_id, self.signer)
        self.schedule = RoundSchedule(honest.node.schedule.epoch, honest.node.schedule.round_seconds)
        slot = honest.node.slots[module_id]
        cfg = run_state.config.averaging
        numel = slot.buffer_numel  # the averaged buffer: one fragment of the module
        self.averager = _evil_averager_class()(
            [torch.zeros(numel)], self.dht, start=True, prefix=averager_prefix(self.run_id, module_id),
            lie=lie, served_state=served_state, target_group_size=cfg.target_group_size, min_group_size=2,
            min_matchmaking_time=cfg.matchmaking_time, request_timeout=min(3.0, cfg.matchmaking_time / 2),
            allreduce_timeout=cfg.averaging_timeout, next_chunk_timeout=max(2.0, cfg.averaging_timeout / 6),
            compression=make_compression(cfg.compression), client_mode=lie.get("client_mode", False),
            part_size_bytes=averaging_part_bytes(numel, cfg.compression))
        self.stop = threading.Event()
        self.steps_joined = 0
        self._thread: Optional[threading.Thread] = None

    def publish(self, round_: int = 0, sync: Optional[dict[str, ModuleSync]] = None, peer_id: str | None = None):
        return self.records.publish_peer(new_peer_record(peer_id=peer_id or self.peer_id, path=self.path,
                                                         round=round_, sync=sync or {},
                                                         credential=self.lie.get("credential")))

    def step(self, round_: int, timeout: float = 30.0):
        """Join one all-reduce of the module now, with the lie's gather; the group, or None."""
        self.averager.set_group_bits(stage_group_bits(round_, 1))  # the round's group key, as honest nodes use
        try:
            return self.averager.step(gather=self.lie.get("gather", {"round": round_, "tokens": 100}),
                                      weight=1.0, timeout=timeout, allow_retries=False)
        except Exception:  # no group this time
            return None

    def start_rounds(self) -> None:
        """Step the averager at the end of every round of the schedule, with the lie's gather."""
        def loop():
            while not self.stop.is_set():
                round_ = self.schedule.current_round()
                sync = self.lie.get("sync")
                # a callable claim is made afresh for the round that just ended
                self.publish(round_=max(round_ - 1, 0), sync=sync(round_ - 1) if callable(sync) else sync)
                if not self.schedule.sleep_until(self.schedule.end_of(round_), self.stop):
                    return
                if not self.lie.get("average", True):
                    continue  # a liar in its records only
                if self.step(round_, timeout=12.0) is not None:
                    self.steps_joined += 1

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(60)
        self.averager.shutdown()
        self.dht.shutdown()



# --------------------------------------------------------------------------------------------
# An honest node turned liar: a real SwarmNode (it trains, averages, publishes records like
# any other) whose pseudo-gradient is altered on its way into the all-reduce, or whose
# reducer returns garbage for its slice. Its lies are well-formed: right shapes, finite
# values (except "nan"), weights within the cap — what validation alone cannot stop.

ATTACKS = {
    "sign_flip": "its pseudo-gradient × −k (k = 50)",
    "scale": "its pseudo-gradient × 100",
    "noise": "its pseudo-gradient plus Gaussian noise of 10× its norm",
    "nan": "NaN in its pseudo-gradient",
    "weight_cap": "declared weight at the cap (the run's tokens per round) with its pseudo-gradient negated",
    "garbage_reducer": "as a reducer, returns random values 100× the honest scale for its slice",
    "alternating": "sign flip × 50 every other round, honest in between",
}
SIGN_FLIP_K = 50.0


def corrupt(attack: str, flat: torch.Tensor, round_: int, generator: torch.Generator) -> None:
    """Alter a pseudo-gradient in place as the attack says (no-op for the reducer attack)."""
    if attack in ("sign_flip",) or (attack == "alternating" and round_ % 2 == 1):
        flat.mul_(-SIGN_FLIP_K)
    elif attack == "scale":
        flat.mul_(100.0)
    elif attack == "noise":
        noise = torch.randn(flat.shape, generator=generator)
        flat.add_(noise * (10.0 * flat.norm() / noise.norm().clamp_min(1e-12)))
    elif attack == "nan":
        flat.fill_(float("nan"))
    elif attack == "weight_cap":
        flat.neg_()


def _garbage_averager_class():
    """p2ptrain's ModuleAverager whose reducer answers every sender with random values of
    100× the honest aggregate's scale (the class keeps its name: RPCs are named after it)."""
    from hivemind.averaging.partition import TensorPartReducer

    honest_class = module_averager_class()

    class GarbageReducer(TensorPartReducer):
        def check_current_part_finished(self):
            assert self.current_part_accumulated_from <= self.num_current_senders
            if self.current_part_accumulated_from == self.num_current_senders:
                honest = self.accumulator / max(self.denominator, 1e-12)
                scale = 100.0 * float(honest.norm()) / max(honest.numel(), 1) ** 0.5 + 1e-3
                self.current_part_future.set_result(torch.randn(honest.shape) * scale)
                self.reset_accumulators()

    class GarbageRunner(honest_class.runner_class):
        def make_reducer(self, plain, rule, tau):
            return GarbageReducer(plain.part_shapes, plain.num_senders)

    class ModuleAverager(honest_class):
        runner_class = GarbageRunner

    return ModuleAverager


def open_liar(swarm, config, path: str, attack: str, initial_peers, seed: int = 0):
    """Open a node in `swarm` that lies in every all-reduce as `attack` says (see ATTACKS)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}")
    import p2ptrain.swarm.slot as slot_module
    honest_factory = slot_module.module_averager_class
    if attack == "garbage_reducer":
        garbage = _garbage_averager_class()
        slot_module.module_averager_class = lambda: garbage
    try:
        opened = swarm.open(config, path, initial_peers=initial_peers)
    finally:
        slot_module.module_averager_class = honest_factory
    cap = float(config.inner.batch_size * config.model.context * config.inner.steps_per_round)
    generator = torch.Generator().manual_seed(seed)
    for slot in opened.node.slots.values():
        averager = slot.averager
        honest_step = averager.step

        def lying_step(*args, _averager=averager, _honest_step=honest_step, gather=None, weight=None, **kwargs):
            round_ = gather.get("round", 0) if isinstance(gather, dict) else 0
            with _averager.get_tensors() as (flat,):
                corrupt(attack, flat, round_, generator)
            if attack == "weight_cap":  # claims the cap in its round claim too, or the mismatch gives it away
                weight = cap
                if isinstance(gather, dict):
                    gather = {**gather, "tokens": int(cap)}
            return _honest_step(*args, gather=gather, weight=weight, **kwargs)

        averager.step = lying_step
    opened.node.attack = attack
    return opened


def _hanging_up_averager_class():
    """p2ptrain's own averager, except that it hangs up on every other reducer after the first
    averaged part of its slice: what a member does that gives up waiting for a reducer's last
    parts (a stall on a loaded machine, a broken connection). It then skips that reducer's
    slice, as every honest member does with a reducer that failed it."""

    honest_class = module_averager_class()

    class HangingUpRunner(honest_class.runner_class):
        async def _communicate_with_peer(self, peer_id):
            if peer_id == self.peer_id:
                return await super()._communicate_with_peer(peer_id)
            peer_index = self.ordered_peer_ids.index(peer_id)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(self._generate_input_for_peer(peer_index))
            try:
                async for _first_part in stream:
                    break
            finally:
                await stream.aclose()  # closes the connection: the reducer's stream to us ends here
                self.tensor_part_container.register_failed_reducer(peer_index)
            self.hung_up = getattr(self, "hung_up", 0) + 1

    class ModuleAverager(honest_class):
        runner_class = HangingUpRunner

    return ModuleAverager


def open_hanging_up(swarm, config, path: str, initial_peers):
    """Open a node in `swarm` whose averagers hang up on other members' reducers early (see
    _hanging_up_averager_class); in every other way an honest p2ptrain node."""
    import p2ptrain.swarm.slot as slot_module
    honest_factory = slot_module.module_averager_class
    hanging_up = _hanging_up_averager_class()
    slot_module.module_averager_class = lambda: hanging_up
    try:
        return swarm.open(config, path, initial_peers=initial_peers)
    finally:
        slot_module.module_averager_class = honest_factory
