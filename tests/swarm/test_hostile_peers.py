"""A stranger in the run lies, one lie per test. Honest nodes keep training, never raise,
stay in agreement with each other, and report the sender. The stranger is a real peer
(tests/swarm/adversary.py): a hivemind DHT node and averager with its own signed records."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from p2ptrain.errors import SwarmError
from p2ptrain.swarm.averaging import fingerprint
from p2ptrain.swarm.consistency import Vouch
from p2ptrain.swarm.records import ModuleSync, RunRecord, averager_prefix, run_key
from p2ptrain.swarm.staging import stage_group_bits
from p2ptrain.swarm.state_transfer import fetch_verified_state
from tests.swarm.adversary import Adversary
from tests.swarm.conftest import applied_mean_error, in_parallel, max_difference, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

MODULE = "L0.M0"


def honest_pair(swarm, run_id: str, compression: str = "fp16"):
    config = swarm_config(run_id, levels=(1,), round_seconds=6.0, compression=compression)
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    return a, b


LIES = {
    "a gather that is not a mapping": {"gather": [1]},
    "a gather with wrong types": {"gather": {"round": "x", "tokens": None}},
    "a huge claimed round": {"gather": {"round": 10 ** 9, "tokens": 5}},
    "a huge declared weight": {"weight": 1e6},
    "a negative declared weight": {"weight": -1e6},
    "1-element parts": {"one_element_parts": True},
}


def outer_step_with_a_stranger(swarm, adversaries, run_id: str, compression: str, lie: dict):
    """Two honest holders of the only path train 3 steps each and take one outer step (100 and
    300 tokens) with a stranger in their group that claims to hold the path and lies as told.
    Returns the pair, the stranger, the pair's reports, the module's global parameters before
    the step and each honest holder's local ones before it."""
    a, b = honest_pair(swarm, run_id, compression=compression)
    adversary = Adversary(a, path=[0], module_id=MODULE, lie=lie)
    adversaries.append(adversary)
    adversary.publish(round_=1)
    start = [p.clone() for p in a.node.slots[MODULE].outer.global_params]
    for node in (a, b):
        node.node.session.inner_steps(3)
    local_a, local_b = ([p.clone() for p in n.node.session.local_state(MODULE).values()] for n in (a, b))
    reports_a, reports_b, _ = in_parallel(lambda: a.node.outer_step(1, tokens=100),
                                          lambda: b.node.outer_step(1, tokens=300),
                                          lambda: adversary.step(1))
    return a, b, adversary, (reports_a, reports_b), start, (local_a, local_b)


@pytest.mark.parametrize("lie", list(LIES), ids=list(LIES))
def test_a_lying_group_member_is_reported_and_the_honest_average_is_what_it_would_be_without_it(
        swarm, adversaries, lie):
    # Prepare / Execute: two honest holders of the only path (no wire compression, so the
    # honest average has a closed form) take one outer step with the stranger in their group
    a, b, adversary, (reports_a, reports_b), start, (local_a, local_b) = outer_step_with_a_stranger(
        swarm, adversaries, "lie-" + str(abs(hash(lie)) % 10 ** 6), "none", LIES[lie])

    # Assert: the stranger was in the group and is reported; the honest nodes stepped with the
    # honest token-weighted mean, as if it had not been there (its own slice counts its part
    # with a negligible weight: 1e-3 against 400 tokens)
    assert adversary.peer_id in reports_a[MODULE].group
    assert a.node.rejections.by_peer[adversary.peer_id] + b.node.rejections.by_peer[adversary.peer_id] >= 1
    for g, la, lb, got_a, got_b in zip(start, local_a, local_b, a.node.slots[MODULE].outer.global_params,
                                       b.node.slots[MODULE].outer.global_params):
        mean = (100 * (g - la) + 300 * (g - lb)) / 400
        expected = g - 0.7 * 1.9 * mean
        torch.testing.assert_close(got_a, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_b, expected, rtol=0, atol=1e-5)


def _nan_block_scale(message):
    buffer = bytearray(message.buffer)
    buffer[:4] = torch.tensor([float("nan")]).numpy().tobytes()
    message.buffer = bytes(buffer)
    return message


def _cut_short(message):
    message.buffer = message.buffer[:-1]
    return message


def _unknown_codec(message):
    message.compression = 99
    return message


