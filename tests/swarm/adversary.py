"""A hostile peer for tests: a real hivemind DHT node and a real hivemind averager on a
module's group prefix, with its own libp2p identity and signed records — everything an
honest node has, except that it lies.

It publishes a peer record saying it holds the module (so honest nodes count it and wait
for it), steps its averager at the end of every round of the run's schedule, and can
  * send any `gather` value (not a dict, wrong types, a huge round);
  * declare any weight on the parts it sends to honest reducers (huge, negative);
  * send 1-element parts instead of its slices;
  * claim any fingerprint and round in its record;
  * serve an oversized or random module state;
  * publish a run record of its own;
  * lie in its records only, never joining an all-reduce (lie "average": False).
As a reducer of its own slice it behaves (its own part counts with a tiny weight), so the
tests measure what the honest reducers' checks do.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from p2ptrain.swarm.averaging import averaging_part_bytes, make_compression
from p2ptrain.swarm.dht import start_dht
from p2ptrain.swarm.identity import Identity
from p2ptrain.swarm.node import round_group_bits
from p2ptrain.swarm.records import (ModuleSync, SwarmRecords, averager_prefix, make_validators, new_peer_record)
from p2ptrain.swarm.schedule import RoundSchedule


def _evil_averager_class():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
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
                yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING if first else 0,
                                                  group_id=self.group_id if first else b"", tensor_part=part,
                                                  weight=weight)
                first = False

    # hivemind names its RPCs after the servicer class ("<prefix>::ModuleAverager.rpc_join_group"):
    # a peer that wants into p2ptrain's groups must use p2ptrain's class name
    class ModuleAverager(DecentralizedAverager):
        def __init__(self, *args, lie: dict, served_state: Optional[tuple] = None, **kwargs):
            self.lie = lie
            self.served_state = served_state
            super().__init__(*args, **kwargs)

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            group_id = group_info.group_id if group_id is None else group_id
            runner = EvilRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                group_id=group_id, ordered_peer_ids=group_info.peer_ids, lie=self.lie, **kwargs)
            self._running_groups[group_id].set_result(runner)
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update)

        def get_current_state(self):
            if self.served_state is None:
                return super().get_current_state()
            metadata, tensors = self.served_state
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
        numel = sum(slot.numels)
        self.averager = _evil_averager_class()(
            [torch.zeros(numel)], self.dht, start=True, prefix=averager_prefix(self.run_id, module_id),
            lie=lie, served_state=served_state, target_group_size=cfg.target_group_size, min_group_size=2,
            min_matchmaking_time=cfg.matchmaking_time, request_timeout=min(3.0, cfg.matchmaking_time / 2),
            allreduce_timeout=cfg.averaging_timeout, next_chunk_timeout=max(2.0, cfg.averaging_timeout / 6),
            compression=make_compression(cfg.compression),
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
        self.averager.set_group_bits(round_group_bits(round_))  # the round's group key, as honest nodes use
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
                self.publish(round_=max(round_ - 1, 0), sync=self.lie.get("sync"))
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

