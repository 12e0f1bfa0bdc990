"""Per-module DiLoCo across real peers: the averaged result is the exact token-weighted
mean of the pseudo-gradients followed by one Nesterov step, and every module of a 2×2
grid is averaged with — and only with — the peers whose paths contain it."""

from __future__ import annotations

import time

import pytest
import torch

from prometheus_client import generate_latest

from p2ptrain.monitor.metrics import NodeMetrics
from p2ptrain.swarm.averaging import CHUNK_TIMEOUT_FLOOR_S
from p2ptrain.swarm.consistency import agree
from p2ptrain.swarm.node import RoundReport
from tests.swarm.conftest import applied_mean_error, in_parallel, max_difference, swarm_config
from tests.swarm.prometheus_rules import parse

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]


def copies_agree(nodes, module_id: str) -> bool:
    """The holders' global copies of a module agree as the protocol judges them: fingerprints
    at the same round within the codec's drift allowance (consistency.agree)."""
    claims = [n.slots[module_id].vouch(n.peer_id) for n in nodes]
    return all(agree(claims[0], c, nodes[0].codec_tolerance) for c in claims[1:])


def two_holders_after_inner_steps(swarm, run_id: str, compression: str, shared: str = "L0.M0"):
    """Grid [1, 2] with private stems: paths (0,0) and (0,1) share only L0.M0. Both peers train
    3 steps; returns them, the shared module's global parameters (equal on both) and each
    peer's local ones after its steps."""
    config = swarm_config(run_id, levels=(1, 2), stem="per_path", compression=compression)
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    start = [p.clone() for p in a.node.slots[shared].outer.global_params]
    assert all(torch.equal(x, y) for x, y in zip(start, b.node.slots[shared].outer.global_params))
    a.node.session.inner_steps(3)
    b.node.session.inner_steps(3)
    local_a = [p.clone() for p in a.node.session.local_state(shared).values()]
    local_b = [p.clone() for p in b.node.session.local_state(shared).values()]
    return a, b, start, local_a, local_b


def test_two_peers_average_the_shared_module_to_the_closed_form(swarm):
    # Prepare: two peers whose paths share only L0.M0, no wire compression
    shared = "L0.M0"
    a, b, start, local_a, local_b = two_holders_after_inner_steps(swarm, "closed-form", "none")
    own_stem_start = [p.clone() for p in a.node.slots["stem.P0-0"].outer.global_params]
    own_stem_local = [p.clone() for p in a.node.session.local_state("stem.P0-0").values()]

    # Execute: one outer step, with 100 vs 300 tokens as the averaging weights (a round's cap is 384)
    reports = in_parallel(lambda: a.node.outer_step(1, tokens=100), lambda: b.node.outer_step(1, tokens=300))

    # Assert: θ ← θ − lr·(Δ̄ + μ·m) with m = Δ̄ (fresh momentum): θ − 0.7·1.9·Δ̄
    for g, la, lb, got_a, got_b in zip(start, local_a, local_b, a.node.slots[shared].outer.global_params,
                                       b.node.slots[shared].outer.global_params):
        mean = (100 * (g - la) + 300 * (g - lb)) / 400
        expected = g - 0.7 * (mean + 0.9 * mean)
        torch.testing.assert_close(got_a, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_b, expected, rtol=0, atol=1e-6)
    assert sorted(reports[0][shared].group) == sorted([a.node.peer_id, b.node.peer_id])
    # what each side measured of the all-reduce: the same messages, counted at both ends
    got_a, got_b = reports[0][shared], reports[1][shared]
    assert got_a.bytes_sent == got_b.bytes_received > 0 and got_b.bytes_sent == got_a.bytes_received > 0
    # uncompressed float32: each sends its part of the other's slice and returns the reduced
    # delta of its own slice, so each sends one copy of the module, 4 bytes a value
    values = sum(p.numel() for p in start)
    assert got_a.bytes_sent == got_b.bytes_sent == 4 * values
    assert all(r.seconds_matchmaking >= 0 and r.seconds_allreduce > 0 for r in (got_a, got_b))
    metrics = NodeMetrics(a.node)
    metrics.on_round(RoundReport(round=1, loss=1.0, tokens=100, tokens_per_s=1.0, seconds_inner=1.0,
                                 seconds_outer=1.0, modules=reports[0]))
    scraped = parse(generate_latest(metrics.registry).decode())
    sent = [s.value for s in scraped["p2ptrain_averaging_sent_bytes"].samples
            if s.name.endswith("_total") and s.labels["module"] == shared]
    assert sent == [got_a.bytes_sent]
    assert [s.value for s in scraped["p2ptrain_allreduce_seconds"].samples
            if s.name.endswith("_count") and s.labels["module"] == shared] == [1]
    # a private module is stepped with this node's own pseudo-gradient, without waiting for anyone
    assert reports[0]["stem.P0-0"].alone
    for g, local, got in zip(own_stem_start, own_stem_local, a.node.slots["stem.P0-0"].outer.global_params):
        torch.testing.assert_close(got, g - 0.7 * 1.9 * (g - local), rtol=0, atol=1e-6)
    # training continues from the new global parameters
    for name, got in a.node.session.local_state(shared).items():
        assert torch.equal(got, a.node.slots[shared].outer.global_state()[name])