BAD_4BIT_MESSAGES = {"cut short by a byte": _cut_short, "a NaN block scale": _nan_block_scale,
                     "a codec number nobody knows": _unknown_codec}


@pytest.mark.parametrize("damage", list(BAD_4BIT_MESSAGES), ids=list(BAD_4BIT_MESSAGES))
def test_a_stranger_whose_4bit_parts_are_malformed_is_reported_and_the_honest_pair_averages_without_it(
        swarm, adversaries, damage):
    # Prepare / Execute: an honest pair in 4-bit NF4, and a stranger in its group that reduces
    # nothing (hivemind's client mode) and damages every part it sends
    a, b, adversary, (reports_a, reports_b), start, (local_a, local_b) = outer_step_with_a_stranger(
        swarm, adversaries, "nf4-parts-" + str(abs(hash(damage)) % 10 ** 6), "4bit",
        {"client_mode": True, "damage_parts": BAD_4BIT_MESSAGES[damage]})

    # Assert: it was in the group and is reported; the pair stepped with its own 4-bit mean
    # (the codec's error on it, not the stranger's parts) and holds equal copies
    assert adversary.peer_id in reports_a[MODULE].group
    assert a.node.rejections.by_peer[adversary.peer_id] + b.node.rejections.by_peer[adversary.peer_id] >= 1
    assert reports_a[MODULE].outcome == reports_b[MODULE].outcome == "ok"
    assert applied_mean_error(start, local_a, local_b, a.node.slots[MODULE].outer.global_params) < 0.2
    assert max_difference(a.node.slots[MODULE].outer.global_params, b.node.slots[MODULE].outer.global_params) <= 1e-6


def test_a_stranger_whose_4bit_answers_are_malformed_leaves_only_its_own_slice_unaveraged(swarm, adversaries):
    # Prepare / Execute: an honest pair in 4-bit NF4, and a stranger in its group that reduces
    # its slice of the module and sends each average back cut short
    a, b, adversary, (reports_a, reports_b), _start, _locals = outer_step_with_a_stranger(
        swarm, adversaries, "nf4-answers", "4bit", {"damage_answers": _cut_short})

    # Assert: both honest members saw that reducer fail, skipped its slice alike this round,
    # and averaged the rest: their copies are equal
    assert adversary.peer_id in reports_a[MODULE].group
    assert reports_a[MODULE].outcome == reports_b[MODULE].outcome == "partial"
    assert max_difference(a.node.slots[MODULE].outer.global_params, b.node.slots[MODULE].outer.global_params) <= 1e-6


def test_a_member_that_walks_away_from_its_group_costs_the_others_no_wait(swarm, adversaries):
    # Prepare: an honest pair whose all-reduce would wait 200 s for a member that sends
    # nothing (hivemind's sender timeout: averaging_timeout / 6), and a stranger counted as a
    # holder that leaves every group it is counted in, answering the members' parts with
    # BAD_GROUP_ID: what a follower does that gave up its search as its leader assembled
    config = swarm_config("walk-away", levels=(1,), round_seconds=6.0, averaging_timeout=1200.0)
    silent_sender_wait = config.averaging.averaging_timeout / 6
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={"leave_group": True})
    adversaries.append(adversary)
    adversary.publish(round_=1)
    for node in (a, b):
        node.node.session.inner_steps(3)

    # Execute: one outer step of the honest pair, the stranger stepping with them
    reports_a, reports_b, joined = in_parallel(lambda: a.node.outer_step(1, tokens=100),
                                               lambda: b.node.outer_step(1, tokens=300),
                                               lambda: adversary.step(1))

    # Assert: the stranger was counted in the group but ran no all-reduce; the honest members
    # stopped waiting for its parts when it answered theirs, not after the sender timeout, and
    # ended in agreement
    assert joined is None
    for reports in (reports_a, reports_b):
        assert adversary.peer_id in reports[MODULE].group
        assert reports[MODULE].seconds_allreduce < silent_sender_wait / 4
    for module_id in ("stem", MODULE):
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) < 1e-3, module_id


