"""Two holders of a module that ended a round apart heal the tie: each moves toward the
mean of the tied states it verified, by a bounded distance. Honest holders meet again the
next round; a stranger that joins the group and holds a far state moves an honest holder
by no more than the bound. Real loopback peers, real downloads (healing.py)."""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch

from p2ptrain.swarm.averaging import fingerprint
from p2ptrain.swarm.healing import HEAL_STEPS
from p2ptrain.swarm.records import ModuleSync
from tests.swarm.adversary import Adversary
from tests.swarm.conftest import in_parallel, max_difference, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

SHARED = ("stem", "L0.M0")


def norm_of_difference(a, b) -> float:
    return float(torch.cat([(x - y).reshape(-1).double() for x, y in zip(a, b)]).norm())


def push_apart(slot, generator: torch.Generator) -> None:
    """Move one holder's global parameters by one outer update's length in a random direction:
    the state a one-sided round leaves behind (one holder applied an update the other did not)."""
    noise = [torch.randn(p.shape, generator=generator) for p in slot.outer.global_params]
    scale = slot.last_step_norm / norm_of_difference(noise, [torch.zeros_like(n) for n in noise])
    with slot.lock:
        for p, n in zip(slot.outer.global_params, noise):
            p.add_(n, alpha=scale)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_two_holders_that_ended_a_round_apart_heal_the_tie_and_agree_the_next_round(swarm, overlap):
    # Prepare: a and b hold the same path and train a round together; then b's globals of
    # both modules move by one outer update that a never applied
    config = swarm_config(f"heal-{'overlap' if overlap else 'plain'}", levels=(1,), round_seconds=6.0,
                          overlap=overlap)
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    generator = torch.Generator().manual_seed(0)
    for module_id in SHARED:
        push_apart(b.node.slots[module_id], generator)
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) > 1e-3

    # Execute: two more rounds; with overlap three (a round's average and check land during
    # the next round, and the last round's lands when run() ends)
    rounds = 3 if overlap else 2
    in_parallel(lambda: a.node.run(max_rounds=rounds), lambda: b.node.run(max_rounds=rounds))

    # Assert: the first check after the split finds a tie, both heal with each other, and
    # from then on the two hold the same state of every module
    # (with overlap a round's report holds the averaging that landed in it, none in the first)
    healed = {m: [r[m].outcome for n in (a, b) for r in n.node.averagings() if m in r] for m in SHARED}
    for module_id in SHARED:
        assert "healed" in healed[module_id], healed
        for node, other in ((a, b), (b, a)):
            heals = [r[module_id].healed_with for r in node.node.averagings()
                     if module_id in r and r[module_id].healed_with]
            assert heals and heals[0] == [other.node.peer_id]
        assert max_difference(a.node.slots[module_id].outer.global_params,
                              b.node.slots[module_id].outer.global_params) < 1e-3, module_id
    last = [n.node.averagings()[-1][m].outcome for n in (a, b) for m in SHARED]
    assert last == ["ok"] * 4, last


STORE_DELAY_S = 2.0  # b's record reaches the DHT this late in the lone round: a slow store


def search_under_another_key(node) -> Callable[[], None]:
    """Make every module of this node look for its group under a group key nobody else uses,
    so it finds nobody, as either side of a matchmaking race does; returns the undo."""
    originals = {}
    for module_id, slot in node.slots.items():
        originals[module_id] = slot.averager.set_group_bits
        slot.averager.set_group_bits = lambda bits, set_bits=originals[module_id]: set_bits(bits + "1")

    def undo() -> None:
        for module_id, set_bits in originals.items():
            node.slots[module_id].averager.set_group_bits = set_bits
    return undo


def store_records_late(node, delay_s: float) -> Callable[[], None]:
    """Make this node's peer records reach the DHT delay_s late, as from a loaded machine or
    a slow DHT; returns the undo."""
    publish = node.records.publish_peer

    def publish_late(*args, **kwargs):
        time.sleep(delay_s)
        return publish(*args, **kwargs)

    node.records.publish_peer = publish_late
    return lambda: setattr(node.records, "publish_peer", publish)


