"""Aggregation rules for one slice of an all-reduce: what each reducer computes from the
parts its group's senders hand it (pure functions, no hivemind).

    weighted_mean   hivemind's own rule: Σ wᵢ xᵢ / Σ wᵢ. One sender can move it anywhere.
    centered_clip   BTARD's CenteredClip (Karimireddy et al. 2021; Gorbunov et al. 2022):
                    start from the coordinate-wise median, then until converged (≤ 20 times)
                        v ← v + Σ wᵢ · clip(xᵢ − v, τ) / Σ wᵢ,   clip(d, τ) = d · min(1, τ / ‖d‖₂)
                    Weights (tokens) still count, but each sender's pull on v is capped at
                    τ in L2 norm: with the other senders holding at least as much weight
                    as it and lying within τ of the result, one sender shifts the result
                    from their weighted mean by at most τ · wⱼ / Σ_{i≠j} wᵢ ≤ τ, whatever
                    it sends (a fixed point of the iteration: its clipped pull balances
                    theirs). A majority (by weight) of liars is not bounded.
    trimmed_mean    coordinate-wise: drop the `trim` smallest and `trim` largest values of
                    each coordinate, weighted mean of the rest (trim = n // 4, at least 1
                    from 3 senders on). A minority of up to `trim` liars stays inside the
                    honest values' range on every coordinate.

Outliers (centered_clip): after clipping, a part further than OUTLIER_FACTOR × τ from the
result (8× the parts' median spread with the auto τ) AND further than
OUTLIER_SCALE × the reducer's own pseudo-gradient RMS × √(part size) is dropped and the
rest clipped again — as long as fewer than half the parts are dropped. Its sender is
reported (not banned: the bound can fall differently at different reducers, and bans
that differ between honest peers would split their groups). The second condition is needed because a
part's spread alone cannot tell a liar from an honest peer that saw tokens the others did
not (embedding rows only it updated: the other parts are ~0, so τ is ~0); with Adam as
the inner optimizer an honest element moves about lr per step, so an honest part stays
within a few RMS per value. So a gross liar (×100, a flipped and scaled update, noise far
above the honest scale) stops counting at all, while a subtle one is still only clipped.

τ (the clip radius): `clip_radius` from the run config, or 0 = auto:
    τ = AUTO_TAU_FACTOR × median over senders of ‖xᵢ − median‖₂,
the spread of the parts around their coordinate-wise median. A minority of senders
cannot inflate it (it is a median of distances, and the median point itself stays inside
the honest values' range), and with a factor of 2 honest parts are rarely clipped, so
the rule costs nothing with no attacker (measured in benchmarks/bench_byzantine.py).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

RULES = ("mean", "centered_clip", "trimmed_mean")
CLIP_ITERATIONS = 20
CLIP_TOLERANCE = 1e-7  # stop once a step moves the result by less than this × τ
AUTO_TAU_FACTOR = 2.0
OUTLIER_FACTOR = 4.0  # centered_clip drops parts this many τ from its result (honest ones: ≲ 1 τ) ...
OUTLIER_SCALE = 10.0  # ... and this many times the reducer's own RMS per value away (see module doc)
MIN_ROBUST_SENDERS = 3


def _stack(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(parts) == 0 or len(parts) != len(weights):
        raise ValueError("need one weight per part, and at least one part")
    x = torch.stack([p.reshape(-1).to(torch.float64) for p in parts])
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError("weights must be finite and positive")
    return x, w


def weighted_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    x, w = _stack(parts, weights)
    return ((w[:, None] * x).sum(0) / w.sum()).to(parts[0].dtype).reshape(parts[0].shape)


SORTING_NETWORK_MAX = 16  # up to this many parts a slice is sorted by a comparator network (see _sorted_rows)


@functools.lru_cache(maxsize=None)
def merge_exchange_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's merge-exchange sorting network for n inputs (Knuth, TAOCP vol. 3, 5.2.2
    Algorithm M): comparators (i, j), i < j, that leave any n values sorted when each one
    puts the smaller of positions i and j at i. 19 comparators for 8 inputs, 63 for 16."""
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    pairs: list[tuple[int, int]] = []
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(pairs)


