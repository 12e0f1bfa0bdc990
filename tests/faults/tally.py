"""What the fault-injection suite tried and how it ended, summed over one pytest session and
printed by conftest.py's terminal summary (also written to bench-out/faults.json, from
which README's reliability table is made)."""

from __future__ import annotations

from collections import Counter

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
