"""The run's length: ``train.epochs``, or a time budget (``train.budget_minutes``), and
the lr and momentum schedules laid over it.

Time-budgeted training sizes a run to wall-clock minutes.

The run measures its own step time on a few real steps (then puts the model, optimiser
and RNGs back as they were, so the steps leave no trace), estimates the final evaluation,
and lays the warmup+cosine lr and the momentum schedule over the number of steps that
fits. The plan is a step count, so a run is as reproducible as one given in epochs (the
summary records it), and a resumed run keeps its plan and its clock. A hard stop guards
the budget should the machine slow down: when the time left would not cover the final
evaluation, training stops early and the evaluation still runs.

A few measured steps are a rough guide to the run's pace (on the demo they were 12% fast
once and 40% slow another time), and a shared machine's speed wanders by 10-20% over
minutes. A run cut short by the hard stop never reaches the low-lr end of its cosine, and
one that finishes early leaves minutes unused. So the plan is made again at 5%, 30%, 60%
and 85% of its steps (``replan_step``): the time left (the wall clock, stalls included)
divided by the run's recent pace. The pace is the median of the seconds per step of
windows of ``WINDOW_STEPS`` steps since the previous plan, so a stall of another process's
making costs the minutes it took and no more: it slows one window, which the median passes
over, instead of the pace of every step still to come. What the run knows recurs and times
itself, checkpoints and plot refreshes, is left out of the windows and added back as its
mean per step since the previous plan (the kNN monitor keeps its own estimate). A resumed
run measures its windows afresh and makes the re-plans it has not made yet.

At a re-plan the schedules are laid again from the current step (``relay_schedules``):
during the warmup, the warmup to the same peak at the new count's warmup end; after it, a
half-cosine from the current lr down to ``optim.min_lr`` over the steps that now fit, and
the momentum from its current value up to 1.0. After the warmup the lr never rises and the
momentum never falls, whichever way the step count moves. The plan records each layout
(``BudgetPlan.segments``), and ``plan_schedules`` rebuilds the arrays from it alone, so a
resumed run uses the very same values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mocov3.config import Config
from mocov3.errors import CheckpointError, TrainingError
from mocov3.optim.schedules import (
    momentum_cosine,
    relay_momentum,
    relay_warmup_cosine,
    scaled_lr,
    warmup_cosine,
)

# seconds kept back for writing the last checkpoint, plots and summary
FIXED_RESERVE_SECONDS = 3.0
# the planner aims a little under the budget: step times wander by a few percent
PLAN_MARGIN = 0.97
# the plan is checked against the run's own pace at these shares of its steps, each at
# least REPLAN_MIN_STEPS after the start or the previous check
REPLAN_FRACTIONS = (0.05, 0.3, 0.6, 0.85)
REPLAN_MIN_STEPS = 20
# the pace is the median seconds per step of windows this many steps long, and a re-plan
# waits for at least MIN_WINDOWS of them since the previous plan (or a resume)
WINDOW_STEPS = 5
MIN_WINDOWS = 3


@dataclass
class BudgetPlan:
    """What a budgeted run decided. ``steps``: the planned optimisation steps;
    ``step_seconds``: the measured time of one step; ``eval_seconds``: the estimated final
    evaluation; ``monitor_seconds_per_step``: the kNN monitor's cost spread over steps;
    ``planned_after_seconds``: wall seconds already spent when it was planned;
    ``first_steps``: the first plan's steps, ``replanned_at_step`` the step of the latest
    re-plan (both None until one) and ``replans`` how many were made; ``segments``: the
    schedules' layouts, ``[step, total_steps]`` each, the first ``[0, first plan]`` and one
    more for each re-plan that changed the count (empty in a plan saved before layouts were
    kept: its schedules were laid over ``steps`` alone). See :func:`plan_schedules`."""

    minutes: float
    steps: int
    step_seconds: float
    eval_seconds: float
    monitor_seconds_per_step: float
    planned_after_seconds: float
    first_steps: int | None = None
    replanned_at_step: int | None = None
    replans: int = 0
    segments: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BudgetPlan:
        plan = cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})
        plan.segments = [[int(step), int(total)] for step, total in plan.segments]
        return plan

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    def out_of_time(self, elapsed_seconds: float) -> bool:
        """Whether another step (with its share of the kNN monitor) would not leave the
        final evaluation its time: then training stops now."""
        step = self.step_seconds + self.monitor_seconds_per_step
        return elapsed_seconds + step + self.eval_seconds + FIXED_RESERVE_SECONDS >= self.seconds


def plan_steps(
    budget_seconds: float,
    elapsed_seconds: float,
    step_seconds: float,
    eval_seconds: float,
    monitor_seconds_per_step: float = 0.0,
) -> int:
    """How many steps fit: (budget - spent - final evaluation - reserve) x margin, divided
    by the cost of a step (its own time plus its share of the kNN monitor); at least 1."""
    left = budget_seconds - elapsed_seconds - eval_seconds - FIXED_RESERVE_SECONDS
    per_step = step_seconds + monitor_seconds_per_step
    if per_step <= 0 or not math.isfinite(per_step):
        raise ValueError(f"a step must take a positive, finite time, got {per_step}")
    return max(1, int(left * PLAN_MARGIN / per_step))


def replan_step(planned_steps: int, replans: int = 0, previous: int | None = None) -> int | None:
    """The step after which a plan of ``planned_steps`` is made again, when ``replans`` were
    made so far (the latest after step ``previous``); None: no more re-plans, or a plan too
    short for one to be worth a schedule change."""
    if replans >= len(REPLAN_FRACTIONS) or planned_steps < 2 * REPLAN_MIN_STEPS:
        return None
    step = max(
        (previous or 0) + REPLAN_MIN_STEPS, math.ceil(REPLAN_FRACTIONS[replans] * planned_steps)
    )
    return step if step < planned_steps else None


def saved_plan(state: dict[str, Any] | None) -> BudgetPlan | None:
    """The time budget's plan a checkpoint carries (None: not planned yet)."""
    saved = (state or {}).get("progress", {}).get("budget")
    if not saved:
        return None
    try:
        return BudgetPlan.from_dict(saved)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"the checkpoint's time-budget plan is unreadable ({error}); resume without "
            "train.budget_minutes, or start a new run"
        ) from None


