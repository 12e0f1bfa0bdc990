"""The pure pieces of the round protocol: the schedule, message schemas, majority
verdicts, identities and invites — each a specification of what a peer may claim."""

from __future__ import annotations

import math

import pytest
import torch

from p2ptrain.swarm.consistency import Vouch, agree, choose_lineage, judge, voters_to_wait_for
from p2ptrain.swarm.healing import PARTNER_ROUNDS, RecentPartners, bounded_mean, tie_sides
from p2ptrain.swarm.credentials import issue, parse_credential, parse_duration
from p2ptrain.swarm.identity import Identity, owner_peer_id, peer_id_of_public_key
from p2ptrain.swarm.protocol import Rejections, RoundClaim, StateMetadata, parse
from p2ptrain.swarm.schedule import RoundSchedule, search_seconds, stage_wait_seconds
from p2ptrain.errors import SwarmError

TOL = 5e-3  # fp16's codec tolerance


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ schedule

def test_every_node_computes_the_same_round_boundaries_from_the_run_epoch():
    clock = Clock(1000.0 + 25.0)
    schedule = RoundSchedule(epoch=1000.0, round_seconds=10.0, clock=clock)
    assert schedule.current_round() == 3  # round 3 spans (1020, 1030]
    assert schedule.end_of(3) == 1030.0
    assert schedule.round_at(1030.0) == 3 and schedule.round_at(1030.001) == 4
    assert schedule.next_round_to_enter(min_seconds=4.0) == 3  # 5 s left
    assert schedule.next_round_to_enter(min_seconds=6.0) == 4  # too little left: the next one
    assert schedule.max_plausible_round() == 4


def test_a_search_gets_three_windows_unless_bounded_by_the_next_rounds_end_and_never_under_one():
    assert search_seconds(window=4.0, room=None) == 12.0  # found a group last time
    assert search_seconds(window=4.0, room=30.0) == 12.0  # long rounds: no bound
    # ends in time for the next round, even if a leader that accepted it answers late (2 s)
    assert search_seconds(window=4.0, room=8.0) == 6.0
    # never shorter than one window and a bit: hivemind refuses a search that ends before its window
    assert search_seconds(window=4.0, room=1.0) == pytest.approx(4.4)


def test_a_second_stage_waits_a_fraction_of_the_round_for_late_holders_within_the_rounds_room():
    # the gpu preset: 15 s windows, 600 s rounds, a fifth of the round
    assert stage_wait_seconds(window=15.0, round_seconds=600.0, fraction=0.2, room=None) == 120.0
    # never less than one window: rounds of 10 s, or no stage wait configured
    assert stage_wait_seconds(window=4.0, round_seconds=10.0, fraction=0.2, room=None) == 4.0
    assert stage_wait_seconds(window=4.0, round_seconds=200.0, fraction=0.0, room=None) == 4.0
    # bounded so that the search (a window past the wait) and a leader's late answer (2 s)
    # still end in the room left before the next round must be entered
    assert stage_wait_seconds(window=4.0, round_seconds=200.0, fraction=0.2, room=30.0) == 24.0
    assert stage_wait_seconds(window=4.0, round_seconds=200.0, fraction=0.2, room=3.0) == 4.0


# ------------------------------------------------------------------ schemas

@pytest.mark.parametrize("value", [None, [1], "round", {"round": "x", "tokens": 1}, {"round": 1},
                                   {"round": 1, "tokens": 0}, {"round": 0, "tokens": 5},
                                   {"round": 1, "tokens": 5, "extra": 1}, {"round": 1.5, "tokens": 5},
                                   {"round": True, "tokens": 5}, {"round": 10 ** 12, "tokens": 5}])
def test_a_malformed_round_claim_is_rejected_with_a_reason_and_never_raises(value):
    message, why = parse(RoundClaim, value)
    assert message is None and why


