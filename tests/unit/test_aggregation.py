"""The aggregation rules a reducer applies to one slice, with exact expected numbers."""

from __future__ import annotations

import pytest
import torch

from p2ptrain.swarm.aggregation import (aggregate, auto_tau, centered_clip, trim_count, trimmed_mean,
                                        weighted_mean, weighted_median)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_weighted_mean_counts_tokens():
    assert torch.equal(weighted_mean([t(1.0, 0.0), t(3.0, 4.0)], [1, 3]), t(2.5, 3.0))


def test_weighted_median_picks_the_heavier_side_and_averages_an_even_middle():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert weighted_median(x, torch.tensor([1.0, 3.0], dtype=torch.float64)).item() == 1.0
    x4 = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
    assert weighted_median(x4, torch.ones(4, dtype=torch.float64)).item() == 1.5


def test_centered_clip_from_the_median_ignores_a_far_outlier_when_the_rest_balance():
    # median 1.5; clipped differences −1, −0.5, 0.5, 1 sum to zero: already the fixed point
    got = centered_clip([t(0.0), t(1.0), t(2.0), t(100.0)], [1, 1, 1, 1], tau=1.0)
    assert got.item() == 1.5


def test_centered_clip_converges_to_the_fixed_point_that_bounds_one_sender():
    # three honest zeros and one sender at 10: v = v/4 + 1/4 each iteration → 1/3 = τ·w_j / Σ others' w
    got = centered_clip([t(0.0), t(0.0), t(0.0), t(10.0)], [1, 1, 1, 1], tau=1.0)
    assert abs(got.item() - 1 / 3) < 1e-6


def test_centered_clip_counts_weights_when_nothing_is_clipped():
    # weighted median 1; one step to the weighted mean (0·1 + 1·3) / 4
    assert centered_clip([t(0.0), t(1.0)], [1, 3], tau=100.0).item() == 0.75


def test_auto_tau_is_twice_the_median_distance_to_the_median():
    assert auto_tau([t(0.0, 0.0), t(3.0, 4.0), t(6.0, 8.0)], [1, 1, 1]) == 10.0


def test_trimmed_mean_drops_the_extremes_of_each_coordinate_and_weights_the_rest():
    assert trim_count(2) == 0 and trim_count(3) == 1 and trim_count(4) == 1 and trim_count(8) == 2
    assert trimmed_mean([t(1.0), t(2.0), t(3.0), t(100.0)], [1, 1, 1, 1]).item() == 2.5
    assert trimmed_mean([t(1.0), t(2.0), t(3.0), t(100.0)], [1, 1, 3, 1]).item() == 2.75
    got = trimmed_mean([t(1.0, 100.0), t(2.0, 3.0), t(3.0, 2.0), t(100.0, 1.0)], [1, 1, 1, 1])
    assert torch.equal(got, t(2.5, 2.5))