def test_two_peers_averaging_in_4bit_end_with_equal_copies_near_the_closed_form(swarm):
    # Prepare: the closed-form test's two holders of L0.M0, with the wire codec 4-bit NF4
    shared = "L0.M0"
    a, b, start, local_a, local_b = two_holders_after_inner_steps(swarm, "nf4", "4bit")

    # Execute: one outer step, 100 vs 300 tokens
    reports = in_parallel(lambda: a.node.outer_step(1, tokens=100), lambda: b.node.outer_step(1, tokens=300))

    # Assert: both averaged with each other, and hold the same values (each reducer returns the
    # average itself in 4 bits, and rounds its own slice the same way) ...
    got_a, got_b = (n.node.slots[shared].outer.global_params for n in (a, b))
    assert sorted(reports[0][shared].group) == sorted([a.node.peer_id, b.node.peer_id])
    assert reports[0][shared].outcome == reports[1][shared].outcome == "ok"
    assert max_difference(got_a, got_b) <= 1e-6
    assert copies_agree([a.node, b.node], shared)
    # ... which are the closed form's step, up to the codec's error on the mean pseudo-gradient
    assert applied_mean_error(start, local_a, local_b, got_a) < 0.2
    # each sends one copy of the module, in about 0.56 bytes a value
    values = sum(p.numel() for p in start)
    for report in (reports[0][shared], reports[1][shared]):
        assert 0.55 * values < report.bytes_sent < 0.6 * values


def test_a_holder_absent_last_round_is_not_waited_for_but_stays_in_the_group_when_already_there(swarm):
    # Prepare: three holders of one path, windows of 10 s; a and b counted c absent last round
    # (so each waits only for the other), c counts nobody absent
    config = swarm_config("absent-holder", levels=(1,))
    config.averaging.matchmaking_time = 10.0
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    c = swarm.open(config, "0", initial_peers=a.maddrs)
    modules = ("stem", "L0.M0")

    def count_c_absent():
        for node in (a.node, b.node):
            node.absent = {m: {c.node.peer_id} for m in modules}

    def after(seconds, node, round_):
        def call():
            time.sleep(seconds)
            return node.outer_step(round_, tokens=100)
        return call

    # Execute: round 1 — a searches first (its group leads), c joins 2 s later, b 2 s after c;
    # round 2 — c does not search at all
    count_c_absent()
    first = in_parallel(after(0.0, a.node, 1), after(2.0, c.node, 1), after(4.0, b.node, 1))
    count_c_absent()
    started = time.monotonic()
    second = in_parallel(after(0.0, a.node, 2), after(0.0, b.node, 2))
    seconds = time.monotonic() - started

    # Assert: c, in a's group before b arrived, stayed in it (a group sized for a and b only
    # was complete with c and left b alone); without c, a and b did not wait out the window
    everyone = sorted(n.node.peer_id for n in (a, b, c))
    for report in first:
        for module_id in modules:
            assert sorted(report[module_id].group) == everyone, (module_id, report[module_id])
    for report in second:
        for module_id in modules:
            assert sorted(report[module_id].group) == sorted([a.node.peer_id, b.node.peer_id]), report[module_id]
    assert seconds < config.averaging.matchmaking_time


