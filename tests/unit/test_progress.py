"""Progress lines for long operations: throttled, readable, honest about what they know."""

from __future__ import annotations

from p2ptrain.swarm.progress import StepProgress, TransferProgress, human_bytes


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_download_shows_bytes_rate_and_eta_every_two_seconds_and_a_closing_line():
    clock, lines = FakeClock(), []
    progress = TransferProgress("module L0.M1 from …abcd1234", expected=40_000_000, clock=clock, emit=lines.append)

    clock.now += 1.0
    assert progress.update(5_000_000) is None  # not yet: under a second's worth of news
    clock.now += 1.0
    progress.update(10_000_000)
    clock.now += 0.5
    progress.update(12_000_000)  # throttled
    clock.now += 2.0
    progress.update(20_000_000)
    clock.now += 1.0
    progress.finish(40_000_000)

    assert lines == [
        "module L0.M1 from …abcd1234: 10.0 MB of 40.0 MB (25%), 5.0 MB/s, ETA 6 s",
        "module L0.M1 from …abcd1234: 20.0 MB of 40.0 MB (50%), 4.4 MB/s, ETA 4 s",
        "module L0.M1 from …abcd1234: 40.0 MB in 5.5 s",
    ]


def test_a_quick_download_says_nothing():
    clock, lines = FakeClock(), []
    progress = TransferProgress("module stem from …x", expected=1000, clock=clock, emit=lines.append)
    clock.now += 0.1
    progress.update(1000)
    assert progress.finish(1000) is None and lines == []


def test_inner_step_progress_counts_steps_within_the_round():
    clock, lines = FakeClock(), []
    progress = StepProgress(steps_per_round=500, first_step=1000, every_s=30, clock=clock, emit=lines.append)
    clock.now += 10
    progress.update(7, 1040, 3.5, 1234.0)
    clock.now += 25
    progress.update(7, 1120, 3.25, 1500.0)
    progress.new_round(1400)
    clock.now += 31
    progress.update(8, 1450, 3.0, 1600.4)
    assert lines == ["round 7: inner step 120 of at most 500, loss 3.250, 1,500 tok/s",
                     "round 8: inner step 50 of at most 500, loss 3.000, 1,600 tok/s"]


def test_time_based_rounds_have_no_step_cap_to_show():
    clock, lines = FakeClock(), []
    progress = StepProgress(steps_per_round=None, first_step=0, every_s=30, clock=clock, emit=lines.append)
    clock.now += 31
    progress.update(3, 620, 2.5, 900.0)
    assert lines == ["round 3: inner step 620, loss 2.500, 900 tok/s"]


def test_byte_counts_read_in_decimal_units():
    assert [human_bytes(n) for n in (512, 1_500, 2_000_000, 3_200_000_000)] == ["512 B", "1.5 kB", "2.0 MB",
                                                                             "3.2 GB"]
