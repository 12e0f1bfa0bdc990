"""The simulator's staged (Moshpit-style) averaging: the mixing math on its own, and the
bandwidth-balanced all-reduce time, as specifications with exact expected numbers."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import swarm_model  # noqa: E402
from swarm_model import grid_keys, grid_shape, rank_coords, staged_mix  # noqa: E402


def weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (w[:, None] * x).sum(axis=0) / w.sum()


def test_grid_shape_stays_within_the_target_group_size():
    assert grid_shape(64, 64) == (1, 64)
    assert grid_shape(100, 64) == (2, 10)
    assert grid_shape(2500, 64) == (2, 50)
    assert grid_shape(10000, 64) == (3, 22)


def test_complete_grid_gives_every_copy_the_exact_weighted_mean():
    # Prepare: 100 holders in a full 10 × 10 grid, unequal token weights
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((100, 16)), rng.uniform(1, 5, 100)
    keys = grid_keys(rank_coords(rng.permutation(100), 2, 10), 10)
    # Execute
    y, groups, mass = staged_mix(x, w, keys)
    # Assert: two stages of 10 groups of 10; every copy is the global weighted mean
    assert [int(g.max()) + 1 for g in groups] == [10, 10]
    np.testing.assert_allclose(y, np.broadcast_to(weighted_mean(x, w), y.shape), atol=1e-12)
    np.testing.assert_allclose(mass, w.sum())  # each holder ends up carrying the whole weight


def test_three_stage_cube_is_exact_too():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((64, 4)), rng.uniform(1, 2, 64)
    y, _, _ = staged_mix(x, w, grid_keys(rank_coords(rng.permutation(64), 3, 4), 4))
    np.testing.assert_allclose(y, np.broadcast_to(weighted_mean(x, w), y.shape), atol=1e-12)


def test_a_missing_cell_leaves_a_measurable_spread():
    # Prepare: the 10 × 10 grid with the holder of cell (0, 0) listed but absent
    rng = np.random.default_rng(2)
    coords = rank_coords(np.arange(100), 2, 10)
    present = ~((coords[:, 0] == 0) & (coords[:, 1] == 0))
    x, w = rng.standard_normal((99, 16)), np.ones(99)
    keys = [k[present] for k in grid_keys(coords, 10)]
    # Execute
    y, _, _ = staged_mix(x, w, keys)
    # Assert: the holders of the column missing a row miss that row's mean; the rest are exact
    deviation = np.sqrt(((y - weighted_mean(x, w)) ** 2).mean(axis=1))
    column_without_the_hole = coords[present][:, 0] != 0
    assert deviation[column_without_the_hole].max() < 1e-12
    assert deviation[~column_without_the_hole].min() > 1e-3


def test_a_reducer_dying_mid_stage_leaves_its_slice_unaveraged():
    # Prepare: one group of 4 (a single stage), member 0 dies while reducing
    x = np.arange(4 * 8, dtype=float).reshape(4, 8)
    w = np.ones(4)
    crash = np.array([0, 1, 1, 1])
    # Execute
    y, groups, _ = staged_mix(x, w, [np.zeros(4, int)], crash)
    # Assert: parts 0 and 4 (≡ its rank 0 mod 4) keep each survivor's own value; the rest are averaged
    mean = x.mean(axis=0)
    for part in range(8):
        expected = x[1:, part] if part % 4 == 0 else np.full(3, mean[part])
        np.testing.assert_allclose(y[1:, part], expected)
    assert groups[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("links, expected", [
    ([1.0, 1.0, 1.0, 1.0], 2 * 3 / 4),  # equal links: 2(n−1)/n, as with equal shares
    ([4.0, 4.0, 4.0, 1.0], 1.0),  # a slow member still moves its whole vector: 1 / b_min
    ([4.0, 4.0, 2.0, 2.0], 6 / 12),  # no member limits it: (2n−2) / Σb
])
def test_balanced_all_reduce_time_is_hiveminds_lp_optimum(links, expected):
    swarm = object.__new__(swarm_model.AlignedSwarm)
    swarm.levers = swarm_model.Levers(balanced=True)
    swarm.payload = np.array([1.0])
    t = swarm.group_transfer_s(0, np.array([4]), np.zeros(4, int), np.array(links), np.zeros(4))
    assert t[0] == pytest.approx(expected)


@pytest.mark.parametrize("n", [9, 10, 23, 100])
def test_assembled_groups_with_double_duty_give_the_exact_mean(n):
    # Prepare: n arrivals; the last first-stage group is short unless n is a square
    from swarm_model import assembled_rows
    rng = np.random.default_rng(n)
    x, w = rng.standard_normal((n, 8)), rng.uniform(1, 3, n)
    owner, keys, _ = assembled_rows(n)
    real = owner == np.arange(len(owner))
    # Execute: double-duty rows carry weight 0 into the first stage
    y, _, _ = staged_mix(x[owner], np.where(real, w[owner], 0.0), keys)
    # Assert: every row, the members' own and their double duties, holds the weighted mean
    np.testing.assert_allclose(y, np.broadcast_to(weighted_mean(x, w), y.shape), atol=1e-12)


def tiny_swarm_inputs():
    """8-bit wire, a 2x2 grid's stem and first level, equal volunteers who never leave."""
    work = swarm_model.Workload(
        name="tiny", steps_per_round=10, tokens_per_step=1024,
        module_params={"stem": 400_000, "L0.M0": 200_000, "L0.M1": 200_000},
        paths=[["stem", "L0.M0"], ["stem", "L0.M1"]], bytes_per_value=1.0 + 4 / 4096,
        matchmaking_time=5.0, averaging_timeout=60.0, target_group_size=8, overlap=True, round_seconds=30.0)
    vol = swarm_model.Volunteers(step_s=1.0, step_sigma_peer=0.0, step_sigma_round=0.0, up_mbps=25.0,
                                 up_sigma=0.0, down_mbps=100.0, down_sigma=0.0, rtt_ms=60.0, rtt_sigma=0.0)
    over = swarm_model.Overheads(outer_fixed_s=0.5, foreground_fixed_s=0.1, join_s=30.0)
    return work, vol, over


