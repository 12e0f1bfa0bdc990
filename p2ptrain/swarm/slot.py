"""One module of this node's path in the swarm: its averager, the shared all-reduce
buffer, and the module's global state (parameters and outer momentum) under one lock."""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch

from p2ptrain.run_state import RunState
from p2ptrain.swarm.averaging import (WIRE_BYTES_PER_VALUE, averaging_part_bytes, fingerprint, make_compression,
                                      module_averager_class)
from p2ptrain.swarm.consistency import Vouch, agree
from p2ptrain.swarm.protocol import StateMetadata
from p2ptrain.swarm.records import averager_prefix
from p2ptrain.swarm.schedule import leader_answer_seconds
from p2ptrain.swarm.signals import children_ignore_sigint
from p2ptrain.train.outer import fragment_bounds
from p2ptrain.train.session import PathSession


FILL_MAX_STEPS = 4  # time-based rounds: a node takes at most 4 × H steps a round


def max_steps_per_round(cfg) -> int:
    """The most inner steps a node takes in a round. With time-based rounds
    (averaging.fill_round) a node trains until the round's end, but at most 4 × H steps:
    a peer's pseudo-gradient grows with its steps, and the members of a group check each
    reducer's returned slice against their own parts, scaled by how much less they
    weigh than the most a round may weigh; unbounded step counts would make an honest fast
    peer's share look like a lie to a slow one (and let its weight swamp the group)."""
    return cfg.inner.steps_per_round * (FILL_MAX_STEPS if cfg.averaging.fill_round else 1)


def tokens_per_round(run_state: RunState) -> int:
    """The most tokens a node can train in a round: the cap on any declared all-reduce
    weight (a larger claim is refused as a lie)."""
    cfg = run_state.config
    return cfg.inner.batch_size * cfg.model.context * max_steps_per_round(cfg)


