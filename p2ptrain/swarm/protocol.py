"""Every message a peer can send us during a round, as a typed, bounded schema.

Nothing a peer sends is used before it parses here. A message that does not parse (wrong
type, out of bounds, too large) excludes its sender from that round's decisions and is
counted in `Rejections`; it never raises in the honest node. The DHT records (peer and
run records) have their schemas in records.py, enforced by every node's DHT validators.

    RoundClaim     what each member of an all-reduce group sends through hivemind's `gather`
    StateMetadata  what a peer serving a module's state says about it (before the tensors)
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Optional

import pydantic.v1 as pydantic
from pydantic.v1 import confloat, conint, conlist, constr

from p2ptrain.swarm.averaging import FINGERPRINT_DIMS

logger = logging.getLogger(__name__)

MAX_ROUND = 10 ** 9  # a type bound; plausibility against the schedule is checked separately
MAX_MODULE_ID = 64


class _Strict(pydantic.BaseModel):
    class Config:
        extra = "forbid"
        allow_inf_nan = False


Fingerprint = conlist(confloat(strict=True), min_items=FINGERPRINT_DIMS, max_items=FINGERPRINT_DIMS)


class RoundClaim(_Strict):
    """Sent through `gather` by every member of a module's group: the round it averages and
    the tokens behind its pseudo-gradient (its declared all-reduce weight must equal them)."""

    round: conint(ge=1, le=MAX_ROUND, strict=True)
    tokens: conint(ge=1, strict=True)  # stage 2: the member's stage-1 group's total (staging.py)
    stage: conint(ge=1, le=2, strict=True) = 1


class StateMetadata(_Strict):
    """What a peer serving a module's global state says about it; the tensors that follow
    are checked against the module's schema and the fingerprint the majority vouched for."""

    module: constr(strict=True, max_length=MAX_MODULE_ID)
    round: conint(ge=0, le=MAX_ROUND, strict=True)


def parse(model: type[pydantic.BaseModel], value: Any) -> tuple[Optional[pydantic.BaseModel], Optional[str]]:
    """(message, None) or (None, why it was rejected); never raises."""
    try:
        if not isinstance(value, dict):
            return None, f"expected a mapping, got {type(value).__name__}"
        message = model.parse_obj(value)
    except (pydantic.ValidationError, TypeError, ValueError, RecursionError) as e:
        first = str(e).splitlines()
        return None, (first[1].strip() + ": " + first[2].strip()) if len(first) > 2 else str(e)[:200]
    except Exception as e:  # pydantic on hostile input: whatever it raises is the sender's fault
        return None, f"{type(e).__name__}"
    return message, None


class Rejections:
    """Counts of rejected messages by reason, and the peers that sent them (thread-safe)."""

    def __init__(self) -> None:
        self.by_reason: Counter = Counter()
        self.by_peer: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, peer_id: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self.by_reason[reason] += 1
            self.by_peer[peer_id] += 1
        logger.warning("rejected %s from peer …%s%s", reason, peer_id[-8:], f": {detail}" if detail else "")

    def snapshot(self) -> dict:
        with self._lock:
            return {"by_reason": dict(self.by_reason), "by_peer": dict(self.by_peer)}