def test_a_smaller_wire_codec_moves_proportionally_fewer_bytes_and_leaves_training_alone():
    # Prepare: 8 peers; the 4-bit lever swaps only the codec
    work, vol, over = tiny_swarm_inputs()

    # Execute
    eight_bit = swarm_model.simulate(work, vol, over, 8, rounds=4, seed=1)
    four_bit = swarm_model.simulate(work, vol, over, 8, rounds=4, seed=1,
                                    levers=swarm_model.Levers(wire_bytes_per_value=swarm_model.NF4_BYTES_PER_VALUE))

    # Assert
    ratio = swarm_model.NF4_BYTES_PER_VALUE / work.bytes_per_value
    assert four_bit["mb_sent_per_peer_round"] == pytest.approx(ratio * eight_bit["mb_sent_per_peer_round"], rel=1e-6)
    assert four_bit["steps_per_round_median"] == eight_bit["steps_per_round_median"]


def test_a_crash_mid_all_reduce_costs_hiveminds_chunk_timeout_unless_a_lever_sets_another():
    # Prepare: plain averaging (the outer phase is the all-reduce itself) on slow links, so that
    # a round's all-reduce takes a good part of it, and volunteers who all leave by crashing,
    # after 6 minutes on average (a crash costs a group only while its all-reduce runs)
    work, vol, over = tiny_swarm_inputs()
    work = dataclasses.replace(work, overlap=False)
    vol = dataclasses.replace(vol, mean_session_h=0.1, crash_fraction=1.0, up_mbps=0.5)

    # Execute
    default = swarm_model.simulate(work, vol, over, 8, rounds=8, seed=3)
    short = swarm_model.simulate(work, vol, over, 8, rounds=8, seed=3, levers=swarm_model.Levers(chunk_timeout_s=2.0))

    # Assert: p2ptrain's next_chunk_timeout is max(2 s, averaging_timeout / 6) = 10 s here
    assert swarm_model.AlignedSwarm(work, vol, over, 8).chunk_timeout_s == 10.0
    assert short["outer_s"] < default["outer_s"]


