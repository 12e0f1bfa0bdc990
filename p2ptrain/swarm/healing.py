"""Healing a tie: tied holders of a module average their states, each within a bounded move.

Two holders that end a round apart (one side's all-reduce failed, or a matchmaking race
in which one counted the other and the other gave up) would otherwise stay apart for
good: every later round moves both by the same averaged update, so the gap between their
global states never closes, and with two holders no majority ever forms to re-sync one of
them (consistency.judge calls it a tie and moves nobody).

So at a tie each holder, on its own and without a coordinator:
  1. freezes the state it vouched for: it serves that state, and vouches for it, until
     its next outer step, so the tied holders download exactly the states that were
     compared, whichever of them heals first;
  2. downloads the state of the other tied voters it averaged with in its last
     PARTNER_ROUNDS rounds (a peer it never averaged with cannot move it: publishing a
     record costs nothing; a seat in our group went through matchmaking, admission and a
     checked all-reduce), those whose state differs from ours first, keeping only a
     download that matches that voter's fingerprint; when none of them differs from ours
     (every voter of the other side is a stranger to us) it does not move;
  3. moves its parameters and outer momentum toward the mean of the tie's sides, by at
     most HEAL_STEPS of its own last outer updates lr·‖Δ‖ (parameters) and HEAL_STEPS of
     its last averaged pseudo-gradient ‖Δ‖ (momentum), one fraction for both. Δ comes
     from the all-reduce, not from a heal, so a heal cannot widen the next heal's bound.

A side is the voters whose fingerprints agree (`tie_sides`), and every side weighs the
same however many of its holders a healer reached. Weighed per holder, healers that reach
different holders of one side move to different means and never meet: two honest peers
that banned a liar (which the third honest peer still averaged with, its ban not being
theirs) leave the liar out, the third counts it on its own side, and after each heal the
third sits a sixth of the gap from the other two (our reading of a fault test whose honest
peers ended 0.034 apart, 2026-12-05). The mean is summed in fp64 in peer-id order, so
holders that downloaded the same states compute the same bits.

When every tied holder reached a holder of every side and nobody's move was cut short,
they now hold the same state (up to the drift within a side) and the next round agrees;
otherwise the gap shrinks and the next round's tie heals the rest. A stranger in a group
gains at most HEAL_STEPS outer updates of pull on an honest holder per round — the order
of what its pseudo-gradient already moves a two-member group — and never the module
wholesale; that bound, not its weight in the mean, is what limits it.
"""

from __future__ import annotations

import collections
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from p2ptrain.swarm.consistency import Vouch, agree
from p2ptrain.swarm.protocol import Rejections
from p2ptrain.swarm.slot import ModuleSlot
from p2ptrain.swarm.state_transfer import download_vouched_state

logger = logging.getLogger(__name__)

# Most a heal moves a holder, in its own last outer updates. Two honest holders split by
# one one-sided round differ by about lr·‖Δ_a − Δ_b‖ ≈ 2 updates when their pseudo-gradients
# are uncorrelated (the mean halves ‖Δ‖, the difference does not): 4 heals that in one go.
HEAL_STEPS = 4.0

# How many of its recent rounds' groups a holder may heal with. Two rounds were not enough:
# on an overloaded machine 4 holders of a module averaged in two stable pairs for 3 rounds,
# so each pair's tie only ever named its own partner and the two sides never met
# (bench_phase.py, 2026-12-03). The per-round pull of any one peer stays HEAL_STEPS.
PARTNER_ROUNDS = 8

# Most tied states a heal downloads. Holders that download the same set compute the same
# mean, bit for bit; a random few of them (the 4 sources a re-sync tries) left the 8
# holders of a stem each at a different mean, tied again the next round (bench_phase.py).
MAX_HEAL_SOURCES = 8


class RecentPartners:
    """Per module, the peers this node averaged with in its last PARTNER_ROUNDS rounds."""

    def __init__(self, rounds: int = PARTNER_ROUNDS):
        self._groups: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=rounds))

    def record(self, module_id: str, group: Iterable[str]) -> None:
        self._groups[module_id].append(frozenset(group))

    def of(self, module_id: str) -> set[str]:
        return set().union(*self._groups[module_id])


@dataclass
class Heal:
    """What one heal did: whose states were averaged in, and how far toward their mean we moved."""

    partners: list[str] = field(default_factory=list)
    fraction: float = 0.0  # 1.0: all the way to the mean; less: cut short by the HEAL_STEPS bound
    moved: float = 0.0  # L2 norm of the parameters' move


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _mean_in_peer_order(states: dict[str, list[torch.Tensor]], peers: Sequence[str]) -> list[torch.Tensor]:
    """The element-wise mean of the states of `peers`, summed in fp64 in peer-id order: any
    holder with the same states gets the same bits."""
    order = sorted(peers)
    total = [t.double().clone() for t in states[order[0]]]
    for peer in order[1:]:
        for acc, t in zip(total, states[peer]):
            acc.add_(t.double())
    return [acc / len(order) for acc in total]


