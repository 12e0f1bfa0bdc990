"""What the simulator's validation reads off a real loopback swarm's round events: group
sizes per module kind and the share of module-rounds that re-synced, from rounds 2 on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import loopback_runs  # noqa: E402
import simulate  # noqa: E402

from p2ptrain.config import RunConfig  # noqa: E402


def event(round_: int, stem: int, level: int, resynced: list[str], tokens: int = 20_480) -> dict:
    return {"round": round_, "seconds_inner": 8.0, "seconds_wall": 10.0, "seconds_outer": 1.0, "tokens": tokens,
            "peers_per_module": {"stem": stem, "L0.M0": level, "L1.M0": level}, "resynced": resynced}


def two_peers() -> dict:
    """Two peers, three rounds each; round 1 (start-up) is what a summary must leave out."""
    return {"bytes": 6_000_000, "rounds": {
        "a": [event(1, 1, 1, ["stem", "L0.M0", "L1.M0"]), event(2, 4, 2, []), event(3, 2, 2, ["L1.M0"])],
        "b": [event(1, 1, 1, ["stem"]), event(2, 4, 1, []), event(3, 4, 2, [])]}}


def test_group_outcomes_average_stem_and_level_groups_apart_and_count_re_syncs_per_module_round():
    per_peer = [events[1:] for events in two_peers()["rounds"].values()]
    outcomes = loopback_runs.group_outcomes(per_peer)
    assert outcomes["mean_group"] == {"stem": pytest.approx(3.5), "level": pytest.approx(1.75)}
    assert outcomes["resync_fraction"] == pytest.approx(1 / 12)


def test_no_rounds_give_empty_groups_and_no_re_syncs_rather_than_an_error():
    assert loopback_runs.group_outcomes([[]]) == {"mean_group": {"stem": 0.0, "level": 0.0}, "resync_fraction": 0.0}


@pytest.mark.parametrize("summarize", [loopback_runs.summarize, simulate.summarize_loopback])
def test_both_validation_summaries_leave_out_the_start_up_round(summarize):
    config = RunConfig.load()
    config.inner.total_rounds = 3
    summary = summarize(two_peers(), config, 2)
    assert summary["mean_group"] == {"stem": pytest.approx(3.5), "level": pytest.approx(1.75)}
    assert summary["resync_fraction"] == pytest.approx(1 / 12)
    assert summary["completed_peers"] == 2
    assert summary["utilization"] == pytest.approx(0.8)
