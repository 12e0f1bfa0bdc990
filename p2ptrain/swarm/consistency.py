"""Do the holders of a module hold the same state? Majority rules, never the loudest peer.

After each round every node publishes, in its signed peer record, a fingerprint of each
module's global state (random projections, see averaging.fingerprint) with the round it
belongs to. A node compares its own with the other holders' at the same round:

  * it is in a strict majority that agree          → nothing to do ("agree");
  * another strict majority agrees on another state → its lineage split off (a partial
    all-reduce, a missed round, two halves of the swarm that trained apart): it re-syncs
    from members of that majority, and adopts a download only if it matches the
    majority's fingerprint ("minority");
  * no strict majority                              → nobody adopts anyone's state
    ("tie"): a tie is what one stranger facing one honest peer produces, and whoever moved
    first would hand the stranger the module. The tied holders heal instead (healing.py):
    each moves a bounded distance toward the mean of the tied states it could verify.

Honest copies of a module are never bit-identical: every peer decompresses its own
shares of each all-reduce, so globals drift apart by the wire codec's error each round.
Two fingerprints agree when they differ by at most DRIFT_ROUNDS rounds' worth of that
error (measured against the size of the last outer update) plus fp32 round-off relative
to the parameters themselves. A lineage that trained apart for even one round differs by
about a whole outer update: far beyond that.

The same rules pick the state a newcomer downloads (`choose_lineage`): the majority of
the live holders, not the highest round claimed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

# Global copies drift apart by wire-compression error each round; tolerated up to this many
# rounds' worth of it, plus fp32 round-off relative to the parameters.
DRIFT_ROUNDS = 20
FP32_ROUNDOFF = 1e-6


@dataclass(frozen=True)
class Vouch:
    """A holder's claim: at `round`, its global state of a module has this fingerprint."""

    peer_id: str
    round: int
    fingerprint: tuple[float, ...]
    norm: float  # L2 norm of the global parameters
    step: float  # L2 norm of the holder's last outer update: the yardstick for drift


def agree(a: Vouch, b: Vouch, codec_tolerance: float) -> bool:
    """Same round, and fingerprints within the drift two honest copies can accumulate."""
    if a.round != b.round or len(a.fingerprint) != len(b.fingerprint) or not a.fingerprint:
        return False
    allowed = DRIFT_ROUNDS * codec_tolerance * max(a.step, b.step) + FP32_ROUNDOFF * max(a.norm, b.norm)
    return max(abs(x - y) for x, y in zip(a.fingerprint, b.fingerprint)) <= allowed


@dataclass
class Verdict:
    outcome: str  # "alone" | "agree" | "minority" | "tie"
    voters: int  # holders whose claims for this round were compared (this node included)
    sources: list[str] = field(default_factory=list)  # minority: the majority's members, to download from
    reference: Optional[Vouch] = None  # minority: the claim a downloaded state must match
    tied: list[Vouch] = field(default_factory=list)  # tie: the other voters' claims (healing.py)


def majority_around(votes: Sequence[Vouch], codec_tolerance: float) -> Optional[list[Vouch]]:
    """The members agreeing with some voter, if they are a strict majority of all votes."""
    for center in votes:
        members = [v for v in votes if agree(center, v, codec_tolerance)]
        if 2 * len(members) > len(votes):
            return sorted(members, key=lambda v: v is not center)  # the center first
    return None


def judge(mine: Vouch, others: Sequence[Vouch], codec_tolerance: float) -> Verdict:
    """How this node's state of a module stands against the other holders' at its round."""
    votes = [mine, *[v for v in others if v.round == mine.round and v.peer_id != mine.peer_id]]
    if len(votes) == 1:
        return Verdict("alone", 1)
    mine_agree = [v for v in votes if agree(mine, v, codec_tolerance)]
    if 2 * len(mine_agree) > len(votes):
        return Verdict("agree", len(votes))
    majority = majority_around(votes[1:], codec_tolerance)
    if majority is not None and 2 * len(majority) > len(votes):
        return Verdict("minority", len(votes), sources=[v.peer_id for v in majority], reference=majority[0])
    return Verdict("tie", len(votes), tied=votes[1:])


def voters_to_wait_for(own_peer_id: str, group: Sequence[str], listed_holders: Iterable[str],
                       recent_partners: Iterable[str], silent: Iterable[str]) -> set[str]:
    """Whose fingerprints for a round a node waits for before it judges a module: the other
    members of its group; when it has none (the module found no group, or only members that
    were silent last round), the holders the peer table listed at the round's start that it
    averaged with lately (healing.RecentPartners). Peers silent last round are never waited for.

    Why the partners. A split leaves holders apart that did not average together this round,
    and a node that averaged alone once waited for nobody: it judged on the fingerprints it
    happened to read at once, usually none, so only the side that read later saw the tie and
    healed, and the gap halved a round instead of closing (a fault test in CI, 2026-12-05).
    Only partners: they are the holders a tie may heal with, and a listed stranger that never
    joins a group cannot make this node wait round after round.
    """
    quiet = set(silent) | {own_peer_id}
    members = set(group) - quiet
    if members:
        return members
    return (set(listed_holders) & set(recent_partners)) - quiet


def choose_lineage(claims: Sequence[Vouch], max_round: int, codec_tolerance: float) -> Optional[list[Vouch]]:
    """The claims of the strict majority of live holders (same round, agreeing fingerprints),
    center first; None when no majority exists. Claims of rounds that cannot have happened
    yet (beyond max_round) count as votes against every lineage: a stranger's inflated
    claim can block a newcomer's catch-up (then it starts from its own state and the
    next round's majority heals it) but never win it."""
    plausible = [c for c in claims if c.round <= max_round]
    if not claims:
        return None
    for center in plausible:
        members = [c for c in plausible if agree(center, c, codec_tolerance)]
        if 2 * len(members) > len(claims):
            return sorted(members, key=lambda c: c is not center)
    return None