def test_with_declared_links_a_crash_costs_the_timeout_the_groups_slowest_link_needs():
    # Prepare: as above, every volunteer declaring its link (the balanced lever); the swarm
    # runs on 2 Mbit/s links, with sessions of 72 s on average, so that crashes land in
    # all-reduces
    work, vol, over = tiny_swarm_inputs()
    work = dataclasses.replace(work, overlap=False)
    churning = dataclasses.replace(vol, mean_session_h=0.02, crash_fraction=1.0, up_mbps=2.0)

    # Execute
    sized = swarm_model.simulate(work, churning, over, 8, rounds=30, seed=3, levers=swarm_model.Levers(balanced=True))
    fixed = swarm_model.simulate(work, churning, over, 8, rounds=30, seed=3,
                                 levers=swarm_model.Levers(balanced=True, chunk_timeout_s=10.0))

    # Assert: a member's path moves 800 kB a round; over 25 Mbit/s a group of 8 uploads
    # 2 × 7/8 of it in 0.45 s, twice that is under the 2 s floor; a crash costs the reducer
    # timeout, twice the floor. The stem's bytes over its 1/2 share of the link say the same
    stem_bytes, sizes = 400_000 * work.bytes_per_value, np.array([8])
    share = np.array([25e6 / 8 / 2])
    assert swarm_model.declared_link_chunk_timeout_s(stem_bytes, sizes, share, 60.0).tolist() == [2.0]
    swarm = swarm_model.AlignedSwarm(work, vol, over, 8, levers=swarm_model.Levers(balanced=True))
    assert swarm.crash_cost_s(0, sizes, np.zeros(8, int), np.full(8, share[0])).tolist() == [4.0]
    # a member on 4 Mbit/s: 2 × 7/8 × 800 kB / 500 kB/s = 2.8 s, twice that; on 1 Mbit/s
    # (11.2 s, twice that) the wait stays the 10 s of links unknown
    slow = swarm_model.declared_link_chunk_timeout_s(stem_bytes, sizes, np.array([4e6 / 8 / 2, 1e6 / 8 / 2]), 60.0)
    assert slow.tolist() == pytest.approx([2 * stem_bytes * 2 * 7 / 8 / (4e6 / 8 / 2), 10.0])
    assert sized["outer_s"] < fixed["outer_s"]


def test_a_peer_given_a_slow_link_of_its_own_slows_every_group_it_averages_in():
    # Prepare: 4 plain peers on two paths (slots 0 and 2 train path 0, 1 and 3 path 1);
    # links slot by slot, as `simulate.py --validate --shaped` gives the model a shaped swarm
    work, vol, over = tiny_swarm_inputs()
    work = dataclasses.replace(work, overlap=False)
    same = dataclasses.replace(vol, links_each=((25.0, 100.0),) * 4)
    slow_slot_3 = dataclasses.replace(vol, links_each=((25.0, 100.0),) * 3 + ((1.0, 1.0),))

    # Execute
    drawn = swarm_model.simulate(work, vol, over, 4, rounds=4, seed=2)
    given = swarm_model.simulate(work, same, over, 4, rounds=4, seed=2)
    slowed = swarm_model.simulate(work, slow_slot_3, over, 4, rounds=4, seed=2)

    # Assert: links given slot by slot at the drawn rates change nothing
    assert given["by_peer"]["outer_s"] == drawn["by_peer"]["outer_s"]
    # every slot averages the stem with slot 3, so every outer phase waits for its 1 Mbit/s
    # link (0.4 MB of stem at 8-bit: over 3 s), slot 3's own the longest
    outer = slowed["by_peer"]["outer_s"]
    assert min(outer) > max(given["by_peer"]["outer_s"]) + 3.0
    assert outer[3] == max(outer)


