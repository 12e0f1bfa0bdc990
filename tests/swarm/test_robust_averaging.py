"""Byzantine-robust averaging across real loopback peers: each reducer aggregates the parts
of its slice with the run's rule (CenteredClip, trimmed mean) instead of hivemind's
weighted mean, on the wire format hivemind already uses."""

from __future__ import annotations

import pytest
import torch

from p2ptrain.swarm.aggregation import aggregate, weighted_mean
from p2ptrain.swarm.averaging import averaging_part_bytes, make_compression
from tests.swarm.conftest import in_parallel, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

MODULE = "L0.M0"


def hivemind_parts(flat: torch.Tensor, compression: str) -> list[torch.Tensor]:
    """The parts hivemind cuts a module's flat buffer into (the units a reducer aggregates)."""
    from hivemind.averaging.partition import TensorPartContainer
    container = TensorPartContainer([flat], (1.0,), compression=make_compression(compression),
                                    part_size_bytes=averaging_part_bytes(flat.numel(), compression))
    return list(container.get_raw_input_parts(0))


@pytest.mark.parametrize("rule", ["centered_clip", "trimmed_mean"])
def test_three_peers_reduce_each_part_with_the_robust_rule_to_the_closed_form(swarm, rule):
    # Prepare: three holders of one path; the third peer's pseudo-gradient is blown up ×6 (an
    # outlier the rule clips, not one so far out that centered_clip drops it)
    config = swarm_config(f"robust-{rule}", levels=(1,), compression="none")
    config.averaging.aggregation = rule
    a = swarm.open(config, "0")
    b = swarm.open(config, "0", initial_peers=a.maddrs)
    c = swarm.open(config, "0", initial_peers=a.maddrs)
    nodes = [a.node, b.node, c.node]
    start = [p.clone() for p in a.node.slots[MODULE].outer.global_params]
    for node in nodes:
        node.publish_status()
        node.session.inner_steps(3)
    with torch.no_grad():
        for g, p in zip(start, c.node.session.local_state(MODULE).values()):
            p.copy_(g - 6 * (g - p))
    deltas = [torch.cat([(g - p).reshape(-1) for g, p in zip(start, node.session.local_state(MODULE).values())])
              for node in nodes]
    tokens = [300, 200, 100]  # the outlier holds the least weight: a minority

    # Execute: one outer step
    reports = in_parallel(*[lambda n=n, w=w: n.outer_step(1, tokens=w) for n, w in zip(nodes, tokens)])

    # Assert: every part is the rule's aggregate of the three peers' parts, then θ − 0.7·1.9·Δ̄
    assert all(sorted(r[MODULE].group) == sorted(n.peer_id for n in nodes) for r in reports)
    per_peer = [hivemind_parts(d, "none") for d in deltas]
    expected_mean = torch.cat([aggregate(rule, list(parts), tokens) for parts in zip(*per_peer)])
    plain_mean = torch.cat([weighted_mean(list(parts), tokens) for parts in zip(*per_peer)])
    # the rule matters here: its result differs from the weighted mean the outlier drags
    assert (expected_mean - plain_mean).norm() > 0.02 * plain_mean.norm()
    expected = [g - 0.7 * 1.9 * d.view_as(g) for g, d in zip(start, expected_mean.split([p.numel() for p in start]))]
    for node in nodes:
        for want, got in zip(expected, node.slots[MODULE].outer.global_params):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # no reducer lied and nobody was banned: an outlier this close is bounded, not refused
    assert not any(r[MODULE].lying_reducers for r in reports)
    assert not any(n.bans_issued for n in nodes)
