"""Two-stage averaging of a module with more live holders than one all-reduce group may
hold (Moshpit SGD's grid, with groups as matchmaking assembles them).

Stage 1: every holder meets under the round's stage-1 key; matchmaking assembles groups
of about ⌈n / ⌈√n⌉⌉ (⌈√n⌉ groups, so both stages' groups grow as √n: the simulator's
"assembled" coordinates), each averages, token-weighted.
Stage 2: the member at index i of its stage-1 group (group sorted by peer id) meets the
members at index i of the other groups, under a key that names i, and they average their
groups' means weighted by each group's total tokens. When every stage-1 group has a
member at every index, every holder ends with the token-weighted mean of all n holders:
the same state, which the post-round fingerprints confirm. A holder whose column missed a
group (uneven groups, a crash) ends elsewhere and re-syncs from the majority like any
holder that disagrees.

What staging costs: twice the matchmaking and all-reduce time and bytes of one stage, and
a stage-2 weight is a group's total as its member declares it (at most
`stage_two_weight_rounds` × a round's token cap), which no one outside that group can check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INDEX_BITS = 12  # stage-2 keys name the member's index in its stage-1 group (target_group_size ≤ 4096)


@dataclass(frozen=True)
class StagePlan:
    stages: int  # 1: one group per module (up to target_group_size); 2: groups, then across them
    first_size: int  # stage-1 target group size
    second_size: int = 0  # stage-2 target group size: the number of stage-1 groups


def plan_stages(holders: int, target_group_size: int, staged: bool) -> StagePlan:
    """The stages for a module with `holders` live holders (this node included)."""
    if not staged or holders <= target_group_size:
        return StagePlan(1, max(2, min(holders, target_group_size)))
    groups = math.ceil(math.sqrt(holders))
    return StagePlan(2, math.ceil(holders / groups), groups)


def stage_two_weight_rounds(plan: StagePlan, target_group_size: int) -> int:
    """The most rounds' tokens a stage-2 weight may declare: a whole stage-1 group's. Groups
    are at most the leader's stage-1 target, and holders' estimates of n (hence of that
    target) differ a little, so twice ours, and never less than target_group_size."""
    return max(target_group_size, 2 * plan.first_size)


def round_group_bits(round_: int) -> str:
    """hivemind group-key bits for a round (8 bits: rounds 256 apart never overlap in time)."""
    return format(round_ % 256, "08b")


def stage_group_bits(round_: int, stage: int, index: int = 0) -> str:
    """The group-key bits of a module's all-reduce in a round: the round, then "0" for
    stage 1 (every holder meets there, staged or not, so holders whose views of the swarm
    differ still find one another), or "1" and the member's index in its stage-1 group."""
    if stage == 1:
        return round_group_bits(round_) + "0"
    return round_group_bits(round_) + "1" + format(index % (1 << INDEX_BITS), f"0{INDEX_BITS}b")