def test_two_holders_that_each_averaged_alone_both_see_the_tie_and_heal_in_that_same_round(swarm):
    # Prepare: a and b hold the same path and average a round together (partners); then a
    # round in which each finds no group (b searches under another key), so each applies
    # only its own update and the two end that round apart, and b's record with that round's
    # fingerprints lands 2 s after a's. Rounds long enough that a lone search (3 windows)
    # leaves the check 8 s (twice the window) before the next round.
    config = swarm_config("heal-alone", levels=(1,), round_seconds=24.0)
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    assert all(len(a.node.history[-1].modules[m].group) == 2 for m in SHARED)

    # Execute: the lone round, then one more round together
    undo = [search_under_another_key(b.node), store_records_late(b.node, STORE_DELAY_S)]
    try:
        in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))
    finally:
        for restore in undo:
            restore()
    lone = {m: [n.node.history[-1].modules[m] for n in (a, b)] for m in SHARED}
    apart_after_lone_round = {m: max_difference(a.node.slots[m].outer.global_params,
                                                b.node.slots[m].outer.global_params) for m in SHARED}
    in_parallel(lambda: a.node.run(max_rounds=1), lambda: b.node.run(max_rounds=1))

    # Assert: in the lone round each averaged alone, and each, a too (whose only read would
    # otherwise have come before b's fingerprints), waited for its partner's fingerprints,
    # saw the tie and healed with it, so the two agree right after that round and average
    # normally after it
    for module_id, (of_a, of_b) in lone.items():
        assert of_a.alone and of_b.alone, (of_a, of_b)
        assert of_a.healed_with == [b.node.peer_id] and of_b.healed_with == [a.node.peer_id], (of_a, of_b)
        assert apart_after_lone_round[module_id] < 1e-3, apart_after_lone_round
    last = [n.node.history[-1].modules[m].outcome for n in (a, b) for m in SHARED]
    assert last == ["ok"] * 4, last


def test_a_stranger_holding_a_far_state_moves_an_honest_holder_by_at_most_the_heal_bound(swarm, adversaries):
    # Prepare: one honest holder of the path; a stranger joins the module's groups every round
    # and vouches for (and serves, matching its claim) a state far from the honest one:
    # parameters 10 away per value and a huge momentum
    config = swarm_config("heal-stranger", levels=(1,), round_seconds=6.0)
    a = swarm.open(config, "0")
    slot = a.node.slots["L0.M0"]
    far = [p + 10.0 for p in slot.outer.global_params] + [torch.full_like(p, 1e3) for p in slot.outer.global_params]
    far_fingerprint, far_norm = fingerprint(far[:len(slot.outer.global_params)])

    claimed = {"round": 0}

    def claim(round_: int) -> dict:  # the stranger's record: "my round-r state is the far one"
        claimed["round"] = round_
        return {"L0.M0": ModuleSync(round=round_, fingerprint=far_fingerprint, norm=far_norm, step=1.0)}

    def served():  # ... and it serves exactly that, at the round it last claimed
        return {"module": "L0.M0", "round": claimed["round"]}, far

    adversary = Adversary(a, path=[0], module_id="L0.M0", lie={"sync": claim}, served_state=served)
    adversaries.append(adversary)
    adversary.start_rounds()

    # Execute: rounds until one of them ends in a tie with the stranger (it joined the group)
    moves = []
    for _ in range(4):
        a.node.run(max_rounds=1)
        result = a.node.history[-1].modules["L0.M0"]
        if result.healed_with:
            vouched = slot.vouched_state()  # what a vouched for: the state before the heal
            n = len(slot.outer.global_params)
            moves.append((norm_of_difference(slot.outer.global_params, vouched[:n]),
                          norm_of_difference(slot.outer.momentum, vouched[n:]), slot.last_step_norm))
            if len(moves) == 2:
                break

    # Assert: every heal moved the honest holder by at most HEAL_STEPS of its own outer
    # updates (parameters) and of its own last averaged pseudo-gradient (momentum), and it
    # is still nowhere near the stranger's state; it keeps training and reports the heals
    assert moves, "the stranger never tied with the honest holder in a group"
    lr = a.run_state.config.outer.lr
    for param_move, momentum_move, step in moves:
        assert 0 < param_move <= HEAL_STEPS * step * (1 + 1e-4)
        assert momentum_move <= HEAL_STEPS * step / lr * (1 + 1e-4)
    assert max_difference(slot.outer.global_params, far[:len(slot.outer.global_params)]) > 5.0
    assert all(torch.isfinite(p).all() for p in slot.outer.global_params + slot.outer.momentum)