def test_four_peers_on_a_2x2_grid_agree_on_every_module_after_three_rounds(swarm):
    # Prepare: one peer per path; fp16 on the wire
    config = swarm_config("grid-2x2")
    nodes = swarm.open_all(config, ["0,0", "0,1", "1,0", "1,1"])
    start = {m: [p.clone() for p in slot.outer.global_params] for node in nodes for m, slot in node.slots.items()}

    # Execute
    histories = in_parallel(*[lambda n=n: n.run(max_rounds=3) for n in nodes])

    # Assert: each module's holders hold the same global parameters, up to fp16 wire error, as
    # the protocol judges it (fingerprints within the codec's drift allowance: a fixed bound
    # of 1 % of the module's move failed once in test_split_table), and every module moved
    holders: dict[str, list] = {}
    for node in nodes:
        for module_id in node.session.module_ids:
            holders.setdefault(module_id, []).append(node)
    assert {m: len(h) for m, h in holders.items()} == {"stem": 4, "L0.M0": 2, "L0.M1": 2, "L1.M0": 2, "L1.M1": 2}
    for module_id, nodes_with_module in holders.items():
        reference = nodes_with_module[0].slots[module_id].outer.global_params
        assert all((x - x0).abs().max().item() > 0 for x, x0 in zip(reference, start[module_id]))
        assert copies_agree(nodes_with_module, module_id), f"{module_id} differs between peers"
    # ... and was only ever averaged among those holders
    for module_id, nodes_with_module in holders.items():
        allowed = {n.peer_id for n in nodes_with_module}
        groups = [set(r.modules[module_id].group) for h in histories for r in h if module_id in r.modules]
        assert all(g <= allowed for g in groups if g), f"{module_id} was averaged with a non-holder"
        assert allowed in groups, f"{module_id} was never averaged by all of its holders together"
    assert all(len(h) == 3 for h in histories)
    assert all(h[-1].loss < h[0].loss + 0.5 for h in histories)
    # every round says where its outer phase went, and a module that averaged says how long
    # its group took to form and to all-reduce
    for report in (r for h in histories for r in h):
        assert set(report.outer_phases) == {"average", "publish", "verify", "checkpoint"}
        assert all(s >= 0 for s in report.outer_phases.values())
        assert sum(report.outer_phases.values()) <= report.seconds_outer + 1e-6
        for result in report.modules.values():
            if len(result.group) > 1:
                assert result.seconds_matchmaking >= 0 and result.seconds_allreduce >= 0


def test_overlapped_averaging_lands_one_round_late_and_peers_still_agree(swarm):
    # Prepare: averaging runs in the background while the next round computes
    config = swarm_config("overlap", levels=(1, 2))
    config.averaging.overlap = True
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)

    # Execute
    in_parallel(lambda: a.node.run(max_rounds=3), lambda: b.node.run(max_rounds=3))

    # Assert: round 1 reports nothing averaged yet (its average lands at the end of round 2);
    # round 3's average lands when run() stops, reported on its own; at the end every shared
    # module agrees and both peers counted all 3 rounds
    first, *later = a.node.history
    assert first.modules == {} and first.round == 0
    landing = a.node.final_landing
    assert landing is not None and 0 < later[0].round < later[1].round < landing.round
    assert landing.round == a.node.round == b.node.round
    both = sorted([a.node.peer_id, b.node.peer_id])
    assert all(sorted(modules["stem"].group) == both for modules in a.node.averagings())
    assert len(a.node.averagings()) == 3 and a.node.status()["rounds_averaged"] == 3
    for module_id in ("stem", "L0.M0"):
        for x, y in zip(a.node.slots[module_id].outer.global_params, b.node.slots[module_id].outer.global_params):
            assert (x - y).abs().max().item() < 1e-4
        for name, value in a.node.session.local_state(module_id).items():
            assert torch.equal(value, a.node.slots[module_id].outer.global_state()[name])


