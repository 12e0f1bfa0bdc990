"""What the fault-injection suite tried and how it ended, summed over one pytest session and
printed by conftest.py's terminal summary (also written to bench-out/faults.json, from
which README's reliability table is made)."""

from __future__ import annotations

from collections import Counter

faults: dict[str, str] = {}  # fault → "survived" | "FAILED"
bad_inputs: Counter = Counter()  # "tried" / "rejected": hostile inputs fed to a parser or loader
bad_inputs_by_kind: dict[str, list[int]] = {}  # kind → [tried, rejected]
data_lost: Counter = Counter()  # fault → honest peers that lost their agreed state or checkpoints


def bad_input(kind: str, rejected: bool) -> None:
    """Record one hostile input and whether it was cleanly rejected (True) or let through."""
    bad_inputs["tried"] += 1
    bad_inputs["rejected"] += int(rejected)
    entry = bad_inputs_by_kind.setdefault(kind, [0, 0])
    entry[0] += 1
    entry[1] += int(rejected)


def lost(fault: str, peers: int) -> None:
    """Record how many honest peers lost state in a fault (measured by the test, 0 or more)."""
    data_lost[fault] += peers