def _sorted_rows(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x's rows sorted coordinate-wise (and, when w is given, each row's weight carried along
    with its values: row i of the second result is the weight of the value in row i).

    Why a network: a slice has a handful of parts of ~10⁵ values each, and torch's sort along
    that short first axis costs ~50 ns per value (8 ms for 4 × 131,072 doubles here), while a
    comparator is two elementwise passes (min and max) at memory speed: 5 comparators sort
    4 parts, 19 sort 8. Values are finite (the all-reduce refuses any other part)."""
    n = x.shape[0]
    if n > SORTING_NETWORK_MAX:
        values, order = x.sort(0)
        return values, (None if w is None else w[order])
    # in place, in buffers allocated once: a fresh 1 MB result per elementwise pass costs as
    # much as the pass itself (the allocator maps new pages every time)
    values = x.clone()
    weights = None if w is None else w[:, None].expand_as(x).clone()
    spare = torch.empty_like(x[0])
    swap = torch.empty_like(x[0]) if w is not None else None
    for i, j in merge_exchange_network(n):
        a, b = values[i], values[j]
        if weights is not None:  # arithmetic, not torch.where: where is ~8× slower than min/max here
            torch.gt(a, b, out=swap)
        torch.minimum(a, b, out=spare)
        torch.maximum(a, b, out=b)
        a.copy_(spare)
        if weights is not None:
            wa, wb = weights[i], weights[j]
            torch.lerp(wa, wb, swap, out=spare)
            wb.add_(wa).sub_(spare)
            wa.copy_(spare)
    return values, weights


def weighted_median(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median of the rows of x (the lower one when weights split evenly;
    with equal weights and an even count: the mean of the two middle values)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    if torch.all(w == w[0]):
        values, _ = _sorted_rows(x, None)
        return values[(n - 1) // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    values, sorted_w = _sorted_rows(x, w)
    cum = sorted_w.cumsum(0)
    index = (cum < w.sum() / 2).sum(0, keepdim=True).clamp(max=n - 1)
    return values.gather(0, index)[0]


def _spread_tau(x: torch.Tensor, center: torch.Tensor) -> float:
    return AUTO_TAU_FACTOR * float((x - center).norm(dim=1).median())


def auto_tau(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> float:
    """AUTO_TAU_FACTOR × the median distance of the parts to their coordinate-wise median."""
    x, w = _stack(parts, weights)
    return _spread_tau(x, weighted_median(x, w))


def _clip_iterations(x: torch.Tensor, w: torch.Tensor, start: torch.Tensor, tau: float,
                     iterations: int) -> torch.Tensor:
    v, total = start.clone(), w.sum()
    if tau > 0 and math.isfinite(tau):
        diff, step = torch.empty_like(x), torch.empty_like(x[:1])  # reused: see _sorted_rows on allocations
        for _ in range(iterations):
            torch.sub(x, v, out=diff)
            norms = diff.norm(dim=1)
            scale = torch.clamp(tau / norms.clamp_min(1e-300), max=1.0)
            torch.mm((w * scale / total)[None], diff, out=step)
            v.add_(step[0])
            # converged: the fixed point is then within ~1e-7 τ (the iteration contracts
            # geometrically), far below the wire codec's own error (fp16: ~1e-3 relative)
            if float(step.norm()) <= CLIP_TOLERANCE * tau:
                break
    return v


def centered_clip(parts: Sequence[torch.Tensor], weights: Sequence[float], tau: float = 0.0,
                  iterations: int = CLIP_ITERATIONS) -> torch.Tensor:
    """CenteredClip from the weighted coordinate-wise median; tau ≤ 0 means auto (see module doc)."""
    x, w = _stack(parts, weights)
    center = weighted_median(x, w)
    v = _clip_iterations(x, w, center, _spread_tau(x, center) if tau <= 0 else tau, iterations)
    return v.to(parts[0].dtype).reshape(parts[0].shape)


def centered_clip_dropping_outliers(parts: Sequence[torch.Tensor], weights: Sequence[float], tau: float = 0.0,
                                    factor: float = OUTLIER_FACTOR, min_distance: float = math.inf
                                    ) -> tuple[torch.Tensor, list[int]]:
    """CenteredClip, then parts further than factor × τ and than min_distance from its result
    are dropped (a minority at most: fewer than half of the parts) and the rest clipped again
    with the same τ. Returns (aggregate, indices of the dropped parts) — the node reports their
    senders. min_distance = inf: nothing is ever dropped. The parts are stacked and their
    median taken once (τ and the first clipping share them): the median is most of the cost."""
    x, w = _stack(parts, weights)
    center = weighted_median(x, w)
    if tau <= 0:
        tau = _spread_tau(x, center)
    result = _clip_iterations(x, w, center, tau, CLIP_ITERATIONS)
    as_part = result.to(parts[0].dtype).reshape(parts[0].shape)
    if not (tau > 0 and math.isfinite(tau)):
        return as_part, []
    distances = (x - as_part.reshape(-1).to(torch.float64)).norm(dim=1)
    outliers = [i for i, d in enumerate(distances.tolist()) if d > factor * tau and d > min_distance]
    if not outliers or 2 * len(outliers) >= len(parts):
        return as_part, []
    keep = [i for i in range(len(parts)) if i not in outliers]
    return centered_clip([parts[i] for i in keep], [weights[i] for i in keep], tau), outliers


def trim_count(n: int) -> int:
    """How many values trimmed_mean drops at each end of a coordinate with n senders."""
    return max(n // 4, 1) if n >= 3 else 0


def trimmed_mean(parts: Sequence[torch.Tensor], weights: Sequence[float], trim: int | None = None) -> torch.Tensor:
    x, w = _stack(parts, weights)
    n = x.shape[0]
    b = trim_count(n) if trim is None else trim
    if 2 * b >= n:
        raise ValueError(f"cannot trim {b} from each end of {n} values")
    values, sorted_w = _sorted_rows(x, w)
    kept, kept_w = values[b:n - b], sorted_w[b:n - b]
    return ((kept * kept_w).sum(0) / kept_w.sum(0)).to(parts[0].dtype).reshape(parts[0].shape)


def aggregate_reporting(rule: str, parts: Sequence[torch.Tensor], weights: Sequence[float],
                        tau: float = 0.0, min_outlier_distance: float = math.inf) -> tuple[torch.Tensor, list[int]]:
    """One slice's aggregate under `rule` (one of RULES), and the parts it dropped as outliers
    (centered_clip only). With fewer than MIN_ROBUST_SENDERS parts every rule is the weighted
    mean: two senders have no majority to side with."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; allowed: {', '.join(RULES)}")
    if rule == "mean" or len(parts) < MIN_ROBUST_SENDERS:
        return weighted_mean(parts, weights), []
    if rule == "centered_clip":
        return centered_clip_dropping_outliers(parts, weights, tau, min_distance=min_outlier_distance)
    return trimmed_mean(parts, weights), []


def aggregate(rule: str, parts: Sequence[torch.Tensor], weights: Sequence[float], tau: float = 0.0) -> torch.Tensor:
    """One slice's aggregate under `rule` (see aggregate_reporting)."""
    return aggregate_reporting(rule, parts, weights, tau)[0]
