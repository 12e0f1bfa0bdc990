"""Peers that misbehave: NaN on the wire, states of the wrong shape, forged or malformed
DHT records. None of them may corrupt what an honest node holds."""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.utils.timed_storage import get_dht_time

from p2ptrain.swarm.staging import stage_group_bits
from p2ptrain.swarm.protocol import StateMetadata
from p2ptrain.swarm.records import SwarmRecords, make_validators, new_peer_record, peers_key
from tests.swarm.conftest import in_parallel, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]


def test_an_average_poisoned_with_nan_is_rejected_and_the_node_steps_with_its_own_delta_where_it_can(swarm):
    # Prepare: b's path shares L0.M0 with a; b will put NaN on the wire for it
    config = swarm_config("nan-peer", levels=(1, 2), stem="per_path", compression="none")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    module = "L0.M0"
    a.node.session.inner_steps(3)
    start = [p.clone() for p in a.node.slots[module].outer.global_params]
    local = [p.clone() for p in a.node.session.local_state(module).values()]
    evil = b.node.slots[module].averager
    evil.set_group_bits(stage_group_bits(1, 1))  # round 1's group key, as a.node.outer_step(1, …) uses
    with evil.get_tensors() as tensors:
        for t in tensors:
            t.fill_(math.nan)

    # Execute: an honest outer step against a peer that sends NaN
    reports, _ = in_parallel(lambda: a.node.outer_step(1, tokens=100),
                             lambda: evil.step(gather={"round": 1, "tokens": 100}, weight=100.0, timeout=30))

    # Assert: the poisoned average was noticed and not used. a's reducer refused b's NaN parts,
    # so a's slice is a's own delta; the slice b reduced came back NaN, so a refused it, skips
    # it this round (as for a failed reducer: every survivor alike) and bans b
    result = reports[module]
    assert b.node.peer_id in result.group and result.lying_reducers == [b.node.peer_id] and result.partial
    assert a.node.rejections.by_peer[b.node.peer_id] >= 2 and b.node.peer_id in a.node.banned()
    own_step = skipped = total = 0
    for g, l, got in zip(start, local, a.node.slots[module].outer.global_params):
        assert torch.isfinite(got).all()
        stepped = (got - (g - 0.7 * 1.9 * (g - l))).abs() <= 1e-6
        kept = got == g
        assert (stepped | kept).all()
        own_step, skipped, total = own_step + int(stepped.sum()), skipped + int((kept & ~stepped).sum()), \
            total + got.numel()
    assert own_step > 0 and skipped > 0 and own_step + skipped == total


def test_a_downloaded_state_is_adopted_only_if_it_is_what_the_majority_vouched_for(swarm):
    config = swarm_config("bad-state", levels=(1,))
    a = swarm.open(config, "0")
    slot = a.node.slots["L0.M0"]
    reference = slot.vouch("majority")  # what the majority vouched for: our own state here
    good = [p.clone() for p in slot.outer.global_params] + [m.clone() for m in slot.outer.momentum]
    meta = StateMetadata(module="L0.M0", round=reference.round)

    wrong_shape = [torch.zeros(3, 3)] + good[1:]
    with_nan = [t.clone() for t in good]
    with_nan[0].view(-1)[0] = math.nan
    other_values = [t + 0.1 for t in good]  # right shapes, finite, but not the vouched state

    assert "shape" in slot.state_problem(meta, wrong_shape, reference, 5e-3)
    assert "non-finite" in slot.state_problem(meta, with_nan, reference, 5e-3)
    assert "fingerprint" in slot.state_problem(meta, other_values, reference, 5e-3)
    assert "module" in slot.state_problem(StateMetadata(module="stem", round=reference.round), good, reference, 5e-3)
    assert "round" in slot.state_problem(StateMetadata(module="L0.M0", round=reference.round + 3), good,
                                         reference, 5e-3)
    assert "tensors" in slot.state_problem(meta, good[:1], reference, 5e-3)
    assert slot.state_problem(meta, good, reference, 5e-3) is None
    # a proper prefix of the schema is a download cut short (asked for again, not a lie);
    # a short state of the wrong shapes is not, nor is the whole state
    assert slot.cut_short(good[:1]) and slot.cut_short(good[:-1]) and slot.cut_short([])
    assert not slot.cut_short(wrong_shape[:1]) and not slot.cut_short(good)


def test_peer_records_are_signed_and_schema_checked(swarm):
    # Prepare: two nodes, each with its own key, the run's validators installed
    config = swarm_config("records")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "1,1", initial_peers=a.maddrs)
    records_a, records_b = a.node.records, b.node.records
    stranger, _ = make_validators(config.run.id)  # a key b's DHT node does not hold
    key = peers_key(config.run.id)

    # Execute: b tries to overwrite a's record, to publish garbage under its own key, and to
    # write under a key it cannot sign for
    forged = new_peer_record(peer_id=a.node.peer_id, path=[1, 1], round=999).dict()
    overwrite = b.dht.store(key, forged, get_dht_time() + 60, subkey=records_a.public_key)
    in_own_name = records_b.publish_peer(new_peer_record(peer_id=a.node.peer_id, path=[1, 1], round=7))
    garbage = b.dht.store(key, {"round": "many"}, get_dht_time() + 60, subkey=records_b.public_key)
    unsigned = SwarmRecords(b.dht, config.run.id, stranger).publish_peer(
        new_peer_record(peer_id="nobody", path=[0, 0], round=1))

    # Assert: only a can write a's record, malformed or unsigned values never land, and a
    # record b signed in a's name is stored but never believed
    assert not overwrite and not garbage and not unsigned
    assert in_own_name
    seen = {p.peer_id: p for p in records_b.fetch_peers()}
    assert seen[a.node.peer_id].path == [0, 0] and seen[a.node.peer_id].round == 0
    assert set(seen) == {a.node.peer_id}
    assert records_b.impersonations >= 1
    b.node.publish_status()
    assert {p.peer_id for p in records_a.fetch_peers()} == {a.node.peer_id, b.node.peer_id}
