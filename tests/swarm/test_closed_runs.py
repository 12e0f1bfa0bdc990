"""Closed runs: only peers holding an invite signed by the run's creator take part. A
missing, forged or expired invite gets a clear error at start, and a stranger that joins
the DHT anyway is neither counted nor averaged with."""

from __future__ import annotations

import pytest

from p2ptrain.errors import SwarmError
from p2ptrain.swarm.credentials import issue
from p2ptrain.swarm.identity import Identity, peer_id_of_public_key
from tests.swarm.adversary import Adversary
from tests.swarm.conftest import in_parallel, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def identity_of(path):
    identity = Identity(path)
    return identity, peer_id_of_public_key(identity.private_key.get_public_key().to_bytes())


@pytest.fixture
def closed_run(swarm, tmp_path):
    config = swarm_config("closed", levels=(1,), round_seconds=6.0)
    creator = swarm.open(config, "0", closed=True)
    creator_key = creator.node.records.signer._private_key
    return config, creator, creator_key


def test_an_invited_peer_takes_part_and_a_stranger_is_neither_counted_nor_averaged_with(swarm, tmp_path,
                                                                                       closed_run):
    config, a, key = closed_run
    _, b_id = identity_of(tmp_path / "b.key")
    invite = issue(key, config.run.id, a.creator, b_id, 3600).json()
    b = swarm.open(config, "0", initial_peers=a.maddrs, identity_path=str(tmp_path / "b.key"), credential=invite)
    stranger = Adversary(a, path=[0], module_id="L0.M0", lie={})
    try:
        stranger.start_rounds()
        in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))
    finally:
        stranger.close()

    both = sorted([a.node.peer_id, b.node.peer_id])
    assert all(sorted(r.modules["L0.M0"].group) == both for n in (a, b) for r in n.node.history)
    assert {p.peer_id for p in a.node.fetch_peers()} == set(both)
    assert a.node.records.uncredentialed >= 1


@pytest.mark.parametrize("case", ["missing", "forged", "expired", "for another peer"])
def test_a_peer_without_a_valid_invite_is_told_why_at_start(swarm, tmp_path, closed_run, case):
    config, a, key = closed_run
    _, c_id = identity_of(tmp_path / "c.key")
    forger, _ = identity_of(tmp_path / "forger.key")
    invite = {
        "missing": None,
        "forged": issue(forger.private_key, config.run.id, a.creator, c_id, 3600).json(),
        "expired": issue(key, config.run.id, a.creator, c_id, -60).json(),
        "for another peer": issue(key, config.run.id, a.creator, a.node.peer_id, 3600).json(),
    }[case]
    why = {"missing": "is closed", "forged": "signature is not the creator's", "expired": "expired",
           "for another peer": "another peer"}[case]
    with pytest.raises(SwarmError, match=why):
        swarm.open(config, "0", initial_peers=a.maddrs, identity_path=str(tmp_path / "c.key"), credential=invite)


def test_a_stranger_presenting_a_forged_invite_is_not_admitted(swarm, tmp_path, closed_run):
    config, a, key = closed_run
    _, b_id = identity_of(tmp_path / "b.key")
    b = swarm.open(config, "0", initial_peers=a.maddrs, identity_path=str(tmp_path / "b.key"),
                   credential=issue(key, config.run.id, a.creator, b_id, 3600).json())
    forger, _ = identity_of(tmp_path / "forger.key")
    stranger = Adversary(a, path=[0], module_id="L0.M0", lie={})
    stranger.lie["credential"] = issue(forger.private_key, config.run.id, a.creator, stranger.peer_id, 3600).json()
    try:
        stranger.start_rounds()
        in_parallel(lambda: a.node.run(max_rounds=2), lambda: b.node.run(max_rounds=2))
    finally:
        stranger.close()
    assert all(stranger.peer_id not in r.modules["L0.M0"].group for n in (a, b) for r in n.node.history)
    assert stranger.peer_id not in {p.peer_id for p in b.node.fetch_peers()}