def test_a_stage_meets_as_matchmaking_does_so_groups_late_from_the_first_stage_miss_the_second():
    # Prepare: 64 holders of each module in groups of 4, so staged averaging takes two stages;
    # links spread widely (log-normal sigma 1), so first-stage groups end far apart
    work, vol, over = tiny_swarm_inputs()
    work = dataclasses.replace(work, target_group_size=4, round_seconds=120.0)
    spread_links = dataclasses.replace(vol, up_mbps=4.0, up_sigma=1.0)
    staged = swarm_model.Levers(staged=True, coords="assembled", fill=True)

    # Execute
    one_window = swarm_model.simulate(work, spread_links, over, 64, rounds=6, seed=1, levers=staged)
    waiting = swarm_model.simulate(work, spread_links, over, 64, rounds=6, seed=1,
                                   levers=dataclasses.replace(staged, stage_window_rounds=0.5))

    # Assert: with one matchmaking window a second-stage group starts without the members still
    # in slow first-stage groups, so copies end apart and their tokens are lost; waiting half a
    # round for them, every module-round ends with every copy at the exact mean
    assert one_window["staged"]["agreed_fraction"] < 1.0
    assert one_window["lineage_share"] < 0.9
    assert waiting["staged"]["agreed_fraction"] == 1.0
    assert waiting["staged"]["deviation_max"] < 1e-9
    assert waiting["lineage_share"] == pytest.approx(1.0)


def late_lone_holder_end(arrivals: list[float]) -> tuple[float, swarm_model.AlignedSwarm]:
    """Module 0 (the stem) averaged by holders arriving at these times, unstaged; the end
    time of the last one, which arrives alone, far behind the others."""
    work, vol, over = tiny_swarm_inputs()
    swarm = swarm_model.AlignedSwarm(work, vol, over, len(arrivals))
    swarm.stage_bytes = swarm.payload
    swarm.path_bytes = swarm.holds.T @ swarm.stage_bytes
    everyone = np.arange(len(arrivals))
    ends, _ = swarm.average_module(0, 1, everyone, everyone, np.array(arrivals), np.zeros(len(arrivals), bool),
                                   ghosts=0, tgs=8)
    return float(ends[-1]), swarm


def test_a_copy_off_the_majority_pays_for_downloading_the_module_and_a_tie_moves_nobody():
    # Prepare: four holders meet at once and a fifth arrives alone 100 s later (its group
    # is a minority of one); against one early and one late holder (a tie: nobody re-syncs)
    # Execute
    outvoted, swarm = late_lone_holder_end([0.0, 0.1, 0.2, 0.3, 100.0])
    tied, _ = late_lone_holder_end([0.0, 100.0])

    # Assert: the minority's member ends later by the stem's state (fp32 params + momentum)
    # over its download link, not its whole path's
    download = swarm.download_s(np.array([4]), 0)[0]
    assert download == pytest.approx(8.0 * 400_000 / (25e6 / 8))  # down 100 Mbit/s, the median uplink 25
    assert outvoted - tied == pytest.approx(download)


def test_without_column_filling_a_member_s_column_is_its_index_in_the_group_it_got():
    # Prepare: 10 holders as p2ptrain stages them in groups of 4: 3 groups of at most 4
    owner, keys, expected = swarm_model.built_rows(10, target_group_size=4)

    # Execute: the groups matchmaking formed (the last holder alone), and one that vanished
    columns = swarm_model.index_in_group(np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, -1]),
                                         peer_id=np.array([7, 3, 5, 1, 2, 0, 9, 8, 6, 4, 11]))

    # Assert: no double duties; targets 4 and 3; columns by peer id within each group
    assert owner.tolist() == list(range(10)) and len(keys) == 2
    assert expected[0].tolist() == [4] * 10 and expected[1].tolist() == [3] * 10
    assert columns.tolist() == [2, 0, 1, 1, 2, 0, 2, 1, 0, 0, -1]


def test_staging_as_p2ptrain_builds_it_keeps_the_holders_copies_together():
    # Prepare: 64 peers on the tiny grid's two paths, groups of 4: every module is staged
    work, vol, over = tiny_swarm_inputs()
    work = dataclasses.replace(work, target_group_size=4)
    built = swarm_model.Levers(staged=True, coords="assembled", fill=True, column_fill=False)

    # Execute
    result = swarm_model.simulate(work, vol, over, 64, rounds=6, seed=1, levers=built)

    # Assert: equal volunteers arrive together, so the groups are whole and every copy agrees
    assert result["staged"]["agreed_fraction"] == 1.0
    assert result["lineage_share"] > 0.95
    with pytest.raises(ValueError, match="two stages"):
        swarm_model.simulate(work, vol, over, 64, rounds=2, seed=1,
                             levers=dataclasses.replace(built, extra_stages=1))