async def _send_part_of_group(dht, node, peer: str, prefix: str, group_id: bytes):
    """(In a DHT's process.) Send `peer`'s averager one all-reduce part for `group_id`, as a
    member of that group would. Returns the name of its reply's code, "hung up" if it closed
    the stream without one, or None if neither happened in 60 s."""
    import asyncio
    from hivemind.compression import serialize_torch_tensor
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import as_aiter
    from p2ptrain.swarm.averaging import module_averager_class
    stub = module_averager_class().get_stub(node.p2p, PeerID.from_base58(peer), namespace=prefix)
    part = averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=group_id, weight=1.0,
                                       tensor_part=serialize_torch_tensor(torch.zeros(4)))

    async def first_reply():
        stream = await stub.rpc_aggregate_part(as_aiter(part))
        try:
            async for reply in stream:
                return averaging_pb2.MessageCode.Name(reply.code)
            return "hung up"
        except ConnectionError:  # a broken pipe
            return "hung up"
        finally:
            await stream.aclose()

    try:
        return await asyncio.wait_for(first_reply(), 60)
    except asyncio.TimeoutError:
        return None


def test_a_node_whose_search_found_no_group_answers_a_members_parts_at_once(swarm, adversaries):
    # Prepare: a node's module searches alone and gives up (no group in time), as a follower
    # does that gave up just as its leader assembled a group counting it
    config = swarm_config("gave-up", levels=(1,), round_seconds=6.0)
    a = swarm.open(config, "0")
    averager = a.node.slots[MODULE].averager
    averager.set_group_bits(stage_group_bits(7, 1))
    with pytest.raises(Exception, match="could not find a group"):
        averager.step(weight=1.0, timeout=config.averaging.matchmaking_time + 2, allow_retries=False)
    member = Adversary(a, path=[0], module_id=MODULE, lie={})  # a peer of that group, for its DHT
    adversaries.append(member)

    # Execute: a member of that group sends the node its part
    reply = member.dht.run_coroutine(partial(_send_part_of_group, peer=a.node.peer_id,
                                             prefix=averager_prefix(config.run.id, MODULE), group_id=b"gone"),
                                     return_future=True).result(timeout=120)

    # Assert: the node says at once that it is not in the group, so the member stops waiting
    # for it, instead of leaving the part unanswered until its next group registers. (Its
    # answer can be lost as it hangs up; a member takes a hang-up the same way.)
    assert reply in ("BAD_GROUP_ID", "hung up")


def test_records_claiming_a_round_that_has_not_happened_are_reported_and_change_nothing(swarm, adversaries):
    a, b = honest_pair(swarm, "future-round")
    lie = {"sync": {MODULE: ModuleSync(round=10 ** 6, fingerprint=[1.0] * 8, norm=1.0, step=1.0)},
           "average": False}
    adversary = Adversary(a, path=[0], module_id=MODULE, lie=lie)
    adversaries.append(adversary)
    adversary.start_rounds()

    in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))

    assert len(a.node.history) == len(b.node.history) == 2
    assert a.node.rejections.by_reason["a round that has not happened yet"] >= 1
    # the lie moves nobody: no re-sync toward it, and the pair ends equal. (A split can still
    # happen under load, a reducer timing out on one side only, as in one run of 2026-12-05;
    # the pair heals it, which the equality below checks.)
    assert not any(r.modules[m].resynced_from for n in (a, b) for r in n.node.history for m in r.modules)
    for module_id in ("stem", MODULE):
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) < 1e-3, module_id


def test_a_newcomer_follows_the_majority_of_holders_not_a_stranger_claiming_a_random_state(swarm, adversaries):
    # Prepare: a and b train two rounds; the stranger serves a random state of the right shape
    # and vouches for it at the latest round, fingerprint and all
    a, b = honest_pair(swarm, "takeover")
    in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))
    slot = a.node.slots[MODULE]
    random_state = [torch.randn_like(p) for p in slot.outer.global_params] * 2
    fp, norm = fingerprint(random_state[:len(slot.outer.global_params)])
    claim = ModuleSync(round=a.node.round, fingerprint=fp, norm=norm, step=1.0)
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={},
                          served_state=({"module": MODULE, "round": a.node.round}, random_state))
    adversaries.append(adversary)
    adversary.publish(round_=a.node.round, sync={MODULE: claim})

    # Execute: a newcomer joins and catches up
    c = swarm.open(a.run_state.config, "0", initial_peers=a.maddrs)

    # Assert: it holds the honest majority's state, not the stranger's
    assert MODULE in c.caught_up and c.caught_up[MODULE] in (a.node.peer_id, b.node.peer_id)
    assert max_difference(c.node.slots[MODULE].outer.global_params, slot.outer.global_params) < 1e-3