def test_a_peer_on_a_fast_link_reduces_more_of_a_module_and_the_average_is_unchanged(swarm):
    # Prepare: three holders of one path's modules; a says its upload is 100 Mbit/s, b and c 10
    config = swarm_config("links", levels=(1,), compression="none")
    a = swarm.open(config, "0", upload_mbps=100.0)
    b = swarm.open(config, "0", initial_peers=a.maddrs, upload_mbps=10.0)
    c = swarm.open(config, "0", initial_peers=a.maddrs, upload_mbps=10.0)
    nodes = [a.node, b.node, c.node]
    for node in nodes:
        node.session.inner_steps(3)

    # Execute: one outer step together
    reports = in_parallel(*[lambda n=n: n.outer_step(1, tokens=100) for n in nodes])

    # Assert: all three averaged; a reduced about twice an equal share (the cap, to a part's
    # granularity), b and c the rest, and all agree exactly. A member with share f receives
    # 2·f of the module from the two other senders and the reduced 1 − f back: 1 + f modules
    module = "L0.M0"
    payload = 4 * sum(p.numel() for p in a.node.slots[module].outer.global_params)
    shares = [r[module].bytes_received / payload - 1 for r in reports]
    assert all(len(r[module].group) == 3 for r in reports)
    assert sum(r[module].bytes_received for r in reports) == 4 * payload  # Σ(1 + f) over three members
    assert 0.6 < shares[0] < 2 / 3 + 1 / 16 and min(shares[1:]) > 0
    # every member declared its link, and these need far less than the floor for a part: the
    # group's chunk timeout is the floor, not the configured averaging_timeout / 6 (5 s)
    assert all(r[module].chunk_timeout == CHUNK_TIMEOUT_FLOOR_S for r in reports)
    for other in (b.node, c.node):
        for x, y in zip(a.node.slots[module].outer.global_params, other.slots[module].outer.global_params):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_with_fragments_a_round_averages_one_slice_and_the_rest_keeps_its_local_progress(swarm):
    # Prepare: as the closed-form test, but the shared module is cut into 4 fragments, and
    # round 5 averages fragment 5 mod 4 = 1
    config = swarm_config("fragments", levels=(1, 2), stem="per_path", compression="none")
    config.averaging.fragments = 4
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    shared = "L0.M0"
    slot = a.node.slots[shared]
    start, end = slot.fragment(5)
    assert 0 < start < end < slot.numel and slot.buffer_numel == end - start

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    global_before = flat(slot.outer.global_params).clone()
    a.node.session.inner_steps(3)
    b.node.session.inner_steps(3)
    names = slot.outer.names
    local_a = flat([a.node.session.local_state(shared)[n] for n in names]).clone()
    local_b = flat([b.node.session.local_state(shared)[n] for n in names]).clone()

    # Execute
    reports = in_parallel(lambda: a.node.outer_step(5, tokens=100), lambda: b.node.outer_step(5, tokens=300))

    # Assert: inside the fragment, the closed form of one Nesterov step on the weighted mean ...
    mean = (100 * (global_before - local_a) + 300 * (global_before - local_b)) / 400
    expected = global_before - 0.7 * 1.9 * mean
    for node in (a.node, b.node):
        got = flat(node.slots[shared].outer.global_params)
        torch.testing.assert_close(got[start:end], expected[start:end], rtol=0, atol=1e-6)
        # ... outside it the global state and momentum did not move
        assert torch.equal(got[:start], global_before[:start]) and torch.equal(got[end:], global_before[end:])
        momentum = flat(node.slots[shared].outer.momentum)
        assert not momentum[:start].any() and not momentum[end:].any()
    # training goes on from the new globals inside the fragment, from its own progress outside
    after = flat([a.node.session.local_state(shared)[n] for n in names])
    assert torch.equal(after[start:end], flat(slot.outer.global_params)[start:end])
    assert torch.equal(after[:start], local_a[:start]) and torch.equal(after[end:], local_a[end:])
    # the all-reduce moved a quarter of the module: each peer sends one copy of the fragment
    got_a = reports[0][shared]
    assert sorted(got_a.group) == sorted([a.node.peer_id, b.node.peer_id])
    assert got_a.bytes_sent == 4 * slot.buffer_numel


