"""Suite-wide guard: no test may leave processes behind (DHT nodes, averagers, p2pd).

A leaked p2pd keeps ports and CPU busy and makes later swarm tests flaky, so leftovers
are killed and the test that leaked them fails. Also the fault-injection suite's summary
(tests/faults/), printed at the end of the session.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
from pathlib import Path

import psutil
import pytest

from tests.faults import tally

# hivemind's DHT and averagers are forked processes (spawn can't pickle them)
mp.set_start_method("fork", force=True)


# started once by torch for shared-memory tensors and kept for the life of the process
PROCESS_WIDE_HELPERS = {"torch_shm_manager"}


@pytest.fixture(autouse=True)
def no_leaked_processes():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leaked = []
    for _ in range(50):  # shutdown is asynchronous: give children a few seconds to exit
        leaked = [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                  and p.name() not in PROCESS_WIDE_HELPERS]
        if not leaked:
            return
        psutil.wait_procs(leaked, timeout=0.1)
    names = sorted({p.name() for p in leaked})
    for p in leaked:
        p.kill()
    pytest.fail(f"test left {len(leaked)} child processes running: {names}")


@pytest.fixture(autouse=True)
def alone_under_xdist(request, tmp_path_factory):
    """A test marked `alone` runs with no other test beside it when pytest-xdist runs the
    suite on several workers (`make test`): the faults that kill or break a peer mid-round
    are timed against the round, and a neighbour's load can push a survivor past it (seen
    once in a two-worker run: a survivor skipped rounds). A readers-writer lock on two files
    the workers share: every test holds the gate shared while it runs; an `alone` test
    closes the turnstile first, so no other test starts, then takes the gate exclusively
    once the running ones have ended."""
    if not hasattr(request.config, "workerinput"):  # one process: every test runs alone
        yield
        return
    root = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    alone = request.node.get_closest_marker("alone") is not None
    with open(root / "p2ptrain-turnstile.lock", "a") as turnstile, open(root / "p2ptrain-gate.lock", "a") as gate:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # the files' locks go when they close


# ------------------------------------------------------------------ the fault-injection tally
# here, not in tests/faults/conftest.py: under pytest-xdist only the printing process loads
# this file, and the workers' tallies reach it with their reports

REPO = Path(__file__).resolve().parents[1]


def pytest_runtest_logreport(report):
    for key, value in getattr(report, "user_properties", ()):
        if key == tally.REPORT_PROPERTY:
            tally.merge(value)


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