def test_a_state_larger_than_the_module_is_refused_before_it_is_used(swarm, adversaries):
    a, _ = honest_pair(swarm, "oversized")
    slot = a.node.slots[MODULE]
    huge = [torch.zeros(10 * slot.buffer_numel)]
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={},
                          served_state=({"module": MODULE, "round": 1}, huge))
    adversaries.append(adversary)
    before = [p.clone() for p in slot.outer.global_params]
    reference = Vouch(adversary.peer_id, 1, tuple([0.0] * 8), 0.0, 1.0)

    got = fetch_verified_state(slot, [adversary.peer_id], reference, 5e-3, a.node.rejections, a.node.peer_id)

    assert got is None
    assert all(torch.equal(x, y) for x, y in zip(before, slot.outer.global_params))


CUTS = {"between two tensors": (3, False), "inside a tensor": (3, True), "before the first tensor": (0, False)}


@pytest.mark.parametrize("where", list(CUTS), ids=list(CUTS))
def test_a_state_download_cut_short_is_asked_for_again_and_never_reported_as_a_lie(swarm, adversaries, where):
    # Prepare: a server whose first two state streams end early (the connection dropped),
    # its third whole; the state it serves is the one the reference vouched for
    a, _ = honest_pair(swarm, "cut-" + where.split()[0])
    slot = a.node.slots[MODULE]
    n = len(slot.outer.global_params)
    served = [p + 0.25 for p in slot.outer.global_params] + [m + 0.5 for m in slot.outer.momentum]
    fp, norm = fingerprint(served[:n])
    messages, inside = CUTS[where]
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={"cut_state": (2, messages, inside)},
                          served_state=({"module": MODULE, "round": 1}, served))
    adversaries.append(adversary)
    reference = Vouch(adversary.peer_id, 1, tuple(fp), norm, 1.0)
    before = [t.clone() for t in slot.outer.global_params + slot.outer.momentum]

    # Execute: fetch twice; the first fetch gets two cut streams (it asks once more), the
    # second fetch the whole state
    first = fetch_verified_state(slot, [adversary.peer_id], reference, 5e-3, a.node.rejections, a.node.peer_id)
    unchanged = all(torch.equal(x, y) for x, y in zip(before, slot.outer.global_params + slot.outer.momentum))
    second = fetch_verified_state(slot, [adversary.peer_id], reference, 5e-3, a.node.rejections, a.node.peer_id)

    # Assert: nothing adopted from the cut streams, the whole state adopted, nobody reported
    assert first is None and unchanged
    assert second == adversary.peer_id
    assert all(torch.equal(x, y) for x, y in zip(served, slot.outer.global_params + slot.outer.momentum))
    assert adversary.peer_id not in a.node.rejections.by_peer


def test_a_second_run_record_with_an_earlier_creation_time_is_ignored(swarm, adversaries):
    # Prepare: the stranger publishes its own run record under the same run id, created = 0
    a, b = honest_pair(swarm, "hijack")
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={})
    adversaries.append(adversary)
    published = a.node.records.fetch_run()
    forged = RunRecord(protocol=1, fingerprint=published.state.fingerprint(), state=published.state.to_json(),
                       created=0.0, p2ptrain_version="0.0.0")
    from hivemind.utils.timed_storage import get_dht_time
    assert adversary.records._store(run_key(a.run_state.config.run.id), forged.dict(), get_dht_time() + 600)

    # Execute / Assert: honest nodes (pinned to the creator) still read the creator's run and train
    assert a.node.records.fetch_run().creator == a.creator
    assert b.node.records.fetch_run().created == published.created
    in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    # a newcomer that pinned nothing is told to choose, naming both creators, instead of guessing
    with pytest.raises(SwarmError, match="published by 2 different keys"):
        swarm.open(a.run_state.config, "0", initial_peers=a.maddrs)
    # ... and one that pinned the creator joins the real run
    c = swarm.open(a.run_state.config, "0", initial_peers=a.maddrs,
                   run_id=f"{a.run_state.config.run.id}@{a.creator}")
    assert c.creator == a.creator
