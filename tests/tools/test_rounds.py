"""Interleaved rounds and the spread rule that decides whether a row is faster."""

from __future__ import annotations

import pytest

from mocov3.tools import rounds
from mocov3.tools.rounds import Spread, Timings, run_rounds, verdict


def test_spread_is_the_median_and_range() -> None:
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(2.5, 1.0, 10.0)
    assert Spread.of([4.0]) == Spread(4.0, 4.0, 4.0)
    with pytest.raises(ValueError, match="at least one"):
        Spread.of([])


def test_a_row_is_faster_only_when_the_spreads_do_not_overlap() -> None:
    assert verdict(Spread(12, 11, 13), Spread(10, 9, 10.9)) == "faster"
    assert verdict(Spread(10, 9, 10.9), Spread(12, 11, 13)) == "slower"
    # a median 20% higher is still noise when one step of the other row reached it
    assert verdict(Spread(12, 11, 13), Spread(10, 9, 11.5)) == "within noise"
    assert verdict(Spread(10, 10, 10), Spread(10, 10, 10)) == "within noise"
    # fewer than 5 steps a row decide nothing
    assert verdict(Spread(12, 11, 13), Spread(10, 9, 10.9), steps=4) == "too few steps"


def test_rates_are_images_per_second_of_each_step() -> None:
    timing = Timings([0.1, 0.1, 0.1], [2.0, 4.0, 1.0])
    assert timing.rates(batch=8) == Spread(4.0, 2.0, 8.0)


def _recording(name: str, seconds: float, calls: list[tuple[str, int]]):
    def step(number: int) -> tuple[float, float]:
        calls.append((name, number))
        return seconds / 10, seconds

    return step


def test_rows_run_interleaved_one_step_each_per_round() -> None:
    calls: list[tuple[str, int]] = []
    steps = [_recording(name, 1.0, calls) for name in "ABC"]
    timings = run_rounds(steps, first_step=2, rounds=2, seconds=100.0)
    assert calls == [("A", 2), ("B", 2), ("C", 2), ("A", 3), ("B", 3), ("C", 3)]
    assert [t.step_seconds for t in timings] == [[1.0, 1.0]] * 3
    assert [t.input_seconds for t in timings] == [[0.1, 0.1]] * 3


def test_without_a_step_count_rounds_share_seconds_per_row_of_wall_time() -> None:
    """At least 5 rounds; more while the rounds have taken under ``seconds`` x rows (a fake
    clock that the steps advance)."""
    now = [0.0]

    def step(seconds: float):
        def run(number: int) -> tuple[float, float]:
            now[0] += seconds
            return seconds / 10, seconds

        return run

    def counts(*seconds: float) -> list[int]:
        steps = [step(value) for value in seconds]
        timings = run_rounds(steps, 0, rounds=None, seconds=3.0, clock=lambda: now[0])
        return [len(t.step_seconds) for t in timings]

    assert counts(0.1, 0.2) == [20, 20]  # 6 s of budget, 0.3 s a round
    # a slow row (10 s a step) gets the minimum, and the fast one no more rounds than it
    assert counts(0.1, 10.0) == [rounds.MIN_ROUNDS] * 2 == [5, 5]
