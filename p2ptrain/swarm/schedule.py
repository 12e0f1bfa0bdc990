"""The swarm's round schedule: round r ends at epoch + r × round_seconds on DHT time.

Why a wall-clock schedule. With step-counted rounds, two peers of equal speed whose
rounds start more than a matchmaking window apart stay apart forever and never average
(measured: a peer joining half a round late averaged alone in 5 of 5 rounds). On a shared
clock every node ends its inner steps at the same moments whatever its speed or start
time, so the holders of a module look for each other together; weights count tokens, so
a fast peer still counts more. hivemind already requires clocks within 3 s of each other
(its DHT rejects peers beyond that), which is well inside a matchmaking window.

Round numbers are therefore global: every node means the same thing by "round 17", a
joiner enters the round in progress, and a claim of a round that has not begun yet is
provably false — the trust checks use that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def dht_time() -> float:
    from hivemind.utils.timed_storage import get_dht_time
    return get_dht_time()


@dataclass(frozen=True)
class RoundSchedule:
    epoch: float  # DHT time the run was created: round 1 ends at epoch + round_seconds
    round_seconds: float
    clock: Callable[[], float] = dht_time

    def round_at(self, t: float) -> int:
        """The round in progress at time t (round r spans (end(r-1), end(r)])."""
        return max(1, math.ceil((t - self.epoch) / self.round_seconds))

    def current_round(self) -> int:
        return self.round_at(self.clock())

    def end_of(self, round_: int) -> float:
        return self.epoch + round_ * self.round_seconds

    def seconds_left(self, round_: int) -> float:
        return self.end_of(round_) - self.clock()

    def next_round_to_enter(self, min_seconds: float) -> int:
        """The first round that still has at least min_seconds of inner time left."""
        now = self.clock()
        r = self.round_at(now)
        while self.end_of(r) - now < min_seconds:
            r += 1
        return r

    def max_plausible_round(self, slack_rounds: int = 1) -> int:
        """No honest peer can have finished a round later than the one in progress (plus
        slack for clock skew): anything beyond is a false claim."""
        return self.current_round() + slack_rounds

    def sleep_until(self, t: float, stop) -> bool:
        """Wait until DHT time t or until `stop` (an Event) is set; True if t was reached."""
        while not stop.is_set():
            left = t - self.clock()
            if left <= 0:
                return True
            stop.wait(min(left, 0.5))
        return False


SEARCH_WINDOWS = 3.0  # a module looks for its holders for up to this many matchmaking windows
SEARCH_FLOOR = 1.1  # ... and, bounded, never less than this many (hivemind refuses a search shorter than one)


def leader_answer_seconds(window: float) -> float:
    """How long a follower waits for its leader's answer (hivemind's request_timeout), also
    past the end of its search when a leader has accepted it (hivemind_patches.py)."""
    return min(3.0, window / 2)


def search_seconds(window: float, room: float | None) -> float:
    """How long a module may look for its holders after its round's end.

    Normally 3 windows: a slow peer delays fast ones by at most that, and a search whose
    first group fails (a dead leader, a peer that is not admitted) has time to retry.
    Bounded (room given: the seconds until the next round's end, less what the node needs
    after the search to still enter that round), a search ends in time for that round, even
    when a leader that accepted it answers late (leader_answer_seconds).
    Unbounded, a lone search in rounds shorter than 3 windows makes the node skip the next
    round, and two holders that skip alternate rounds search for different round numbers,
    alone, for the rest of the run.
    """
    full = SEARCH_WINDOWS * window
    if room is None:
        return full
    return max(SEARCH_FLOOR * window, min(full, room - leader_answer_seconds(window)))


def stage_wait_seconds(window: float, round_seconds: float, fraction: float, room: float | None) -> float:
    """How long a staged module's second stage waits for the holders at its index that are
    still busy with their first stage (hivemind's scheduled start: a leader assembles when
    its group is full, else at this wait's end): `fraction` of the round, at least one
    matchmaking window.

    Why wait longer than a window. First-stage groups end apart: each moves the module over
    its slowest member's link, and a member that vanishes mid all-reduce holds its group up
    by the reducer timeout. With one window a second-stage group starts without the late
    groups' members, who average alone and re-sync, their tokens lost (the simulator, gpu
    preset at 10,000 peers: 15 % of the tokens; 4 % waiting a fifth of the round). A full
    group never waits. Bounded by `room` (the seconds the round's outer phase may still
    take, None: unbounded), the search still ends in time for the next round."""
    wait = max(window, fraction * round_seconds)
    if room is None:
        return wait
    return max(window, min(wait, room - leader_answer_seconds(window) - window))