def test_a_well_formed_round_claim_parses():
    message, why = parse(RoundClaim, {"round": 7, "tokens": 384})
    assert why is None and message.round == 7 and message.tokens == 384


@pytest.mark.parametrize("value", [{"module": "x" * 65, "round": 1}, {"module": "stem", "round": -1},
                                   {"module": 3, "round": 1}, {"module": "stem"}])
def test_state_metadata_is_bounded(value):
    assert parse(StateMetadata, value)[0] is None


def test_rejections_count_by_reason_and_peer():
    rejections = Rejections()
    rejections.add("peerA", "malformed round claim")
    rejections.add("peerA", "weight")
    rejections.add("peerB", "weight")
    assert rejections.snapshot() == {"by_reason": {"malformed round claim": 1, "weight": 2},
                                     "by_peer": {"peerA": 2, "peerB": 1}}


# ------------------------------------------------------------------ majority verdicts

def vouch(peer: str, fp: float, round_: int = 5, step: float = 1.0) -> Vouch:
    return Vouch(peer, round_, (fp,) * 8, 100.0, step)


def test_copies_within_the_drift_allowance_agree_and_a_lineage_one_step_apart_does_not():
    # allowance: 20 rounds x 5e-3 x step 1.0 + 1e-6 x norm 100 = 0.1001
    assert agree(vouch("a", 0.0), vouch("b", 0.1), TOL)
    assert not agree(vouch("a", 0.0), vouch("b", 0.2), TOL)
    assert not agree(vouch("a", 0.0), vouch("b", 0.0, round_=6), TOL)


def test_a_node_in_the_majority_stays_and_a_node_in_the_minority_resyncs_from_the_majority():
    assert judge(vouch("me", 0.0), [vouch("b", 0.01), vouch("c", 5.0)], TOL).outcome == "agree"
    verdict = judge(vouch("me", 5.0), [vouch("b", 0.0), vouch("c", 0.01)], TOL)
    assert verdict.outcome == "minority" and set(verdict.sources) == {"b", "c"}
    assert verdict.reference.peer_id in {"b", "c"}


def test_one_against_one_is_a_tie_that_names_the_other_voter_and_a_lone_holder_is_alone():
    verdict = judge(vouch("me", 0.0), [vouch("stranger", 5.0)], TOL)
    assert verdict.outcome == "tie" and [v.peer_id for v in verdict.tied] == ["stranger"]
    assert judge(vouch("me", 0.0), [vouch("b", 0.0, round_=4)], TOL).outcome == "alone"  # other rounds don't vote


def test_a_check_waits_for_its_group_and_after_a_lone_round_for_the_listed_holders_it_averaged_with():
    listed, partners = {"b", "c", "stranger"}, {"b", "c", "gone"}
    # in a group: its other members, never the peers silent last round
    assert voters_to_wait_for("a", ["a", "b", "x"], listed, partners, silent={"x"}) == {"b"}
    # no group (or only silent members): the listed holders among its recent partners, so
    # both sides of a split see the tie; a listed stranger and a partner no longer listed are not waited for
    assert voters_to_wait_for("a", [], listed, partners, silent=set()) == {"b", "c"}
    assert voters_to_wait_for("a", ["a", "x"], listed, partners, silent={"x", "c"}) == {"b"}
    assert voters_to_wait_for("a", [], listed, set(), silent=set()) == set()


def test_a_newcomer_follows_the_majority_of_holders_not_the_highest_claim():
    honest = [vouch("a", 0.0), vouch("b", 0.01)]
    liar = vouch("liar", 9.0, round_=6)
    lineage = choose_lineage([*honest, liar], max_round=6, codec_tolerance=TOL)
    assert {v.peer_id for v in lineage} == {"a", "b"}
    # a claim of a round that has not happened yet never wins, and counts against every lineage
    assert choose_lineage([vouch("a", 0.0), vouch("liar", 9.0, round_=99)], max_round=6,
                          codec_tolerance=TOL) is None
    assert choose_lineage([vouch("a", 0.0)], max_round=6, codec_tolerance=TOL)[0].peer_id == "a"