class BudgetPlanner:
    """Keeps a budgeted run's plan in step with its pace.

    ``begin`` marks where the pace is measured from (the loop's start, a resumed session's
    included: windows from before are dropped); ``replan``, called after every step,
    closes a window every ``WINDOW_STEPS`` steps (its wall seconds per step, the kNN
    monitor and the trainer's ``overhead`` left out) and makes the plan again at
    :func:`replan_step` from the median window since the previous plan plus the overhead
    per step since then. The overhead is what the trainer times itself and knows recurs
    (checkpoints, plot refreshes): a median of windows would pass over it as it passes over
    a stall, and the run would then end short of its cosine at the hard stop;
    ``out_of_time`` is the hard stop. ``agree`` turns one process's step
    count into the one every process uses (the mean for the first plan, the main process's
    for re-plans: the others wait out its kNN monitor inside their next step, which would
    count the monitor twice).
    """

    def __init__(self, plan: BudgetPlan | None = None) -> None:
        self.plan = plan
        self._window_from = (0, 0.0, 0.0)  # (step, elapsed, monitor + overhead seconds)
        self._overhead_from = (0, 0.0)  # (step, overhead seconds) at the previous plan
        self.windows: list[float] = []  # seconds per step of the windows since the last plan

    def make_plan(
        self,
        minutes: float,
        elapsed: float,
        step_seconds: float,
        eval_seconds: float,
        monitor_seconds_per_step: float,
        agree: Callable[[int], int],
    ) -> BudgetPlan:
        steps = plan_steps(
            minutes * 60, elapsed, step_seconds, eval_seconds, monitor_seconds_per_step
        )
        steps = agree(steps)
        self.plan = BudgetPlan(
            minutes, steps, step_seconds, eval_seconds, monitor_seconds_per_step, elapsed
        )
        self.plan.segments = [[0, steps]]
        return self.plan

    def describe_plan(self, steps_per_epoch: int) -> str:
        plan = self.plan
        assert plan is not None
        return (
            f"time budget {plan.minutes:g} min: {plan.steps} steps "
            f"({plan.steps / steps_per_epoch:.2f} epochs) at {plan.step_seconds:.3f} s per "
            f"step, {plan.eval_seconds:.0f} s kept for the final evaluation"
        )

    def describe_replan(self, was: int, steps_per_epoch: int) -> str:
        plan = self.plan
        assert plan is not None
        return (
            f"time budget: {plan.step_seconds:.3f} s per step lately; re-planned at step "
            f"{plan.replanned_at_step} to {plan.steps} steps "
            f"({plan.steps / steps_per_epoch:.2f} epochs, was {was})"
        )

    def begin(
        self, step: int, elapsed: float, monitor_seconds: float, overhead: float = 0.0
    ) -> None:
        self._window_from = (step, elapsed, monitor_seconds + overhead)
        self._overhead_from = (step, overhead)
        self.windows = []

    def observe(
        self, step: int, elapsed: float, monitor_seconds: float, overhead: float = 0.0
    ) -> None:
        """Close the current window once it spans ``WINDOW_STEPS`` steps."""
        first, started, left_out_before = self._window_from
        if step - first < WINDOW_STEPS:
            return
        left_out = monitor_seconds + overhead
        spent = elapsed - started - (left_out - left_out_before)
        self.windows.append(spent / (step - first))
        self._window_from = (step, elapsed, left_out)

    def replan(
        self,
        step: int,
        elapsed: float,
        monitor_seconds: float,
        agree: Callable[[int], int],
        overhead: float = 0.0,
    ) -> int | None:
        """The previous step count when the plan was made again at ``step`` (``plan``
        then holds the new count, the pace and the new layout), else None. ``overhead``:
        the trainer's own timed, recurring seconds so far (checkpoints, plots)."""
        self.observe(step, elapsed, monitor_seconds, overhead)
        plan = self.plan
        if plan is None:
            return None
        at = replan_step(plan.steps, plan.replans, plan.replanned_at_step)
        # resumed just before: too few windows to measure, the check waits for them
        if at is None or step < at or len(self.windows) < MIN_WINDOWS:
            return None
        since, overhead_before = self._overhead_from
        pace = statistics.median(self.windows) + (overhead - overhead_before) / (step - since)
        left = plan_steps(
            plan.seconds, elapsed, pace, plan.eval_seconds, plan.monitor_seconds_per_step
        )
        was = plan.steps
        if plan.first_steps is None:
            plan.first_steps = plan.steps
        if not plan.segments:  # a plan saved before layouts were kept
            plan.segments = [[0, plan.steps]]
        plan.replanned_at_step, plan.replans = step, plan.replans + 1
        plan.steps, plan.step_seconds = agree(step + left), pace
        plan.planned_after_seconds = elapsed
        if plan.steps != was:
            plan.segments.append([step, plan.steps])
        self.windows = []  # the next plan measures from here
        self._overhead_from = (step, overhead)
        return was


