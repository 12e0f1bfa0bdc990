"""Who holds which module: coverage from live peer records, and the joiner's path choice."""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable

from p2ptrain.model.grid import Grid, PathIndex
from p2ptrain.swarm.records import PeerRecord


def module_coverage(grid: Grid, peers: Iterable[PeerRecord], exclude_peer: str | None = None) -> Counter:
    """Module id → number of live, training (not suspended) peers whose path contains it."""
    coverage: Counter = Counter({m: 0 for m in grid.all_modules()})
    for peer in peers:
        if peer.peer_id == exclude_peer or peer.paused:
            continue
        try:
            modules = grid.modules_of(tuple(peer.path))
        except Exception:  # a record for another grid shape: not ours to count
            continue
        coverage.update(modules)
    return coverage


def least_covered_path(grid: Grid, peers: Iterable[PeerRecord], rng: random.Random | None = None) -> PathIndex:
    """The path whose modules have the fewest live holders (ties broken at random, so
    peers joining at the same moment spread out instead of all picking path 0)."""
    coverage = module_coverage(grid, peers)

    def cost(path: PathIndex) -> tuple[int, int]:
        counts = [coverage[m] for m in grid.modules_of(path)[1:]] or [coverage[grid.stem_id(path)]]
        return max(counts), sum(counts)

    best = min(cost(p) for p in grid.paths())
    candidates = [p for p in grid.paths() if cost(p) == best]
    return (rng or random.Random()).choice(candidates)


def peers_holding(grid: Grid, peers: Iterable[PeerRecord], module_id: str, exclude_peer: str) -> list[PeerRecord]:
    """Live peers other than exclude_peer that train module_id now (suspended ones do not)."""
    out = []
    for peer in peers:
        if peer.peer_id == exclude_peer or peer.paused:
            continue
        try:
            if module_id in grid.modules_of(tuple(peer.path)):
                out.append(peer)
        except Exception:
            continue
    return out