def open_fragment_pair(swarm, run_id: str, overlap: bool):
    """Two peers on a [1, 2] grid (they share the stem and L0.M0) averaging 4 fragments, fp16;
    (a, b, each module's starting globals laid end to end)."""
    config = swarm_config(run_id, levels=(1, 2), overlap=overlap)
    config.averaging.fragments = 4
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    start = {m: torch.cat([p.reshape(-1) for p in s.outer.global_params]).clone() for m, s in a.node.slots.items()}
    return a, b, start


def assert_agree_and_every_fragment_moved(a, b, start: dict) -> None:
    for module_id in ("stem", "L0.M0"):
        assert copies_agree([a, b], module_id), f"{module_id} differs between peers"
        x = torch.cat([p.reshape(-1) for p in a.slots[module_id].outer.global_params])
        for round_ in range(4):
            lo, hi = a.slots[module_id].fragment(round_)
            assert (x[lo:hi] - start[module_id][lo:hi]).abs().max().item() > 0, f"{module_id} {lo}:{hi} never moved"


def test_peers_averaging_fragments_in_turn_agree_and_every_value_moves_within_one_cycle(swarm):
    # Prepare: 4 fragments, fp16; the two peers share the stem and L0.M0
    a, b, start = open_fragment_pair(swarm, "fragment-cycle", overlap=False)

    # Execute: 4 rounds, one per fragment
    in_parallel(lambda: a.node.run(max_rounds=4), lambda: b.node.run(max_rounds=4))

    # Assert: every round averaged with the other peer, no state had to be downloaded, the
    # peers hold the same globals (fp16 wire error only) and every fragment has moved
    for node in (a.node, b.node):
        assert all(len(r.modules[m].group) == 2 for r in node.history for m in ("stem", "L0.M0"))
        assert not node.state_downloads
    assert_agree_and_every_fragment_moved(a.node, b.node, start)
    sent = [r.modules["L0.M0"].bytes_sent for r in a.node.history]
    assert all(0 < s <= 2 * 2 * a.node.slots["L0.M0"].buffer_numel for s in sent)  # fp16: 2 B a value, both ways


def test_overlapped_fragments_land_one_round_late_and_peers_agree_with_every_value_moved(swarm):
    # Prepare: 4 fragments with overlap (each slice's average lands while the next round
    # trains, Streaming DiLoCo's overlapped fragments); the two peers share the stem and L0.M0
    a, b, start = open_fragment_pair(swarm, "overlap-fragments", overlap=True)

    # Execute: 5 rounds (the last one's average lands when run() stops)
    in_parallel(lambda: a.node.run(max_rounds=5), lambda: b.node.run(max_rounds=5))

    # Assert: every averaging (4 landed with the rounds, the last at the stop) was with the
    # other peer and needed no download; the copies agree, every slice moved, and each
    # peer's model is its globals again (run() lands the last average and adopts it)
    for node in (a.node, b.node):
        averagings = node.averagings()
        assert len(averagings) == 5
        assert all(len(modules[m].group) == 2 and modules[m].outcome == "ok"
                   for modules in averagings for m in ("stem", "L0.M0")), \
            [{m: (len(r.group), r.outcome) for m, r in modules.items()} for modules in averagings]
        assert not node.state_downloads
        for module_id in ("stem", "L0.M0"):
            local = node.session.local_state(module_id)
            for name, g in zip(node.slots[module_id].outer.names, node.slots[module_id].outer.global_params):
                torch.testing.assert_close(local[name].detach().float().cpu(), g, rtol=0, atol=0)
    assert_agree_and_every_fragment_moved(a.node, b.node, start)