@dataclass
class Schedules:
    """Per-step lr and momentum arrays, the epoch length they were laid over, and the step
    the lr's warmup ends at."""

    lr: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int
    warmup_steps: int = 0

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def describe_length(config: Config) -> str:
    """One line saying what sets the run's length (the first line a run prints)."""
    t, warmup = config.train, config.optim.warmup_epochs
    if t.budget_minutes:
        return (
            f"length: a {t.budget_minutes:g}-minute time budget (train.budget_minutes) sizes "
            f"the run; train.epochs {t.epochs:g} sets only the warmup's share ({warmup:g} / "
            f"{t.epochs:g} epochs); --epochs without --budget-minutes trains exactly that "
            "many epochs instead"
        )
    return f"length: {t.epochs:g} epochs (train.epochs), warmup {warmup:g} epochs; no time budget"


def build_schedules(config: Config, num_images: int, total_steps: int | None = None) -> Schedules:
    """lr and momentum arrays over ``train.epochs``, or over ``total_steps`` when given (a
    time budget's plan; the warmup then keeps its share of the run,
    ``warmup_epochs / epochs``)."""
    batch = config.train.batch_size
    steps_per_epoch = num_images // batch  # drop_last, as the reference sampler
    if steps_per_epoch == 0:
        raise TrainingError(
            f"train.batch_size {batch} exceeds the {num_images} training images; "
            "lower train.batch_size or use more data"
        )
    if total_steps is None:
        total = max(1, round(config.train.epochs * steps_per_epoch))
        warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    else:
        total = total_steps
        warmup = _warmup_share(config, total)
    peak = scaled_lr(config.optim.base_lr, batch)
    lr = warmup_cosine(peak, total, warmup, config.optim.min_lr)
    momentum = momentum_cosine(config.moco.momentum, total, config.moco.momentum_cosine)
    return Schedules(lr, momentum, steps_per_epoch, min(warmup, total))


def relay_schedules(config: Config, schedules: Schedules, step: int, total: int) -> Schedules:
    """``schedules`` laid again from ``step`` over ``total`` steps: the values before
    ``step`` kept; a warmup still running goes on to the same peak at the new count's
    warmup end (its share of the run, if that is still ahead); otherwise the lr falls from
    its value at ``step`` to ``optim.min_lr``; the momentum rises from its value to 1.0."""
    warmup = schedules.warmup_steps
    if step < warmup:  # in the warmup: it ends at its share of the new count, or now
        warmup = max(step, min(total, _warmup_share(config, total)))
    peak = scaled_lr(config.optim.base_lr, config.train.batch_size)
    lr = relay_warmup_cosine(schedules.lr, step, total, warmup, peak, config.optim.min_lr)
    momentum = relay_momentum(schedules.momentum, step, total, config.moco.momentum_cosine)
    return Schedules(lr, momentum, schedules.steps_per_epoch, warmup)


def plan_schedules(config: Config, num_images: int, plan: BudgetPlan | None) -> Schedules:
    """The schedules a run uses: over ``train.epochs`` without a plan; with one, laid over
    its first layout's step count and again at each later one (:func:`relay_schedules`).
    They depend on the plan alone, so a resumed run rebuilds them bit for bit."""
    if plan is None:
        return build_schedules(config, num_images)
    layouts = plan.segments or [[0, plan.steps]]
    schedules = build_schedules(config, num_images, layouts[0][1])
    for step, total in layouts[1:]:
        schedules = relay_schedules(config, schedules, step, total)
    return schedules


def _warmup_share(config: Config, total_steps: int) -> int:
    """The warmup of a run of ``total_steps``: its share ``warmup_epochs / epochs``."""
    return round(total_steps * config.optim.warmup_epochs / config.train.epochs)
