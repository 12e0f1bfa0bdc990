"""The reducer of one member's slice of an all-reduce, driven directly (no network): what it
returns when a sender's wait is cancelled or a sender is banned while its part waits — the
two ways hivemind 1.1.12's own reducer lost a whole all-reduce when a peer died mid-round."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2ptrain.swarm.aggregation import aggregate
from p2ptrain.swarm.averaging import module_averager_class

pytestmark = pytest.mark.timeout(60)

SHAPES = [torch.Size([2]), torch.Size([2])]  # two parts of two values


def reducer(rule: str, senders: int = 3):
    return module_averager_class().reducer_class(SHAPES, senders, rule=rule, tau=1.0)


def part(value: float) -> torch.Tensor:
    return torch.full((2,), value)


@pytest.mark.parametrize("rule", ["mean", "centered_clip"])
def test_a_sender_whose_wait_is_cancelled_does_not_cancel_the_part_for_the_others(rule):
    async def scenario():
        r = reducer(rule)
        # the dying peer's part 0 is in and it waits for the average; then its stream dies
        dying = asyncio.create_task(r.accumulate_part(2, 0, part(3.0)))
        await asyncio.sleep(0)
        dying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dying
        r.on_sender_failed(2)  # what the runner does for a sender whose stream ended early
        # the live senders still get part 0's average (with the part it sent) and part 1's without it
        first = await asyncio.wait_for(asyncio.gather(
            r.accumulate_part(0, 0, part(0.0)), r.accumulate_part(1, 0, part(0.0))), 5)
        second = await asyncio.wait_for(asyncio.gather(
            r.accumulate_part(0, 1, part(2.0)), r.accumulate_part(1, 1, part(4.0))), 5)
        return first, second

    first, second = asyncio.run(scenario())
    expected = aggregate(rule, [part(0.0), part(0.0), part(3.0)], [1.0, 1.0, 1.0], tau=1.0)
    assert all(torch.allclose(a, expected) for a in first)
    assert all(torch.allclose(a, part(3.0)) for a in second)


@pytest.mark.parametrize("rule", ["mean", "centered_clip"])
def test_a_sender_banned_while_its_next_part_waits_is_not_expected_for_that_part(rule):
    async def scenario():
        r = reducer(rule)
        await asyncio.wait_for(asyncio.gather(*[r.accumulate_part(s, 0, part(0.0)) for s in (1, 2)],
                                              r.accumulate_part(0, 0, part(3.0))), 5)
        r2 = reducer(rule)
        # sender 2 is ahead: its part 1 arrives while part 0 still waits for sender 0
        early = asyncio.create_task(r2.accumulate_part(2, 1, part(100.0)))
        parts0 = [asyncio.create_task(r2.accumulate_part(s, 0, part(float(s)))) for s in (1, 2)]
        await asyncio.sleep(0)
        r2.on_sender_failed(2)  # banned (its stream broke) with part 1 waiting
        await asyncio.wait_for(r2.accumulate_part(0, 0, part(0.0)), 5)
        await asyncio.wait_for(asyncio.gather(*parts0), 5)
        with pytest.raises(Exception):
            await asyncio.wait_for(early, 5)  # refused: the sender is banned
        last = await asyncio.wait_for(asyncio.gather(
            r2.accumulate_part(0, 1, part(2.0)), r2.accumulate_part(1, 1, part(4.0))), 5)
        return last

    last = asyncio.run(scenario())
    assert all(torch.allclose(a, part(3.0)) for a in last)