# ------------------------------------------------------------------ healing a tie

def module_state(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Two parameters and their momentum, as a slot serves them."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(7, 5, generator=g), scale * torch.randn(11, generator=g),
            scale * torch.randn(7, 5, generator=g), scale * torch.randn(11, generator=g)]


def norm_of(tensors) -> float:
    return float(torch.cat([t.reshape(-1).double() for t in tensors]).norm())


def test_two_tied_holders_that_got_each_others_state_heal_to_the_same_bits():
    a, b = module_state(1), module_state(2)
    states = {"peer-b": b, "peer-a": a}  # the order each one fetched them in does not matter
    healed_a, fraction_a, _ = bounded_mean(states, "peer-a", 2, param_radius=100.0, momentum_radius=100.0)
    healed_b, fraction_b, _ = bounded_mean(dict(reversed(states.items())), "peer-b", 2, param_radius=100.0,
                                           momentum_radius=100.0)
    assert fraction_a == fraction_b == 1.0
    assert all(torch.equal(x, y) for x, y in zip(healed_a, healed_b))
    assert all(torch.allclose(x, (s + t) / 2) for x, s, t in zip(healed_a, a, b))


def test_healers_that_reached_different_holders_of_one_side_heal_to_the_same_state():
    # a 2|2 tie: a and b on one side, c and d (a near copy of c) on the other; a has banned
    # d, so it reaches only a, b, c, while c reaches all four
    a = module_state(1)
    b = [t + 1e-4 * n for t, n in zip(a, module_state(3))]
    c = module_state(2)
    d = [t + 1e-4 * n for t, n in zip(c, module_state(4))]
    claims = {"a": vouch("a", 0.0), "b": vouch("b", 0.001), "c": vouch("c", 5.0), "d": vouch("d", 5.001)}
    seen_by_a = {"a": a, "b": b, "c": c}
    seen_by_c = {"a": a, "b": b, "c": c, "d": d}
    sides_a = tie_sides({p: claims[p] for p in seen_by_a}, TOL)
    sides_c = tie_sides(claims, TOL)
    assert sides_a == [["a", "b"], ["c"]] and sides_c == [["a", "b"], ["c", "d"]]
    healed_a, fraction_a, _ = bounded_mean(seen_by_a, "a", 2, 100.0, 100.0, sides=sides_a)
    healed_c, fraction_c, _ = bounded_mean(seen_by_c, "c", 2, 100.0, 100.0, sides=sides_c)
    assert fraction_a == fraction_c == 1.0
    gap = norm_of([x - y for x, y in zip(a, c)])
    # the same state up to the drift within a side (d's 1e-4 noise), not a sixth of the gap
    assert norm_of([x - y for x, y in zip(healed_a, healed_c)]) < 1e-3 * gap
    # weighed per holder (no sides) they would stay apart by about a sixth of the gap
    per_holder_a, _, _ = bounded_mean(seen_by_a, "a", 2, 100.0, 100.0)
    per_holder_c, _, _ = bounded_mean(seen_by_c, "c", 2, 100.0, 100.0)
    assert norm_of([x - y for x, y in zip(per_holder_a, per_holder_c)]) == pytest.approx(gap / 6, rel=0.01)


