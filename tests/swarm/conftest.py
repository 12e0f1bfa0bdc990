"""Real loopback swarms for tests: every node is a real hivemind DHT + averagers + p2pd on
127.0.0.1, opened through the same `open_node` that `p2ptrain join` uses."""

from __future__ import annotations

import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.swarm.join import JoinOptions, OpenNode, open_node

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def swarm_config(run_id: str, *, levels=(2, 2), stem: str = "shared", compression: str = "fp16",
                 steps_per_round: int = 3, averaging_timeout: float = 30.0, round_seconds: float = 5.0,
                 overlap: bool = False, fill_round: bool = False) -> RunConfig:
    """A run small enough that rounds take well under a second of compute; rounds end every
    round_seconds on the swarm's clock. Peers stop at steps_per_round steps and wait for the
    round's end (fill_round off) unless a test is about filling rounds: a dozen tiny peers
    training flat out would starve their own averagers on 2 cores."""
    return RunConfig.from_dict({
        "run": {"id": run_id, "seed": 0},
        "model": {"d_model": 32, "n_heads": 2, "context": 32},
        "grid": {"levels": list(levels), "blocks_per_level": 1, "stem": stem},
        "router": {"kmeans_iters": 5, "sample_docs": 500},
        "inner": {"batch_size": 4, "steps_per_round": steps_per_round, "warmup_steps": 1},
        # generous windows: a loaded 2-core CI machine must still group every peer
        "averaging": {"compression": compression, "matchmaking_time": 4.0,
                      "averaging_timeout": averaging_timeout, "round_seconds": round_seconds, "overlap": overlap,
                      "fill_round": fill_round},
    })


@pytest.fixture(scope="session")
def corpus():
    return load_documents(None, 4096)


class Swarm:
    """Opens nodes on loopback and closes every one of them at the end of the test."""

    def __init__(self, tmp_path: Path, corpus):
        self.tmp_path = tmp_path
        self.corpus = corpus
        self.nodes: list[OpenNode] = []
        self.opened = 0  # homes are never reused, even after a node left

    def open(self, config: RunConfig, path: str, initial_peers: Sequence[str] = (), **kwargs) -> OpenNode:
        home = self.tmp_path / f"node{self.opened}"
        self.opened += 1
        options = JoinOptions(initial_peers=list(initial_peers), new_swarm=not initial_peers,
                              host_maddrs=LOOPBACK, path=path, run_config=config, device="cpu", **kwargs)
        opened = open_node(options, home, lambda: self.corpus)
        self.nodes.append(opened)
        opened.node.publish_status()
        return opened

    def open_all(self, config: RunConfig, paths: Sequence[str]) -> list:
        """One node per path, all joining the first; returns their SwarmNodes once every one
        has published its record again (so each sees the others')."""
        first = self.open(config, paths[0])
        nodes = [first.node] + [self.open(config, path, initial_peers=first.maddrs).node for path in paths[1:]]
        for node in nodes:
            node.publish_status()
        return nodes

    def close(self) -> None:
        for opened in reversed(self.nodes):
            opened.close()
        self.nodes.clear()


@pytest.fixture
def swarm(tmp_path, corpus):
    s = Swarm(tmp_path, corpus)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def adversaries():
    """Hostile peers a test starts (tests/swarm/adversary.py), each closed after the test."""
    from tests.swarm.adversary import Adversary
    made: list[Adversary] = []
    yield made
    for adversary in made:
        adversary.close()


def max_difference(a, b) -> float:
    """Largest absolute difference between two lists of tensors (two holders' copies)."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def applied_mean_error(start, local_a, local_b, got, tokens=(100, 300), step=0.7 * 1.9) -> float:
    """How far the outer step a holder took (global `start` → `got`) is from a fresh-momentum
    Nesterov step with the exact token-weighted mean of two peers' pseudo-gradients, relative
    to that mean: the error a lossy wire codec left in the average."""
    mean = torch.cat([((tokens[0] * (g - la) + tokens[1] * (g - lb)) / sum(tokens)).reshape(-1)
                      for g, la, lb in zip(start, local_a, local_b)])
    applied = torch.cat([((g - after) / step).reshape(-1) for g, after in zip(start, got)])
    return float((applied - mean).norm() / mean.norm())


def in_parallel(*calls: Callable[[], object], timeout: float = 240.0) -> list:
    """Run calls in threads (as separate machines would), return their results in order."""
    results: list = [None] * len(calls)
    errors: list = []

    def target(i, call):
        try:
            results[i] = call()
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:  # say where each stuck node is, or the failure cannot be read
        frames = sys._current_frames()
        stacks = "\n".join(f"--- call {threads.index(t)}:\n" + "".join(traceback.format_stack(frames[t.ident]))
                           for t in stuck if t.ident in frames)
        raise AssertionError(f"{len(stuck)} node(s) did not finish their rounds in {timeout:g} s:\n{stacks}")
    if errors:
        raise errors[0]
    return results
