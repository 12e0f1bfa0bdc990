"""The swarm's pure pieces, without a network: bootstrap lists, addresses, fingerprints,
coverage and path choice, DHT key names, the round's step deadline."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from p2ptrain.errors import SwarmError
from p2ptrain.model.grid import Grid
from hivemind.averaging.load_balancing import load_balance_peers

from p2ptrain.swarm.averaging import (CHUNK_TIMEOUT_FLOOR_S, CHUNK_WAIT_MARGIN, averaging_part_bytes,
                                      balanced_bandwidths, capped_shares, chunk_timeout_seconds, fingerprint,
                                      fingerprint_distance, sync_tolerance)
from p2ptrain.swarm.dht import check_maddrs, parse_bootstrap_text
from p2ptrain.swarm.membership import least_covered_path, module_coverage
from p2ptrain.swarm.events import averaging_fields
from p2ptrain.swarm.node import ModuleRound, StepDeadline, max_known
from p2ptrain.swarm.schedule import RoundSchedule
from p2ptrain.swarm.staging import (StagePlan, columns_off, plan_stages, stage_group_bits,
                                    stage_two_weight_rounds)
from p2ptrain.swarm.suspension import Suspension
from p2ptrain.swarm.records import (averager_prefix, heartbeat_period, new_peer_record, peer_record_ttl, peers_key,
                                    run_key)

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWKeUrzZaV3Ppfh7U9gXvAXcT1kWCS89y76rWqf81b3faY"


def test_bootstrap_file_ignores_comments_and_blank_lines():
    text = f"# entry nodes\n\n{PEER}   # ours\n  /dns4/boot.example.org/tcp/1/p2p/x\n#/ip4/1.2.3.4/tcp/1\n"
    assert parse_bootstrap_text(text) == [PEER, "/dns4/boot.example.org/tcp/1/p2p/x"]


def test_addresses_without_peer_id_or_malformed_are_refused():
    check_maddrs([PEER], "initial peer", need_peer_id=True)
    with pytest.raises(SwarmError, match="lacks the peer id"):
        check_maddrs(["/ip4/127.0.0.1/tcp/31337"], "initial peer", need_peer_id=True)
    with pytest.raises(SwarmError, match="not a valid multiaddr"):
        check_maddrs(["127.0.0.1:31337"], "initial peer")


def test_fingerprints_see_an_unaveraged_slice_but_not_fp16_rounding():
    gen = torch.Generator().manual_seed(0)
    delta = [torch.randn(64, 64, generator=gen), torch.randn(300, generator=gen)]
    fp, norm = fingerprint(delta)
    rounded, _ = fingerprint([t.half().float() for t in delta])
    partial = [delta[0].clone(), delta[1]]
    partial[0][:16] = torch.randn(16, 64, generator=gen)  # a quarter of one tensor kept local values
    broken, _ = fingerprint(partial)

    assert norm == pytest.approx(torch.cat([t.flatten() for t in delta]).norm().item(), rel=1e-6)
    assert fingerprint_distance(fp, rounded, norm) < sync_tolerance("fp16", 0.0)
    assert fingerprint_distance(fp, broken, norm) > 10 * sync_tolerance("fp16", 0.0)
    assert fingerprint(delta)[0] == fp  # deterministic: every peer projects on the same directions


def test_sync_tolerance_follows_the_codec_unless_configured():
    assert sync_tolerance("none", 0.0) < sync_tolerance("fp16", 0.0) < sync_tolerance("8bit", 0.0)
    assert sync_tolerance("8bit", 0.02) == 0.02


def test_a_module_is_cut_into_16_parts_of_1_to_512_kib_for_the_all_reduce():
    # a 394k-value module in fp16 (788 KB): 16 parts of ~49 KB, one per reducer of a group up to 16
    assert averaging_part_bytes(394_240, "fp16") == 394_240 * 2 // 16
    # a small module too is shared among 16 reducers, down to parts of 1 KiB
    assert averaging_part_bytes(8_224, "fp16") == 8_224 * 2 // 16
    assert averaging_part_bytes(1_000, "fp16") == 1 << 10
    # a huge module is cut into hivemind's default 512 KiB parts
    assert averaging_part_bytes(75_000_000, "8bit") == 512 << 10
    # the codec's bytes per value count: fp32 parts are twice the fp16 ones
    assert averaging_part_bytes(394_240, "none") == 2 * averaging_part_bytes(394_240, "fp16")


def test_coverage_counts_live_holders_and_a_joiner_takes_the_least_covered_path():
    grid = Grid((2, 2))
    peers = [new_peer_record(peer_id="a", path=[0, 0], round=1), new_peer_record(peer_id="b", path=[0, 1], round=1),
             new_peer_record(peer_id="c", path=[5, 5], round=1)]  # a record for another grid is ignored
    coverage = module_coverage(grid, peers)
    assert dict(coverage) == {"stem": 2, "L0.M0": 2, "L0.M1": 0, "L1.M0": 1, "L1.M1": 1}
    choices = {least_covered_path(grid, peers, random.Random(seed)) for seed in range(20)}
    assert choices == {(1, 0), (1, 1)}


def test_every_dht_key_is_prefixed_by_the_run_id():
    assert run_key("r1") == "r1_run" and peers_key("r1") == "r1_peers"
    assert averager_prefix("r1", "L0.M1") == "r1_avg_L0_M1"


@pytest.mark.parametrize("round_seconds", [3.0, 16.0, 45.0, 300.0, 86400.0])
def test_a_node_keeping_up_publishes_once_a_round_and_its_record_outlives_one_missed_publish(round_seconds):
    # every round publishes at the round's end: the heartbeat stays quiet unless a publish is late
    assert heartbeat_period(round_seconds) > round_seconds + 15
    # the record published after round r is still listed after round r + 1's publish is lost
    assert peer_record_ttl(round_seconds) > 2 * heartbeat_period(round_seconds)
    # and a node that left is gone within two rounds and a minute of its last publish
    assert peer_record_ttl(round_seconds) <= 2 * round_seconds + 60


def test_reduce_shares_follow_claimed_links_but_no_claim_takes_over_a_module():
    members = [False] * 4
    # honest links: a slow one reduces less (here nothing: its own upload already sets the pace)
    shares = capped_shares(load_balance_peers(1000, balanced_bandwidths([100.0, 50.0, 25.0, 10.0], members)),
                           members)
    assert sum(shares) == 1000 and shares[0] > shares[1] > shares[2] >= shares[3]
    # a stranger claiming a huge link is clamped to 4x the median claim, and its share to 2x an equal one
    bandwidths = balanced_bandwidths([1e12, 10.0, 10.0], [False] * 3)
    assert bandwidths == [40.0, 10.0, 10.0]
    shares = capped_shares(load_balance_peers(999, bandwidths), [False] * 3)
    assert shares[0] == 666 and sum(shares) == 999 and min(shares[1:]) > 0
    # nonsense claims count as "not said" (the group's mean); client-mode peers reduce nothing
    assert balanced_bandwidths([float("nan"), -1.0, "fast", True, None, 5.0], [False] * 5 + [True]) == \
        [None, None, None, None, None, 0.0]
    assert capped_shares((500, 500, 0), [False, False, True]) == (500, 500, 0)
    # nobody claims anything: equal shares, as before bandwidths existed
    assert load_balance_peers(999, balanced_bandwidths([None] * 3, [False] * 3)) == (333, 333, 333)


def test_a_group_of_declared_fast_links_waits_for_a_chunk_only_as_long_as_its_slowest_link_needs():
    path = 1_600_000  # wire bytes of one all-reduce of each of the node's modules
    # a pair, the slower at 8 Mbit/s (1 MB/s): it uploads 2 × 1/2 of 1.6 MB in 1.6 s; twice that
    assert chunk_timeout_seconds(path, [8.0, 40.0], fallback=10.0) == pytest.approx(CHUNK_WAIT_MARGIN * 1.6)
    # fast links: the floor (a vanished member costs 2 s, not 10 s)
    assert chunk_timeout_seconds(path, [100.0] * 4, fallback=10.0) == CHUNK_TIMEOUT_FLOOR_S
    # a slow link never stretches the wait past the fallback (its whole upload would take 19 s
    # here, and a vanished member would cost 4x that); nor does a stranger claiming a crawl
    assert chunk_timeout_seconds(path, [8.0, 8.0, 8.0, 1.0], fallback=10.0) == 10.0
    assert chunk_timeout_seconds(path, [1e-9, 8.0], fallback=10.0) == 10.0
    # a member that declared nothing (or nonsense): its link is unknown, the fallback stands
    for unknown in (None, float("nan"), 0.0, -1.0, "fast", True):
        assert chunk_timeout_seconds(path, [100.0, unknown, 100.0], fallback=10.0) == 10.0


def test_round_events_show_each_averaged_modules_chunk_timeout_and_longest_waits():
    averaged = ModuleRound(group=["a", "b"], chunk_timeout=3.3, longest_sender_wait=0.4, longest_reducer_wait=1.2)
    fields = averaging_fields({"stem": averaged, "L0.M0": ModuleRound(alone=True)})
    assert fields["chunk_waits_per_module"] == {"stem": {"timeout_s": 3.3, "sender_s": 0.4, "reducer_s": 1.2}}
    # two stages: the longer of each, whichever stage measured it
    assert max_known(None, 2.0) == 2.0 and max_known(3.0, 2.0) == 3.0 and max_known(None, None) is None


@pytest.mark.parametrize("holders, target, staged, expected", [
    (3, 64, True, StagePlan(1, 3)),  # fewer holders than a group holds: one group of all of them
    (1, 64, True, StagePlan(1, 2)),
    (100, 64, False, StagePlan(1, 64)),  # staging off: groups of up to target_group_size
    (4, 2, True, StagePlan(2, 2, 2)),
    (100, 64, True, StagePlan(2, 10, 10)),  # √n groups of √n: both stages grow as √n
    (10_000, 64, True, StagePlan(2, 100, 100)),
    (130, 64, True, StagePlan(2, 13, 10)),  # 10 × 13 fills every column; 12 groups of 11 leave two short
    (8, 4, True, StagePlan(2, 4, 2)),  # 2 groups of 4, not 3 + 3 + 2 (two holders' column short)
    (7, 4, True, StagePlan(2, 4, 2)),  # 4 + 3: one holder off the majority, against 3 for 3 + 3 + 1
    (10_007, 64, True, StagePlan(2, 100, 101)),  # a prime: no shape near √n × √n fills every column
])
def test_modules_with_more_holders_than_a_group_holds_are_planned_in_two_stages(holders, target, staged, expected):
    # Execute / Assert
    assert plan_stages(holders, target, staged) == expected


@pytest.mark.parametrize("holders, first_size, off", [
    (8, 4, 0), (8, 3, 2), (7, 4, 1), (7, 3, 3), (130, 11, 22), (130, 13, 0),
])
def test_a_short_last_group_leaves_the_smaller_side_of_the_grid_off_the_majority(holders, first_size, off):
    # 8 in groups of 3: columns 0-1 hold every group's mean (6 holders), column 2 the first
    # two groups' only (2 holders), which re-sync
    assert columns_off(holders, first_size) == off


def test_every_stage_and_index_meets_under_its_own_group_key():
    # Execute
    keys = {stage_group_bits(5, 1)} | {stage_group_bits(5, 2, i) for i in range(64)}

    # Assert: all distinct, the round's 8 bits first, rounds 256 apart share keys
    assert len(keys) == 65 and all(k.startswith(format(5, "08b")) for k in keys)
    assert stage_group_bits(5, 2, 3) == stage_group_bits(261, 2, 3) != stage_group_bits(6, 2, 3)


def test_a_stage_two_weight_may_hold_a_whole_stage_one_group_even_past_target_group_size():
    # Prepare: 10,000 holders make stage-1 groups of 100, more than target_group_size 64
    plan = plan_stages(10_000, 64, True)

    # Execute / Assert: an honest group's total (100 rounds' tokens at most) stays under the cap
    assert stage_two_weight_rounds(plan, 64) == 200
    assert stage_two_weight_rounds(plan_stages(4, 2, True), 2) == 4
    assert stage_two_weight_rounds(plan_stages(100, 64, True), 64) == 64


def deadline_at(now: list, fixed_fraction: float, step_seconds: float = 1.0):
    """A StepDeadline for a round ending at t = 10 s on a clock the test moves."""
    schedule = RoundSchedule(epoch=0.0, round_seconds=10.0, clock=lambda: now[0])
    return StepDeadline(schedule, schedule.end_of(1), threading.Event(), Suspension(), step_seconds, fixed_fraction)


def test_a_rounds_last_step_is_shortened_to_fit_the_time_left_or_skipped():
    now = [9.5]
    deadline = deadline_at(now, fixed_fraction=0.0)
    # half a step's time left, a step's time proportional to its batch: 80 % of that (the
    # margin) in sequences
    assert deadline() and deadline.last_step_rows(16) == 6
    # a whole step would still fit: no shorter step is offered
    now[0] = 8.0
    assert deadline.last_step_rows(16) == 0
    # less than a quarter of the batch fits: the round's remaining time stays unused
    now[0] = 9.8
    assert deadline.last_step_rows(16) == 0
    # a stopping or suspended node takes no last step
    now[0] = 9.5
    deadline.stop.set()
    assert deadline.last_step_rows(16) == 0
    deadline.stop.clear()
    deadline.suspension.set({"user"})
    assert deadline.last_step_rows(16) == 0
    # a step that takes as long whatever its batch (a GPU a small batch leaves idle): never shorter
    assert deadline_at([9.0], fixed_fraction=1.0).last_step_rows(16) == 0
    # with a quarter of each step fixed, the same half step left fits fewer sequences, 0.2 s more do
    assert deadline_at([9.5], fixed_fraction=0.25).last_step_rows(16) == 0
    assert deadline_at([9.3], fixed_fraction=0.25).last_step_rows(16) == 6


def test_the_fixed_part_of_a_step_is_learnt_from_the_shorter_steps_taken():
    now = [9.5]
    deadline = deadline_at(now, fixed_fraction=0.0)
    assert deadline.last_step_rows(16) == 6  # 0.375 of the batch
    now[0] = 9.5 + 0.375  # it took 0.375 of a whole step: no fixed part
    deadline.finished()
    assert deadline.fixed_fraction == 0.0
    now = [9.5]
    deadline = deadline_at(now, fixed_fraction=0.0)
    deadline.last_step_rows(16)
    now[0] = 10.5  # it took a whole step: all of it is fixed; learnt half-way (a running mean)
    deadline.finished()
    assert deadline.fixed_fraction == 0.5
    # no shorter step, nothing learnt
    deadline.finished()
    assert deadline.fixed_fraction == 0.5