def test_a_far_state_moves_a_holder_by_at_most_the_heal_bound_in_parameters_and_momentum():
    mine, far = module_state(1), module_state(2, scale=1000.0)
    healed, fraction, moved = bounded_mean({"me": mine, "stranger": far}, "me", 2, param_radius=0.5,
                                           momentum_radius=2.0)
    assert 0.0 < fraction < 1.0
    assert norm_of([h - m for h, m in zip(healed[:2], mine[:2])]) <= 0.5 * (1 + 1e-5)
    assert norm_of([h - m for h, m in zip(healed[2:], mine[2:])]) <= 2.0 * (1 + 1e-5)
    assert moved == pytest.approx(norm_of([h - m for h, m in zip(healed[:2], mine[:2])]), rel=1e-4)
    # a huge momentum alone (parameters equal) is bounded the same way
    sneaky = [*mine[:2], *far[2:]]
    healed, fraction, _ = bounded_mean({"me": mine, "stranger": sneaky}, "me", 2, param_radius=0.5,
                                       momentum_radius=2.0)
    assert fraction < 1.0 and norm_of([h - m for h, m in zip(healed[2:], mine[2:])]) <= 2.0 * (1 + 1e-5)


# ------------------------------------------------------------------ lying reducers

def test_a_reducer_far_past_the_check_is_banned_at_once_and_one_just_past_it_at_its_third_refusal():
    from p2ptrain.swarm.node import bans_lying_reducer
    assert bans_lying_reducer(float("inf"), 1)  # NaN in the slice
    assert bans_lying_reducer(16.0, 1)  # a garbage reducer's slices were 16-24x past the bound
    # an honest reducer whose aggregate missed our late part can land just past it
    assert not bans_lying_reducer(1.08, 1) and not bans_lying_reducer(3.9, 2)
    assert bans_lying_reducer(1.08, 3)


# ------------------------------------------------------------------ identities and invites

def test_the_peer_id_derived_from_a_record_key_is_the_libp2p_peer_id(tmp_path):
    from hivemind.p2p import PeerID
    identity = Identity(tmp_path / "id.key")
    expected = PeerID.from_identity((tmp_path / "id.key").read_bytes()).to_base58()
    ssh_key = identity.private_key.get_public_key().to_bytes()
    assert peer_id_of_public_key(ssh_key) == expected
    assert owner_peer_id(b"[owner:" + ssh_key + b"]") == expected
    assert owner_peer_id(b"no owner here") is None


def test_an_invite_admits_exactly_its_peer_until_it_expires(tmp_path):
    creator = Identity(tmp_path / "creator.key")
    other = Identity(tmp_path / "other.key")
    creator_id = peer_id_of_public_key(creator.private_key.get_public_key().to_bytes())
    creator_key = creator.private_key.get_public_key().to_bytes()
    good = parse_credential(issue(creator.private_key, "run", creator_id, "QmPeer", 3600).json(), "test")
    assert good.problem("run", "QmPeer", creator_id, creator_key) is None
    assert "another peer" in good.problem("run", "QmOther", creator_id, creator_key)
    assert "run" in good.problem("run2", "QmPeer", creator_id, creator_key)
    assert "expired" in good.problem("run", "QmPeer", creator_id, creator_key, now=good.expires + 1)
    forged = parse_credential(issue(other.private_key, "run", creator_id, "QmPeer", 3600).json(), "test")
    assert "signature" in forged.problem("run", "QmPeer", creator_id, creator_key)
    with pytest.raises(SwarmError, match="not a p2ptrain credential"):
        parse_credential('{"run": 1}', "test")
    assert parse_duration("30d") == 30 * 86400 and math.isclose(parse_duration("1.5h"), 5400)
    with pytest.raises(SwarmError):
        parse_duration("soon")


def test_a_tie_heals_only_with_peers_from_the_groups_of_the_last_eight_rounds():
    partners = RecentPartners()
    partners.record("stem", ["me", "early"])
    for round_ in range(PARTNER_ROUNDS - 1):
        partners.record("stem", ["me", f"peer-{round_ % 3}"])
    partners.record("L0.M0", ["me", "elsewhere"])
    assert partners.of("stem") == {"me", "early", "peer-0", "peer-1", "peer-2"}
    partners.record("stem", ["me"])  # a round alone: the oldest group leaves the window
    assert "early" not in partners.of("stem") and "elsewhere" not in partners.of("stem")
    assert partners.of("L1.M0") == set()
