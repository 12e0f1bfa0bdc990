"""What the fault-injection suite tried and how it ended, summed over one pytest session and
printed by conftest.py's terminal summary (also written to bench-out/faults.json, from
which README's reliability table is made)."""

from __future__ import annotations

from collections import Counter

REPORT_PROPERTY = "p2ptrain_fault_tally"  # a pytest-xdist worker's tally, in a report's user_properties

faults: dict[str, str] = {}  # fault → "survived" | "FAILED"
data_lost: Counter = Counter()  # fault → honest peers that lost their agreed state or checkpoints

# Hostile inputs fed to a parser or loader, by kind, each with one outcome:
#   rejected    refused cleanly (the parser's own error, or None with a reason)
#   accepted    a valid message came out, and the test checked it is one (in bounds, round-trips)
#   mishandled  anything else: an unexpected exception, or something let through that is not valid
# A fuzzed input that happens to be valid is not a bad input: "bad inputs rejected" counts
# rejected / (rejected + mishandled), and the accepted ones are reported next to it.
OUTCOMES = ("rejected", "accepted", "mishandled")
hostile_inputs: dict[str, Counter] = {}  # kind → Counter over OUTCOMES


def hostile_input(kind: str, outcome: str) -> None:
    """Record one hostile input of `kind` and how the code under test handled it."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    hostile_inputs.setdefault(kind, Counter())[outcome] += 1


def hostile_totals() -> Counter:
    total: Counter = Counter()
    for counts in hostile_inputs.values():
        total.update(counts)
    return total


def lost(fault: str, peers: int) -> None:
    """Record how many honest peers lost state in a fault (measured by the test, 0 or more)."""
    data_lost[fault] += peers


def drain() -> dict:
    """Everything tallied in this process so far, as plain data, and the tally emptied: a
    pytest-xdist worker sends it with each test's report to the process that prints."""
    taken = {"faults": dict(faults), "data_lost": dict(data_lost),
             "hostile_inputs": {kind: dict(counts) for kind, counts in hostile_inputs.items()}}
    faults.clear()
    data_lost.clear()
    hostile_inputs.clear()
    return taken


def merge(taken: dict) -> None:
    """Add what a worker drained (see `drain`) to this process's tally."""
    faults.update(taken["faults"])
    data_lost.update(taken["data_lost"])
    for kind, counts in taken["hostile_inputs"].items():
        hostile_inputs.setdefault(kind, Counter()).update(counts)
