"""Two-stage averaging of a module with more live holders than one all-reduce group may
hold (Moshpit SGD's grid, with groups as matchmaking assembles them).

Stage 1: every holder meets under the round's stage-1 key; matchmaking assembles groups
of about √n (about √n groups, so both stages' groups grow as √n: the simulator's
"assembled" coordinates; plan_stages picks the shape that leaves the fewest columns short),
each averages, token-weighted.
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
    """The stages for a module with `holders` live holders (this node included): about √n
    groups of about √n, each stage's groups within max(target_group_size, ⌈√n⌉) and at most
    twice ⌈√n⌉ (a bigger group waits on its slowest member, and among many holders a short
    column's mean stays within the sync tolerance anyway); of those shapes, the one whose
    grid leaves the fewest copies off the majority (columns_off), then the smallest groups,
    then the fewer stage-1 groups. 8 holders: 2 groups of 4, not 3, 3 and 2."""
    if not staged or holders <= target_group_size:
        return StagePlan(1, max(2, min(holders, target_group_size)))
    balanced = math.ceil(math.sqrt(holders))
    cap = min(max(target_group_size, balanced), 2 * balanced)
    # (stage-1 size, the groups matchmaking fills with it); ⌈n / ⌈√n⌉⌉ is always among them
    shapes = [(first, math.ceil(holders / first)) for first in range(2, cap + 1)]
    first, groups = min(((f, g) for f, g in shapes if 2 <= g <= cap),
                        key=lambda fg: (columns_off(holders, fg[0]), max(fg), fg[1]))
    return StagePlan(2, first, groups)


def columns_off(holders: int, first_size: int) -> int:
    """Holders that end a round off the majority's copy when matchmaking fills stage-1 groups
    of first_size in turn and the last is short by some members: the columns it lacks
    average the other groups' means only, the rest every group's, so the smaller of the two
    sets re-syncs."""
    full, short = divmod(holders, first_size)
    if not short:
        return 0
    return min(short * (full + 1), (first_size - short) * full)


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
