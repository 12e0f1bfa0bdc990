"""Aggregation rules for one slice of an all-reduce: what each reducer computes from the
parts its group's senders hand it (pure functions, no hivemind).

    weighted_mean   hivemind's own rule: Σ wᵢ xᵢ / Σ wᵢ. One sender can move it anywhere.
    centered_clip   BTARD's CenteredClip (Karimireddy et al. 2021; Gorbunov et al. 2022):
                    start from the coordinate-wise median, then ~20 times
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

import math
from typing import Sequence

import torch

RULES = ("mean", "centered_clip", "trimmed_mean")
CLIP_ITERATIONS = 20
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


def weighted_median(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median of the rows of x (the lower one when weights split evenly;
    with equal weights and an even count: the mean of the two middle values)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    if torch.all(w == w[0]):
        values, _ = x.sort(0)
        return values[(n - 1) // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    values, order = x.sort(0)
    cum = w[order].cumsum(0)
    index = (cum < w.sum() / 2).sum(0, keepdim=True).clamp(max=n - 1)
    return values.gather(0, index)[0]


def auto_tau(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> float:
    """AUTO_TAU_FACTOR × the median distance of the parts to their coordinate-wise median."""
    x, w = _stack(parts, weights)
    center = weighted_median(x, w)
    distances = (x - center).norm(dim=1)
    return AUTO_TAU_FACTOR * float(distances.median())


def centered_clip(parts: Sequence[torch.Tensor], weights: Sequence[float], tau: float = 0.0,
                  iterations: int = CLIP_ITERATIONS) -> torch.Tensor:
    """CenteredClip from the weighted coordinate-wise median; tau ≤ 0 means auto (see module doc)."""
    x, w = _stack(parts, weights)
    if tau <= 0:
        tau = auto_tau(parts, weights)
    v = weighted_median(x, w)
    total = w.sum()
    if tau > 0 and math.isfinite(tau):
        for _ in range(iterations):
            diff = x - v
            norms = diff.norm(dim=1)
            scale = torch.clamp(tau / norms.clamp_min(1e-300), max=1.0)
            step = (w * scale) @ diff / total
            v = v + step
            if float(step.norm()) <= 1e-12 * max(float(v.norm()), 1e-30):
                break
    return v.to(parts[0].dtype).reshape(parts[0].shape)


def centered_clip_dropping_outliers(parts: Sequence[torch.Tensor], weights: Sequence[float], tau: float = 0.0,
                                    factor: float = OUTLIER_FACTOR, min_distance: float = math.inf
                                    ) -> tuple[torch.Tensor, list[int]]:
    """CenteredClip, then parts further than factor × τ and than min_distance from its result
    are dropped (a minority at most: fewer than half of the parts) and the rest clipped again
    with the same τ. Returns (aggregate, indices of the dropped parts) — the node reports their
    senders. min_distance = inf: nothing is ever dropped."""
    if tau <= 0:
        tau = auto_tau(parts, weights)
    result = centered_clip(parts, weights, tau)
    if not (tau > 0 and math.isfinite(tau)):
        return result, []
    x, _ = _stack(parts, weights)
    distances = (x - result.reshape(-1).to(torch.float64)).norm(dim=1)
    outliers = [i for i, d in enumerate(distances.tolist()) if d > factor * tau and d > min_distance]
    if not outliers or 2 * len(outliers) >= len(parts):
        return result, []
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
    values, order = x.sort(0)
    kept, kept_w = values[b:n - b], w[order][b:n - b]
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
