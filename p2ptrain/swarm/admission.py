"""Who may average with this node: in a closed run only holders of a valid credential from
the run's creator, and never a peer this node has banned.

The round driver computes an `Admission` from the signed peer records each round and
hands it to every module's averager (a forked process): its matchmaking leader refuses
followers it does not admit, and it leaves any group that assembles with one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Admission:
    allowed: Optional[frozenset[str]] = None  # None: an open run, anyone may join
    banned: frozenset[str] = field(default_factory=frozenset)

    def admits(self, peer_id: str) -> bool:
        return peer_id not in self.banned and (self.allowed is None or peer_id in self.allowed)

    def strangers(self, peer_ids) -> list[str]:
        return [p for p in peer_ids if not self.admits(p)]