def tie_sides(claims: dict[str, Vouch], codec_tolerance: float) -> list[list[str]]:
    """The voters of a tie grouped by state: in peer-id order, each joins the first side
    whose first member's fingerprint it agrees with, or opens a side of its own."""
    sides: list[list[str]] = []
    for peer in sorted(claims):
        for side in sides:
            if agree(claims[side[0]], claims[peer], codec_tolerance):
                side.append(peer)
                break
        else:
            sides.append([peer])
    return sides


def mean_of_sides(states: dict[str, list[torch.Tensor]], sides: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """Each side's mean state, then the mean of those, every side weighing the same (fp64,
    in peer-id order; float32 out)."""
    side_means = {min(side): _mean_in_peer_order(states, side) for side in sides}
    return [t.to(torch.float32) for t in _mean_in_peer_order(side_means, list(side_means))]


def bounded_mean(states: dict[str, list[torch.Tensor]], own_peer_id: str, n_params: int, param_radius: float,
                 momentum_radius: float, sides: Optional[Sequence[Sequence[str]]] = None,
                 ) -> tuple[list[torch.Tensor], float, float]:
    """Our state (parameters, then momentum) moved toward the mean of `states` (ours
    included) by one fraction for both, the largest that keeps the parameters' move within
    param_radius and the momentum's within momentum_radius; returns (state, fraction,
    parameters' move). `sides` groups the states' holders (every side weighs the same);
    None: every holder its own side. At fraction 1 the state is the mean itself, bit for bit."""
    own = states[own_peer_id]
    mean = mean_of_sides(states, sides if sides is not None else [[peer] for peer in states])
    param_move = float((_flat(mean[:n_params]) - _flat(own[:n_params])).norm())
    momentum_move = float((_flat(mean[n_params:]) - _flat(own[n_params:])).norm())
    fraction = min(1.0, param_radius / param_move if param_move > 0 else math.inf,
                   momentum_radius / momentum_move if momentum_move > 0 else math.inf)
    if fraction >= 1.0:
        return mean, 1.0, param_move
    return [o + fraction * (m - o) for o, m in zip(own, mean)], fraction, fraction * param_move


def heal_tie(slot: ModuleSlot, own_peer_id: str, tied: Sequence[Vouch], recent_partners: set[str],
             codec_tolerance: float, rejections: Rejections) -> Heal:
    """Heal this node's state of the module with the tied voters in `tied` (their claims at
    our round) that are among `recent_partners`; returns what was done (no partners: nothing)."""
    mine = slot.freeze_vouched(own_peer_id)
    eligible = [v for v in tied if v.peer_id != own_peer_id and v.peer_id in recent_partners
                and v.round == mine.round]
    random.shuffle(eligible)
    apart = [v for v in eligible if not agree(mine, v, codec_tolerance)]
    if not apart:
        return Heal()  # every voter we may heal with holds our own state: nothing to heal toward
    # the other side first; voters of our own side fill the rest, so that holders who reach
    # everyone average the same set of states (equal weights for both sides)
    same_side = [v for v in eligible if agree(mine, v, codec_tolerance)]
    states = {own_peer_id: slot.vouched_state()}
    for claim in (apart + same_side)[:MAX_HEAL_SOURCES]:
        tensors = download_vouched_state(slot, claim.peer_id, claim, codec_tolerance, rejections)
        if tensors is not None:
            states[claim.peer_id] = [t.to(torch.float32) for t in tensors]
    if not any(v.peer_id in states for v in apart):
        return Heal()  # nobody of the other side reached: moving toward our own side is no heal
    partners = sorted(p for p in states if p != own_peer_id)
    claims = {v.peer_id: v for v in eligible if v.peer_id in states} | {own_peer_id: mine}
    # ‖Δ‖ of our last outer step (from the all-reduce, never from a heal) bounds both moves
    target, fraction, moved = bounded_mean(states, own_peer_id, len(slot.outer.global_params),
                                           param_radius=HEAL_STEPS * mine.step,
                                           momentum_radius=HEAL_STEPS * mine.step / slot.outer.cfg.lr,
                                           sides=tie_sides(claims, codec_tolerance))
    slot.heal_to(target)
    logger.warning("module %s: round %d tie healed with %d holder(s): moved %.0f%% of the way to their mean "
                   "(%.3g, at most %.0f outer updates)", slot.module_id, mine.round, len(partners),
                   100 * fraction, moved, HEAL_STEPS)
    return Heal(partners=partners, fraction=fraction, moved=moved)
