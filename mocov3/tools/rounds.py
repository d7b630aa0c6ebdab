"""Timing variants of a step side by side, and calling one faster only when the numbers say so.

A shared machine's speed drifts by more than the differences between variants (10-20% over
minutes on a 2-core cloud VM), so timing one variant after another ranks them by when they
ran. Here every variant is built and warmed first, then the timed steps run in rounds, one
step of each variant per round (A B C A B C ...), so that a slow minute slows every variant
alike. Each variant's steps give a median and a min-max spread; one variant is called faster
than another only when its slowest step beat the other's fastest (the spreads do not
overlap), and otherwise the two are reported as within noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mocov3.runtime.logging import format_duration

# the fewest timed rounds a bench runs when given a time budget instead of a step count
MIN_ROUNDS = 5

StepFn = Callable[[int], tuple[float, float]]  # step number -> (input seconds, step seconds)


@dataclass(frozen=True)
class Spread:
    """Median and range of a set of measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values))


def verdict(candidate: Spread, other: Spread, steps: int = MIN_ROUNDS) -> str:
    """``"faster"`` when every measurement of ``candidate`` is above every one of ``other``
    (rates: higher is faster), ``"slower"`` when every one is below, else ``"within
    noise"``; ``"too few steps"`` from fewer than :data:`MIN_ROUNDS` steps a row."""
    if steps < MIN_ROUNDS:
        return "too few steps"
    if candidate.low > other.high:
        return "faster"
    if candidate.high < other.low:
        return "slower"
    return "within noise"


@dataclass
class Timings:
    """One variant's timed steps: seconds waiting for its input, seconds of the whole step."""

    input_seconds: list[float]
    step_seconds: list[float]

    def rates(self, batch: int) -> Spread:
        """Images per second, one value per timed step."""
        return Spread.of([batch / seconds for seconds in self.step_seconds])


def run_rounds(
    steps: Sequence[StepFn],
    first_step: int,
    rounds: int | None,
    seconds: float,
    progress: Callable[[str], None] = lambda line: None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timings]:
    """Time ``steps`` interleaved: round ``r`` calls each of them with step ``first_step + r``
    in turn. ``rounds``: exactly that many; None: at least ``MIN_ROUNDS``, and more while the
    rounds have taken less than ``seconds`` per variant in all (the variants share the time,
    so one slow variant cannot multiply the rounds the fast ones would want)."""
    timings = [Timings([], []) for _ in steps]
    done = 0
    started = clock()
    while _more_rounds(done, rounds, seconds * len(steps), clock() - started):
        for step, timing in zip(steps, timings, strict=True):
            input_seconds, step_seconds = step(first_step + done)
            timing.input_seconds.append(input_seconds)
            timing.step_seconds.append(step_seconds)
        done += 1
        progress(_round_line(done, rounds, clock() - started))
    return timings


def _more_rounds(done: int, rounds: int | None, budget: float, spent: float) -> bool:
    if rounds is not None:
        return done < rounds
    if done < MIN_ROUNDS:
        return True
    return spent < budget


def _round_line(done: int, rounds: int | None, spent: float) -> str:
    """``round 2/5 done (01:10)``: where the timing is, for the progress lines."""
    planned = f"/{rounds}" if rounds is not None else ""
    return f"round {done}{planned} done ({format_duration(spent)})"
