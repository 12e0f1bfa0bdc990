"""Group forming between real averagers on loopback, at the edges of a search."""

from __future__ import annotations

import time

import pytest
import torch

from p2ptrain.swarm.averaging import averaging_part_bytes, make_compression, module_averager_class
from p2ptrain.swarm.dht import start_dht
from p2ptrain.swarm.protocol import RoundClaim
from p2ptrain.swarm.schedule import SEARCH_FLOOR, leader_answer_seconds
from p2ptrain.swarm.staging import stage_group_bits

# timed against the leader's window: alone under pytest-xdist (tests/conftest.py)
pytestmark = [pytest.mark.swarm, pytest.mark.alone, pytest.mark.timeout(300)]

WINDOW = 4.0
STALL_S = 1.2  # the leader's loop stalls this long as it assembles: past the follower's deadline
VALUES = 20_000


def test_a_follower_whose_search_ends_as_its_leader_assembles_late_still_averages_with_it(monkeypatch):
    # Prepare: a leader and a follower of one module that also wait for a third holder that
    # never comes, so the group forms when the leader's window ends. The follower starts 0.5 s
    # later with the shortest search (a module that searched alone last round), so its search
    # ends 0.9 s after the leader's window; the leader's whole event loop then stalls 1.2 s as
    # it assembles, as on a machine whose cores are taken. The leader counts the follower in.
    from hivemind.averaging.matchmaking import Matchmaking

    first = start_dht([])
    second = start_dht(first.get_visible_maddrs())
    dhts, averagers = [first, second], []
    leader_id = first.peer_id
    assemble = Matchmaking.leader_assemble_group

    async def assemble_after_a_stall(self):
        if self.peer_id == leader_id:
            time.sleep(STALL_S)  # blocking: nothing else runs in the leader's averager meanwhile
        return await assemble(self)

    monkeypatch.setattr(Matchmaking, "leader_assemble_group", assemble_after_a_stall)
    try:
        for dht in dhts:  # forked now: each averager's process has the stalling leader's code
            averagers.append(module_averager_class()(
                [torch.zeros(VALUES)], dht, start=True, prefix="late-leader", state_provider=lambda: ({}, []),
                max_weight=1.0, target_group_size=3, min_group_size=2, min_matchmaking_time=WINDOW,
                request_timeout=leader_answer_seconds(WINDOW), allreduce_timeout=60.0, next_chunk_timeout=10.0,
                compression=make_compression("none"), part_size_bytes=averaging_part_bytes(VALUES, "none")))
        ids = [dht.peer_id.to_base58() for dht in dhts]
        for index, averager in enumerate(averagers):
            averager.set_target_group_size(3, {ids[1 - index], "QmAThirdHolderThatNeverComes"})
            averager.set_group_bits(stage_group_bits(1, 1))
            with averager.get_tensors() as (values,):
                values.fill_(float(index))
        claim = RoundClaim(round=1, tokens=1, stage=1).dict()

        # Execute
        leader = averagers[0].step(gather=claim, weight=1.0, timeout=3 * WINDOW, allow_retries=True, wait=False)
        time.sleep(0.5)
        follower = averagers[1].step(gather=claim, weight=1.0, timeout=SEARCH_FLOOR * WINDOW, allow_retries=True,
                                     wait=False)
        outcomes = [leader.result(timeout=120), follower.result(timeout=120)]

        # Assert: both averaged in the same group of two, every slice, to the same mean
        for outcome in outcomes:
            assert sorted(peer.to_base58() for peer in outcome["gathered"]) == sorted(ids)
            assert outcome["failed"] == []
        with averagers[0].get_tensors() as (a,), averagers[1].get_tensors() as (b,):
            assert torch.allclose(a, torch.full_like(a, 0.5)) and torch.equal(a, b)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
