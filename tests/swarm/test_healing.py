"""Two holders of a module that ended a round apart heal the tie: each moves toward the
mean of the tied states it verified, by a bounded distance. Honest holders meet again the
next round; a stranger that joins the group and holds a far state moves an honest holder
by no more than the bound. Real loopback peers, real downloads (healing.py)."""

from __future__ import annotations

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