@pytest.mark.parametrize("seed", range(20))
def test_no_single_sender_moves_centered_clip_by_more_than_tau(seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, tau = 5, 64, 1.0
    center = torch.randn(d, generator=gen) * 3
    honest = [center + 0.05 * torch.randn(d, generator=gen) for _ in range(n - 1)]  # within τ of each other
    weights = [float(w) for w in torch.randint(50, 100, (n,), generator=gen)]
    honest_mean = weighted_mean(honest, weights[:-1])
    baseline = centered_clip(honest + [honest[0].clone()], weights, tau=tau)
    for scale in (1.0, 10.0, 1e3, 1e6):
        for attack in (torch.randn(d, generator=gen) * scale, -scale * center, scale * center):
            got = centered_clip(honest + [attack], weights, tau=tau)
            bound = tau * weights[-1] / sum(weights[:-1])
            assert (got - honest_mean).norm().item() <= bound + 1e-4
            assert (got - baseline).norm().item() <= tau + 1e-4


def test_the_rules_agree_with_the_mean_on_identical_parts_and_refuse_bad_input():
    parts = [t(1.0, -2.0)] * 4
    for rule in ("mean", "centered_clip", "trimmed_mean"):
        assert torch.allclose(aggregate(rule, parts, [1, 2, 3, 4]), t(1.0, -2.0))
    with pytest.raises(ValueError):
        aggregate("median", parts, [1, 1, 1, 1])
    with pytest.raises(ValueError):
        weighted_mean(parts, [1, 1, 1, 0])


def test_two_senders_are_averaged_by_every_rule():
    for rule in ("mean", "centered_clip", "trimmed_mean"):
        assert aggregate(rule, [t(0.0), t(4.0)], [3, 1]).item() == 1.0


def test_centered_clip_drops_a_far_outlier_and_reports_it():
    from p2ptrain.swarm.aggregation import aggregate_reporting, centered_clip_dropping_outliers
    # clipped: 1.5; the part at 1000 is 998.5 > 4 τ away: dropped, the rest clip to their median 1
    got, dropped = centered_clip_dropping_outliers([t(0.0), t(1.0), t(2.0), t(1000.0)], [1, 1, 1, 1], tau=1.0,
                                                   min_distance=0.0)
    assert got.item() == 1.0 and dropped == [3]
    # ... unless it is within min_distance (an honest peer's scale): then it is only clipped
    got, dropped = centered_clip_dropping_outliers([t(0.0), t(1.0), t(2.0), t(1000.0)], [1, 1, 1, 1], tau=1.0,
                                                   min_distance=2000.0)
    assert got.item() == 1.5 and dropped == []
    # within 4 τ: only clipped, nobody dropped
    got, dropped = centered_clip_dropping_outliers([t(0.0), t(0.0), t(0.0), t(3.0)], [1, 1, 1, 1], tau=1.0,
                                                   min_distance=0.0)
    assert dropped == [] and abs(got.item() - 1 / 3) < 1e-6
    # never half the parts or more
    got, dropped = centered_clip_dropping_outliers([t(0.0), t(0.0), t(10.0), t(10.0)], [1, 1, 1, 1], tau=1.0,
                                                   min_distance=0.0)
    assert dropped == [] and got.item() == 5.0
    assert aggregate_reporting("trimmed_mean", [t(0.0), t(1.0), t(2.0), t(1000.0)], [1, 1, 1, 1])[1] == []


@pytest.mark.parametrize("n", range(1, 13))
def test_the_merge_exchange_network_sorts_every_zero_one_input(n):
    # the 0-1 principle: a comparator network that sorts every 0/1 sequence sorts every sequence
    from p2ptrain.swarm.aggregation import merge_exchange_network
    network = merge_exchange_network(n)
    for bits in range(1 << n):
        v = [(bits >> k) & 1 for k in range(n)]
        for i, j in network:
            if v[i] > v[j]:
                v[i], v[j] = v[j], v[i]
        assert v == sorted(v)


def test_weighted_median_and_trimmed_mean_match_a_full_sort_at_every_group_size():
    # the network (up to SORTING_NETWORK_MAX parts) and torch's sort (beyond) give the same
    # values as the definition by a full sort, with unequal weights; the median also with ties
    # (coarse values; a trimmed mean with ties depends on which tied part is trimmed)
    from p2ptrain.swarm.aggregation import SORTING_NETWORK_MAX
    gen = torch.Generator().manual_seed(0)
    for n in range(1, SORTING_NETWORK_MAX + 3):
        x = torch.randint(-3, 4, (n, 500), generator=gen).to(torch.float64)
        w = torch.randint(1, 9, (n,), generator=gen).to(torch.float64)
        values, order = x.sort(0)
        cum = w[order].cumsum(0)
        index = (cum < w.sum() / 2).sum(0, keepdim=True).clamp(max=n - 1)
        assert torch.equal(weighted_median(x, w), values.gather(0, index)[0])
        if n >= 3:
            x = torch.randn(n, 500, generator=gen, dtype=torch.float64)
            values, order = x.sort(0)
            b = trim_count(n)
            kept, kept_w = values[b:n - b], w[order][b:n - b]
            expected = ((kept * kept_w).sum(0) / kept_w.sum(0)).float()
            got = trimmed_mean(list(x.float()), w.tolist())
            assert torch.allclose(got, expected, rtol=0, atol=1e-6)
