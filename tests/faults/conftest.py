"""The fault-injection suite (issue 14): real loopback peers, hostile inputs and crashes.

Every test that takes the `fault` fixture is one fault tried; it survived when the test
passed (its asserts are the survival criteria: honest peers keep training, agree, and
lose nothing). At the end of the session a summary line is printed:

    faults survived: N / N tried; bad inputs rejected: N / N (and N valid inputs accepted); data lost: 0

with a per-fault table, also written to bench-out/faults.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import tally
from tests.swarm.conftest import corpus, swarm  # noqa: F401  (real loopback swarms, as in tests/swarm)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fault(request):
    """Marks a test as one fault of the suite; its name is the test's id."""
    return request.node.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "fault" not in getattr(item, "fixturenames", ()):
        return
    if report.when == "call" or (report.when == "setup" and report.failed):
        tally.faults[item.name] = "survived" if report.passed else "FAILED"


def summary_line() -> str:
    survived = sum(v == "survived" for v in tally.faults.values())
    inputs = tally.hostile_totals()
    bad = inputs["rejected"] + inputs["mishandled"]
    return (f"faults survived: {survived} / {len(tally.faults)} tried; bad inputs rejected: "
            f"{inputs['rejected']} / {bad} (and {inputs['accepted']} valid inputs accepted); "
            f"data lost: {sum(tally.data_lost.values())}")


def pytest_terminal_summary(terminalreporter):
    if not tally.faults and not tally.hostile_inputs:
        return
    tr = terminalreporter
    tr.section("fault-injection suite")
    tr.write_line("| fault | outcome | honest peers that lost state |")
    tr.write_line("|---|---|---|")
    for name, outcome in sorted(tally.faults.items()):
        tr.write_line(f"| {name} | {outcome} | {tally.data_lost.get(name, 0)} |")
    tr.write_line("")
    tr.write_line("| hostile input | tried | bad, rejected cleanly | valid, accepted | mishandled |")
    tr.write_line("|---|---|---|---|---|")
    for kind, counts in sorted(tally.hostile_inputs.items()):
        tr.write_line(f"| {kind} | {sum(counts.values())} | {counts['rejected']} | {counts['accepted']} | "
                      f"{counts['mishandled']} |")
    tr.write_line("")
    tr.write_line(summary_line())
    try:
        out = REPO / "bench-out"
        out.mkdir(exist_ok=True)
        (out / "faults.json").write_text(json.dumps({
            "faults": tally.faults, "data_lost": dict(tally.data_lost),
            "hostile_inputs": {kind: dict(counts) for kind, counts in tally.hostile_inputs.items()},
            "summary": summary_line()}, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass
