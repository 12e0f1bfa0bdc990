"""A real loopback swarm with liars in it (tests/swarm/adversary.py's `open_liar`), and what
its honest peers end with: shared by tests/faults/ and benchmarks/bench_byzantine.py.

Every peer holds the only path of a one-level grid, so every module (stem and L0.M0) is
averaged by all of them each round. Honest peers draw fixed data seeds (0, 1, …), so a run
with liars and the honest control see the same honest batches.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import psutil
import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import split_heldout
from p2ptrain.data.tokenizer import load_tokenizer
from p2ptrain.train.evaluate import _score
from p2ptrain.train.session import build_model
from tests.swarm.adversary import open_liar
from tests.swarm.conftest import Swarm, in_parallel

PATH = "0"


def byzantine_config(run_id: str, rule: str, *, d_model: int = 64, steps_per_round: int = 4,
                     round_seconds: float = 8.0, compression: str = "fp16") -> RunConfig:
    return RunConfig.from_dict({
        "run": {"id": run_id, "seed": 0},
        "model": {"d_model": d_model, "n_heads": 2, "context": 64},
        "grid": {"levels": [1], "blocks_per_level": 1, "stem": "shared"},
        "router": {"kmeans_iters": 5, "sample_docs": 500},
        "inner": {"batch_size": 8, "steps_per_round": steps_per_round, "warmup_steps": 1, "lr": 3e-3},
        "averaging": {"compression": compression, "matchmaking_time": 4.0, "averaging_timeout": 30.0,
                      "round_seconds": round_seconds, "aggregation": rule, "fill_round": False},
    })


@dataclass
class AttackRun:
    rule: str
    attack: Optional[str]
    honest: int
    liars: int
    rounds: int
    heldout_loss: float  # mean over honest peers of their global model's held-out loss
    # largest relative parameter difference between the honest peers whose last outer step
    # was of the round most of them ended at (honest_at_final_round): a peer that skipped a
    # round under load ends a round off, and two rounds' states differ by an outer step
    honest_spread: float
    rounds_completed: list[int] = field(default_factory=list)  # per honest peer
    final_rounds: list[int] = field(default_factory=list)  # per honest peer: the schedule round of its last outer step
    honest_at_final_round: int = 0  # honest peers that ended at the round most of them ended at
    seconds_outer: float = 0.0  # mean over honest peers and rounds (averaging stall)
    cpu_seconds_per_round: float = 0.0  # this process and its children (averagers, DHTs, p2pd)
    bans_issued: int = 0  # by honest peers
    liars_banned: int = 0  # liars banned by at least one honest peer
    rejections: int = 0  # messages refused by honest peers
    lying_reducer_slices: int = 0  # module-rounds in which an honest peer refused a reducer's slice
    finite: bool = True  # every honest global parameter is finite

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_sequences(config: RunConfig, corpus, max_tokens: int = 16_384) -> list[torch.Tensor]:
    _, heldout = split_heldout(corpus, config.data.heldout_percent)
    tokenizer = load_tokenizer(config.data.tokenizer)
    sequences, budget = [], max_tokens
    for doc in heldout:
        if budget <= 0:
            break
        ids = (list(tokenizer.encode(doc.text)) + [tokenizer.eos_id])[: budget + 1]
        sequences.append(torch.tensor(ids, dtype=torch.long))
        budget -= len(ids) - 1
    return sequences


def global_heldout_loss(node, sequences) -> float:
    """Held-out loss of a node's global (agreed) parameters."""
    model = build_model(node.run_state, node.session.path)
    for module_id in model.module_ids:
        model.load_module_state(module_id, node.slots[module_id].outer.global_state())
    total, count = _score(model, sequences, node.cfg.model.context, torch.device("cpu"))
    return total / count if count else math.nan


def _cpu_seconds() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def run_attack(tmp_path: Path, corpus, *, rule: str, attack: Optional[str], honest: int, liars: int,
               rounds: int, sequences: Sequence[torch.Tensor], **config_kwargs) -> AttackRun:
    """One swarm: `honest` honest peers and `liars` peers lying as `attack` says, `rounds` rounds."""
    config = byzantine_config(f"byz-{rule}-{attack or 'none'}-{honest}-{liars}-{time.monotonic_ns() % 10**6}",
                              rule, **config_kwargs)
    swarm = Swarm(tmp_path, corpus)
    try:
        first = swarm.open(config, PATH, data_seed=0)
        honest_nodes = [first] + [swarm.open(config, PATH, initial_peers=first.maddrs, data_seed=i)
                                  for i in range(1, honest)]
        liar_nodes = [open_liar(swarm, config, PATH, attack, initial_peers=first.maddrs, seed=i)
                      for i in range(liars)] if attack else []
        for opened in honest_nodes + liar_nodes:
            opened.node.publish_status()
        cpu0 = _cpu_seconds()
        nodes = [o.node for o in honest_nodes + liar_nodes]
        in_parallel(*[lambda n=n: n.run(max_rounds=rounds) for n in nodes],
                    timeout=rounds * (config.averaging.round_seconds + 120) + 120)
        cpu = _cpu_seconds() - cpu0
        honest_only = [o.node for o in honest_nodes]
        liar_ids = {o.node.peer_id for o in liar_nodes}
        losses = [global_heldout_loss(n, sequences) for n in honest_only]
        final_rounds = [max(s.round for s in n.slots.values()) for n in honest_only]
        final = Counter(final_rounds).most_common(1)[0][0]
        at_final = [n for n, r in zip(honest_only, final_rounds) if r == final]
        reference = at_final[0]
        spread = 0.0
        for module_id, slot in reference.slots.items():
            ref = torch.cat([p.reshape(-1) for p in slot.outer.global_params])
            for other in at_final[1:]:
                got = torch.cat([p.reshape(-1) for p in other.slots[module_id].outer.global_params])
                spread = max(spread, float((ref - got).norm() / ref.norm().clamp_min(1e-12)))
        reports = [r for n in honest_only for r in n.history]
        return AttackRun(
            rule=rule, attack=attack, honest=honest, liars=liars, rounds=rounds,
            heldout_loss=sum(losses) / len(losses), honest_spread=spread,
            rounds_completed=[len(n.history) for n in honest_only],
            final_rounds=final_rounds, honest_at_final_round=len(at_final),
            seconds_outer=sum(r.seconds_outer for r in reports) / max(len(reports), 1),
            cpu_seconds_per_round=cpu / rounds,
            bans_issued=sum(sum(n.bans_issued.values()) for n in honest_only),
            liars_banned=sum(any(n.bans_issued[p] for n in honest_only) for p in liar_ids),
            rejections=sum(sum(n.rejections.by_reason.values()) for n in honest_only),
            lying_reducer_slices=sum(bool(m.lying_reducers) for r in reports for m in r.modules.values()),
            finite=all(torch.isfinite(p).all() for n in honest_only for s in n.slots.values()
                       for p in s.outer.global_params))
    finally:
        swarm.close()
