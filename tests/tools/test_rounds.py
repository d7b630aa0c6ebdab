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


def test_without_a_step_count_rounds_run_until_every_row_has_its_seconds() -> None:
    calls: list[tuple[str, int]] = []
    # A takes 1 s a step, B 0.25 s: B needs 12 rounds to reach 3 s; A would stop at 5
    steps = [_recording("A", 1.0, calls), _recording("B", 0.25, calls)]
    timings = run_rounds(steps, first_step=0, rounds=None, seconds=3.0)
    assert [len(t.step_seconds) for t in timings] == [12, 12]
    calls.clear()
    # both fast enough: still the minimum number of rounds
    timings = run_rounds([_recording("A", 1.0, calls)], first_step=0, rounds=None, seconds=0.5)
    assert len(timings[0].step_seconds) == rounds.MIN_ROUNDS == 5
