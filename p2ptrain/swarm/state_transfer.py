"""Downloading a module's state from peers, believing nothing the server says.

A download is adopted only when it is the module at the round a majority of holders
vouched for, fits the module's schema exactly (the byte cap is known before anything is
allocated), is finite, and its parameters match the majority's fingerprint. A server
that fails any of this is reported and the next member of the majority is tried.
"""

from __future__ import annotations

import logging
import random
from typing import Optional, Sequence

from p2ptrain.swarm.consistency import Vouch
from p2ptrain.swarm.protocol import Rejections, StateMetadata, parse
from p2ptrain.swarm.slot import ModuleSlot

logger = logging.getLogger(__name__)

STATE_TIMEOUT_S = 30.0  # per-peer bound on a module state download
MAX_SOURCES_TRIED = 4  # servers tried per download: with many holders, a few dead ones must not add up to minutes
FRAMING_BYTES = 64 << 10  # serialisation overhead allowed on top of the raw fp32 state
DOWNLOAD_ATTEMPTS = 2  # a stream cut short is asked for once more from the same server


def download_vouched_state(slot: ModuleSlot, peer: str, reference: Vouch, codec_tolerance: float,
                           rejections: Rejections) -> Optional[list]:
    """The module's state (parameters, then momentum) as `peer` serves it, if it is what
    `reference` vouched for; None (and the peer reported, if it lied) otherwise. A download
    cut short is asked for again, up to DOWNLOAD_ATTEMPTS times in all, and reports nobody."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        got = slot.averager.download_state_from(peer, timeout=STATE_TIMEOUT_S,
                                                max_bytes=slot.state_bytes + FRAMING_BYTES,
                                                what=f"module {slot.module_id} from …{peer[-8:]}")
        if got is None:
            return None  # unreachable, too slow, or oversized (logged by the averager)
        if not slot.cut_short(got[1]):
            break
        logger.warning("module %s: the state from …%s arrived cut short (%d of %d tensors)%s", slot.module_id,
                       peer[-8:], len(got[1]), 2 * len(slot.outer.global_params),
                       ", asking again" if attempt < DOWNLOAD_ATTEMPTS else "")
    else:
        return None
    raw_metadata, tensors = got
    metadata, why = parse(StateMetadata, raw_metadata)
    if metadata is None:
        rejections.add(peer, "malformed state metadata", why)
        return None
    problem = slot.state_problem(metadata, tensors, reference, codec_tolerance)
    if problem is not None:
        if metadata.round != reference.round:  # it moved on since it vouched: not a lie
            logger.info("module %s: …%s now serves round %d", slot.module_id, peer[-8:], metadata.round)
            return None
        rejections.add(peer, "a state that does not match its claim", problem)
        return None
    return tensors


def fetch_verified_state(slot: ModuleSlot, sources: Sequence[str], reference: Vouch, codec_tolerance: float,
                         rejections: Rejections, own_peer_id: str) -> Optional[str]:
    """Adopt the module's state from the first of `sources` (tried in random order, so no
    ordering can be ground for, at most MAX_SOURCES_TRIED of them) that serves what
    `reference` vouched for; returns that peer, or None when none did (the caller tries
    again at its next check)."""
    candidates = [p for p in sources if p != own_peer_id]
    random.shuffle(candidates)
    for peer in candidates[:MAX_SOURCES_TRIED]:
        tensors = download_vouched_state(slot, peer, reference, codec_tolerance, rejections)
        if tensors is None:
            continue
        slot.install(reference.round, tensors, reference.step)
        logger.info("module %s: adopted the majority's round %d state from …%s", slot.module_id, reference.round,
                    peer[-8:])
        return peer
    return None
