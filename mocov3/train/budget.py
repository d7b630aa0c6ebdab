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
and 85% of its steps (``replan_step``), from the wall time the run's own steps took since
the previous plan, and the schedules are laid again over the steps that then fit. (The
85% check was added after the hour preset's second seed sped up past its 60% re-plan and
ended 195 s, 5.5% of its 3540 s budget, early.) A resumed
run keeps its plan and makes the re-plans it has not made yet, from its own steps. At a
re-plan the lr moves by about as many percent of its peak as the step count changes (a
few, after the first; at 85% of a run with 10% warmup, +5% steps lifts the lr from 6.7% to
10.7% of its peak).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mocov3.config import Config
from mocov3.errors import CheckpointError, TrainingError
from mocov3.optim.schedules import momentum_cosine, scaled_lr, warmup_cosine

# seconds kept back for writing the last checkpoint, plots and summary
FIXED_RESERVE_SECONDS = 3.0
# the planner aims a little under the budget: step times wander by a few percent
PLAN_MARGIN = 0.97
# the plan is checked against the run's own pace at these shares of its steps, each at
# least REPLAN_MIN_STEPS after the start or the previous check
REPLAN_FRACTIONS = (0.05, 0.3, 0.6, 0.85)
REPLAN_MIN_STEPS = 20


@dataclass
class BudgetPlan:
    """What a budgeted run decided. ``steps``: the planned optimisation steps;
    ``step_seconds``: the measured time of one step; ``eval_seconds``: the estimated final
    evaluation; ``monitor_seconds_per_step``: the kNN monitor's cost spread over steps;
    ``planned_after_seconds``: wall seconds already spent when it was planned;
    ``first_steps``: the first plan's steps, ``replanned_at_step`` the step of the latest
    re-plan (both None until one) and ``replans`` how many were made."""

    minutes: float
    steps: int
    step_seconds: float
    eval_seconds: float
    monitor_seconds_per_step: float
    planned_after_seconds: float
    first_steps: int | None = None
    replanned_at_step: int | None = None
    replans: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BudgetPlan:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

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
    except (KeyError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint's time-budget plan is unreadable ({error}); resume without "
            "train.budget_minutes, or start a new run"
        ) from None


class BudgetPlanner:
    """Keeps a budgeted run's plan in step with its pace.

    ``begin`` marks where the pace is measured from (the loop's start, then each re-plan);
    ``replan`` makes the plan again at :func:`replan_step` from the wall time the steps
    since then took (logging and checkpoints included, the kNN monitor excluded: it keeps
    its own estimate); ``out_of_time`` is the hard stop. ``agree`` turns one process's step
    count into the one every process uses (the mean for the first plan, the main process's
    for re-plans: the others wait out its kNN monitor inside their next step, which would
    count the monitor twice).
    """

    def __init__(self, plan: BudgetPlan | None = None) -> None:
        self.plan = plan
        self._pace_from = (0, 0.0, 0.0)  # (step, elapsed, monitor seconds)

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
        self.plan = BudgetPlan(
            minutes, agree(steps), step_seconds, eval_seconds, monitor_seconds_per_step, elapsed
        )
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

    def begin(self, step: int, elapsed: float, monitor_seconds: float) -> None:
        self._pace_from = (step, elapsed, monitor_seconds)

    def replan(
        self, step: int, elapsed: float, monitor_seconds: float, agree: Callable[[int], int]
    ) -> int | None:
        """The previous step count when the plan was made again at ``step`` (``plan``
        then holds the new count and the measured pace), else None."""
        plan = self.plan
        if plan is None:
            return None
        at = replan_step(plan.steps, plan.replans, plan.replanned_at_step)
        first_step, started, monitor_before = self._pace_from
        # resumed just before: too few steps to measure, the check waits for ten
        if at is None or step < at or step - first_step < 10:
            return None
        spent = elapsed - started - (monitor_seconds - monitor_before)
        pace = spent / (step - first_step)
        left = plan_steps(
            plan.seconds, elapsed, pace, plan.eval_seconds, plan.monitor_seconds_per_step
        )
        was = plan.steps
        if plan.first_steps is None:
            plan.first_steps = plan.steps
        plan.replanned_at_step, plan.replans = step, plan.replans + 1
        plan.steps, plan.step_seconds = agree(step + left), pace
        plan.planned_after_seconds = elapsed
        self.begin(step, elapsed, monitor_seconds)  # the next measure starts here
        return was


@dataclass
class Schedules:
    """Per-step lr and momentum arrays, and the epoch length they were laid over."""

    lr: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)


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
        warmup = round(total * config.optim.warmup_epochs / config.train.epochs)
    peak = scaled_lr(config.optim.base_lr, batch)
    lr = warmup_cosine(peak, total, warmup, config.optim.min_lr)
    momentum = momentum_cosine(config.moco.momentum, total, config.moco.momentum_cosine)
    return Schedules(lr, momentum, steps_per_epoch)