class ModuleSlot:
    """A module's averager, its shared pseudo-gradient buffer and a lock over its global state.

    Lock discipline: `lock` guards the global parameters, the outer momentum, `round` and
    `last_step_norm`. The round driver (or the overlap thread, never both at once) applies
    outer steps and adopts downloads under it; hivemind's fetch thread reads it to serve
    the state to peers.
    """

    def __init__(self, module_id: str, session: PathSession, dht, run_state: RunState, client_mode: bool,
                 upload_mbps: float | None = None, path_values: int = 0):
        cfg = run_state.config.averaging
        self.module_id = module_id
        self.outer = session.outer[module_id]
        self.lock = threading.Lock()
        self.round = 0  # the schedule round of the last outer step applied to (or adopted into) the globals
        self.last_step_norm = 0.0  # size of the last outer update: the yardstick for drift
        # a tie being healed (healing.py): the state this node vouched for and its claim, served
        # and vouched for instead of the live state until the next outer step or adoption
        self._vouched: Optional[tuple[list[torch.Tensor], Vouch]] = None
        # One flat buffer, not one tensor per parameter: hivemind sends each tensor of an
        # all-reduce with its own metadata, about 1 KB of it on the wire (measured on
        # loopback: 400k values in 64 tensors cost 1.16-1.22x the all-reduce bound, in one
        # tensor 1.02x). The buffer is cut into 16 parts (see averaging_part_bytes), so that
        # even a small module is shared among up to 16 reducers.
        self.numels = [p.numel() for p in self.outer.global_params]
        self.numel = sum(self.numels)
        self.state_bytes = 2 * 4 * self.numel  # fp32 parameters + momentum, as served
        # averaging.fragments: the buffer holds one fragment (the last, shorter one is padded
        # with zeros), so a round's all-reduce moves 1/fragments of the module
        self.fragments = cfg.fragments
        self.buffer_numel = -(-self.numel // self.fragments)
        buffers = [torch.zeros(self.buffer_numel)]
        part_bytes = averaging_part_bytes(self.buffer_numel, cfg.compression)
        mm = cfg.matchmaking_time
        with children_ignore_sigint():
            self.averager = module_averager_class()(
                buffers, dht, start=True, prefix=averager_prefix(run_state.config.run.id, module_id),
                state_provider=self.current_state, max_weight=float(tokens_per_round(run_state)),
                aggregation=cfg.aggregation, clip_radius=cfg.clip_radius, reducer_check=cfg.reducer_check,
                target_group_size=cfg.target_group_size, min_group_size=2,
                min_matchmaking_time=mm, request_timeout=leader_answer_seconds(mm),
                allreduce_timeout=cfg.averaging_timeout,
                # a peer that stops sending (or dies) mid all-reduce is excluded after this long instead
                # of failing the whole round; the slice it was reducing is reported as un-averaged.
                # A group whose members all declared their links waits as long as its slowest link
                # needs instead (averaging.chunk_timeout_seconds, from the bytes of all our modules)
                next_chunk_timeout=max(2.0, cfg.averaging_timeout / 6),
                path_bytes=path_values / self.fragments * WIRE_BYTES_PER_VALUE[cfg.compression],
                compression=make_compression(cfg.compression), part_size_bytes=part_bytes, client_mode=client_mode,
                # our share of the reducing follows our upload link (others' claims are clamped:
                # averaging.balanced_bandwidths); None: the group's mean
                bandwidth=upload_mbps)

    def fragment(self, round_: int) -> tuple[int, int]:
        """[start, end) of the module's values (laid end to end) averaged in this round."""
        return fragment_bounds(self.numel, self.fragments, round_)

    def load_buffer(self, part: torch.Tensor) -> None:
        """Put this round's fragment of our pseudo-gradient into the averager's shared buffer."""
        with self.averager.get_tensors() as (flat,):
            flat.zero_()
            flat[:part.numel()].copy_(part)

    def vouch(self, peer_id: str) -> Vouch:
        """This node's claim about its global state of the module, for the other holders."""
        with self.lock:
            if self._vouched is not None:
                return self._vouched[1]
            return self._vouch_locked(peer_id)

    def _vouch_locked(self, peer_id: str) -> Vouch:
        fp, norm = fingerprint(self.outer.global_params)
        return Vouch(peer_id, self.round, tuple(fp), norm, self.last_step_norm)

    def freeze_vouched(self, peer_id: str) -> Vouch:
        """Keep serving (and vouching for) the current state until the next outer step or
        adoption, whatever heal_to does meanwhile; returns the claim for it."""
        with self.lock:
            if self._vouched is None:
                tensors = [p.clone() for p in self.outer.global_params] + [m.clone() for m in self.outer.momentum]
                self._vouched = (tensors, self._vouch_locked(peer_id))
            return self._vouched[1]

    def vouched_state(self) -> list[torch.Tensor]:
        """The frozen state (parameters, then momentum); only after freeze_vouched."""
        with self.lock:
            assert self._vouched is not None, "freeze_vouched first"
            return self._vouched[0]

    def heal_to(self, tensors: list[torch.Tensor]) -> None:
        """Set parameters and momentum to a healed state; the frozen claim stays served."""
        with self.lock:
            for dst, src in zip(self.outer.global_params + self.outer.momentum, tensors):
                dst.copy_(src)

    def current_state(self):
        """Served to peers that download this module (runs in hivemind's fetch thread)."""
        with self.lock:
            if self._vouched is not None:
                return {"module": self.module_id, "round": self._vouched[1].round}, self._vouched[0]
            tensors = [p.clone() for p in self.outer.global_params] + [m.clone() for m in self.outer.momentum]
            return {"module": self.module_id, "round": self.round}, tensors

    def cut_short(self, tensors: list) -> bool:
        """Whether `tensors` are a proper prefix of this module's state (parameters, then
        momentum), each of the schema's shape and type: what a download delivers whose
        connection dropped part-way. hivemind ends a server stream silently when its
        connection closes, so a cut stream looks complete; it is not a lie (a server that
        wants to withhold its state can always hang up), so the caller asks again instead of
        reporting the server."""
        schema = self.outer.global_params * 2
        return len(tensors) < len(schema) and all(
            isinstance(t, torch.Tensor) and t.shape == p.shape and t.dtype == p.dtype
            for t, p in zip(tensors, schema))

    def state_problem(self, metadata: StateMetadata, tensors: list, reference: Vouch,
                      codec_tolerance: float) -> Optional[str]:
        """Why a downloaded state may not be adopted, or None: it must be this module at the
        round the majority vouched for, of the exact schema, finite, and match their fingerprint."""
        n = len(self.outer.global_params)
        if metadata.module != self.module_id:
            return f"it is module {metadata.module!r}"
        if metadata.round != reference.round:
            return f"it is round {metadata.round}, the majority's is {reference.round}"
        if len(tensors) != 2 * n:
            return f"{len(tensors)} tensors, expected {2 * n}"
        for t, p in zip(tensors, self.outer.global_params * 2):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                return "a tensor of the wrong shape or type"
            if not torch.isfinite(t).all():
                return "non-finite values"
        fp, norm = fingerprint(tensors[:n])
        served = Vouch("served", metadata.round, tuple(fp), norm, reference.step)
        if not agree(served, reference, codec_tolerance):
            return "its parameters do not match the fingerprint the majority vouched for"
        return None

    def install(self, round_: int, tensors: list, step_norm: float) -> None:
        """Adopt a verified state (parameters and momentum) as this module's global state."""
        with self.lock:
            for dst, src in zip(self.outer.global_params + self.outer.momentum, tensors):
                dst.copy_(src)
            self.round = round_
            self.last_step_norm = step_norm
            self._vouched = None

    def apply_outer_step(self, mean_delta: torch.Tensor, start: int, scale: float, lr: float, round_: int) -> None:
        """The outer step on values [start, start + len(mean_delta)) of the module (all of it
        unless averaging.fragments > 1) with the averaged pseudo-gradient of those values."""
        with self.lock:
            self.outer.apply_fragment(mean_delta, start, scale)
            self.round = round_
            self.last_step_norm = lr * scale * float(mean_delta.double().norm())
            self._vouched = None