SHARED = "L0.M0"  # the module the four holders of a [1, 4] grid with private stems share


class StagedHolders:
    """Holders of L0.M0 in groups too small for all of them, so that they average in two
    stages, each after 2 inner steps, about to send the given tokens' worth (a round's cap is 384)."""

    def __init__(self, nodes, tokens: list[int]):
        self.nodes, self.tokens = nodes, tokens
        self.start = [p.clone() for p in nodes[0].slots[SHARED].outer.global_params]
        for node in nodes:
            node.session.inner_steps(2)
        self.locals = [[p.clone() for p in node.session.local_state(SHARED).values()] for node in nodes]

    def assert_exact_mean(self) -> None:
        """Every holder ends with one Nesterov step on the token-weighted mean of all of them."""
        for index, (g, *ls) in enumerate(zip(self.start, *self.locals)):
            mean = sum(t * (g - l) for t, l in zip(self.tokens, ls)) / sum(self.tokens)
            expected = g - 0.7 * 1.9 * mean
            for node in self.nodes:
                torch.testing.assert_close(node.slots[SHARED].outer.global_params[index], expected, rtol=0, atol=1e-6)


def four_staged_holders(swarm, config) -> StagedHolders:
    """Four holders in groups of at most 2, about to send 100 / 150 / 250 / 350 tokens' worth."""
    config.averaging.target_group_size = 2
    return StagedHolders(swarm.open_all(config, ["0,0", "0,1", "0,2", "0,3"]), [100, 150, 250, 350])


def test_more_holders_than_one_group_holds_average_in_two_stages_to_the_exact_mean(swarm):
    # Prepare: 4 holders of L0.M0 (grid [1, 4], private stems) but groups of at most 2:
    # stage 1 pairs them, stage 2 pairs the members at the same index of the two pairs
    held = four_staged_holders(swarm, swarm_config("staged", levels=(1, 4), stem="per_path", compression="none"))
    nodes, shared = held.nodes, SHARED

    # Execute
    reports = in_parallel(*[lambda n=n, t=t: n.outer_step(1, tokens=t) for n, t in zip(nodes, held.tokens)])

    # Assert: each holder ends with one Nesterov step on the token-weighted mean of all four
    held.assert_exact_mean()
    for report in reports:
        module = report[shared]
        assert module.stage_groups == [2, 2] and module.outcome == "ok"
        assert len(module.group) == 3  # its pair in stage 1 and one member of the other pair in stage 2


def test_eight_holders_in_groups_of_four_fill_every_column_and_reach_the_exact_mean(swarm):
    # Prepare: 8 holders of L0.M0 (grid [1, 8], private stems) in groups of at most 4: two
    # stage-1 groups of 4, then 4 pairs across them (groups of 3, 3 and 2 would leave the
    # short group's column with another mean, to be re-synced after every round)
    config = swarm_config("staged-eight", levels=(1, 8), stem="per_path", compression="none")
    config.averaging.target_group_size = 4
    held = StagedHolders(swarm.open_all(config, [f"0,{i}" for i in range(8)]),
                         [100, 150, 250, 350, 120, 180, 300, 200])

    # Execute
    reports = in_parallel(*[lambda n=n, t=t: n.outer_step(1, tokens=t) for n, t in zip(held.nodes, held.tokens)])

    # Assert: each holder ends with one Nesterov step on the token-weighted mean of all eight
    held.assert_exact_mean()
    assert [(r[SHARED].stage_groups, r[SHARED].outcome) for r in reports] == [([4, 2], "ok")] * 8


