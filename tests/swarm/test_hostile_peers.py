"""A stranger in the run lies, one lie per test. Honest nodes keep training, never raise,
stay in agreement with each other, and report the sender. The stranger is a real peer
(tests/swarm/adversary.py): a hivemind DHT node and averager with its own signed records."""

from __future__ import annotations

import pytest
import torch

from p2ptrain.errors import SwarmError
from p2ptrain.swarm.averaging import fingerprint
from p2ptrain.swarm.consistency import Vouch
from p2ptrain.swarm.records import ModuleSync, RunRecord, run_key
from p2ptrain.swarm.state_transfer import fetch_verified_state
from tests.swarm.adversary import Adversary
from tests.swarm.conftest import Swarm, in_parallel, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

MODULE = "L0.M0"


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture
def adversaries():
    made: list[Adversary] = []
    yield made
    for adversary in made:
        adversary.close()


def honest_pair(swarm, run_id: str):
    """Two honest holders of the only path, with fixed data orders (so a control run matches)."""
    config = swarm_config(run_id, levels=(1,), round_seconds=6.0)
    a = swarm.open(config, "0", data_seed=1)
    b = swarm.open(config, "0", initial_peers=a.maddrs, data_seed=2)
    return a, b


@pytest.fixture(scope="module")
def control(tmp_path_factory, corpus):
    """The honest pair's modules and their starting point after 3 rounds with no stranger."""
    swarm = Swarm(tmp_path_factory.mktemp("control"), corpus)
    try:
        a, b = honest_pair(swarm, "control")
        start = {m: [p.clone() for p in a.node.slots[m].outer.global_params] for m in ("stem", MODULE)}
        in_parallel(lambda: a.node.run(max_rounds=3), lambda: b.node.run(max_rounds=3))
        assert all(len(r.modules[MODULE].group) == 2 for r in a.node.history)
        return start, {m: [p.clone() for p in a.node.slots[m].outer.global_params] for m in ("stem", MODULE)}
    finally:
        swarm.close()


LIES = {
    "a gather that is not a mapping": {"gather": [1]},
    "a gather with wrong types": {"gather": {"round": "x", "tokens": None}},
    "a huge claimed round": {"gather": {"round": 10 ** 9, "tokens": 5}},
    "a huge declared weight": {"weight": 1e6},
    "a negative declared weight": {"weight": -1e6},
    "1-element parts": {"one_element_parts": True},
    "a record for a round that has not happened": {
        "sync": {MODULE: ModuleSync(round=10 ** 6, fingerprint=[1.0] * 8, norm=1.0, step=1.0)}, "average": False},
}


@pytest.mark.parametrize("lie", list(LIES), ids=list(LIES))
def test_honest_nodes_survive_and_report_a_lying_group_member(swarm, adversaries, control, lie):
    # Prepare: two honest holders of the only path, and a stranger claiming to hold it too
    a, b = honest_pair(swarm, "lie-" + str(abs(hash(lie)) % 10 ** 6))
    adversary = Adversary(a, path=[0], module_id=MODULE, lie=LIES[lie])
    adversaries.append(adversary)
    adversary.start_rounds()

    # Execute: three rounds
    in_parallel(lambda: a.node.run(max_rounds=3), lambda: b.node.run(max_rounds=3))

    # Assert: every round completed, the stranger was met and reported, and the honest nodes
    # hold what an honest control run holds, up to fp16 wire rounding (far below 1 % of how
    # far the modules moved)
    assert len(a.node.history) == len(b.node.history) == 3
    groups = [set(r.modules[MODULE].group) for n in (a, b) for r in n.node.history]
    if "record" not in lie:
        assert any(adversary.peer_id in g for g in groups), "the stranger never got into a group"
    assert a.node.rejections.by_peer[adversary.peer_id] + b.node.rejections.by_peer[adversary.peer_id] >= 1
    for module_id in ("stem", MODULE):
        params_a = a.node.slots[module_id].outer.global_params
        assert all(torch.isfinite(p).all() for p in params_a)
        assert max_difference(params_a, b.node.slots[module_id].outer.global_params) < 1e-3, module_id
        start, honest = control[0][module_id], control[1][module_id]
        moved = max_difference(honest, start)
        assert max_difference(params_a, honest) < 0.01 * moved, module_id
    assert not any(r.modules[m].resynced_from for n in (a, b) for r in n.node.history for m in r.modules)


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
    huge = [torch.zeros(10 * sum(slot.numels))]
    adversary = Adversary(a, path=[0], module_id=MODULE, lie={},
                          served_state=({"module": MODULE, "round": 1}, huge))
    adversaries.append(adversary)
    before = [p.clone() for p in slot.outer.global_params]
    reference = Vouch(adversary.peer_id, 1, tuple([0.0] * 8), 0.0, 1.0)

    got = fetch_verified_state(slot, [adversary.peer_id], reference, 5e-3, a.node.rejections, a.node.peer_id)

    assert got is None
    assert all(torch.equal(x, y) for x, y in zip(before, slot.outer.global_params))


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