@pytest.mark.parametrize("stage_wait, overlap, meets", [(0.2, True, True), (0.0, True, False), (0.2, False, False)])
def test_a_second_stage_waits_for_holders_whose_first_stage_ended_late(swarm, stage_wait, overlap, meets):
    # Prepare: 4 holders of L0.M0 in groups of at most 2 (two stages) in rounds of 200 s; the
    # second pair starts its outer step 24 s after the first, as a pair on a slow link, or
    # one held up by a member that vanished, ends its first stage late. With overlap a
    # second stage waits a fifth of a round (40 s); with stage_wait 0, or plain averaging
    # (where the wait would stall training), it searches 3 matchmaking windows (12 s)
    config = swarm_config("stage-wait", levels=(1, 4), stem="per_path", compression="none", round_seconds=200.0,
                          overlap=overlap)
    config.averaging.stage_wait = stage_wait
    held = four_staged_holders(swarm, config)
    nodes, shared = held.nodes, SHARED
    round_ = nodes[0].schedule.current_round()

    def step(node, t, delay):
        time.sleep(delay)
        return node.outer_step(round_, tokens=t)

    # Execute
    reports = in_parallel(*[lambda n=n, t=t, d=d: step(n, t, d)
                            for n, t, d in zip(nodes, held.tokens, [0.0, 0.0, 24.0, 24.0])])

    # Assert: waiting, the late pair still meets the early one in the second stage and every
    # holder ends with one Nesterov step on the token-weighted mean of all four; searching
    # 3 windows, the early pair's second stage ends before the late pair arrives, each pair
    # keeps its own mean, and the copies stay apart until the post-round vote re-syncs them
    stage_groups = [report[shared].stage_groups for report in reports]
    finals = [torch.cat([p.reshape(-1) for p in n.slots[shared].outer.global_params]) for n in nodes]
    if meets:
        assert stage_groups == [[2, 2]] * 4
        held.assert_exact_mean()
    else:
        assert stage_groups == [[2, 1]] * 4
        assert (finals[0] - finals[1]).abs().max().item() < 1e-6
        assert (finals[2] - finals[3]).abs().max().item() < 1e-6
        assert (finals[0] - finals[2]).abs().max().item() > 1e-4


def test_staged_rounds_keep_every_holder_in_agreement_without_downloads(swarm):
    # Prepare: as above, 4 holders of L0.M0 in groups of at most 2, now over whole rounds
    # (fp16 wire, the post-round fingerprint vote decides whether anyone must re-sync)
    config = swarm_config("staged-rounds", levels=(1, 4), stem="per_path")
    config.averaging.target_group_size = 2
    nodes = swarm.open_all(config, ["0,0", "0,1", "0,2", "0,3"])
    shared = "L0.M0"
    start = torch.cat([p.reshape(-1) for p in nodes[0].slots[shared].outer.global_params]).clone()

    # Execute
    in_parallel(*[lambda n=n: n.run(max_rounds=3) for n in nodes])

    # Assert: every round averaged in two stages of two, and no holder had to download the
    # majority's state: the exact mean left them all equal (up to fp16 wire error)
    for node in nodes:
        assert [r.modules[shared].stage_groups for r in node.history] == [[2, 2]] * 3
        assert all(r.modules[shared].outcome == "ok" for r in node.history)
        assert not node.state_downloads
    flats = [torch.cat([p.reshape(-1) for p in n.slots[shared].outer.global_params]) for n in nodes]
    assert (flats[0] - start).abs().max().item() > 0
    assert copies_agree(nodes, shared)
