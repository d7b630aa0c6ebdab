"""Time-budgeted training (train.budget_minutes, mocov3/train/budget.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.errors import CheckpointError, ConfigError, TrainingError
from mocov3.runtime.checkpoint import load_checkpoint
from mocov3.train.budget import (
    FIXED_RESERVE_SECONDS,
    PLAN_MARGIN,
    BudgetPlan,
    BudgetPlanner,
    build_schedules,
    plan_steps,
    replan_step,
    saved_plan,
)
from mocov3.train.trainer import Trainer

TINY = "configs/tiny.yaml"
SMALL = [
    "data.subset=512",
    "train.batch_size=64",
    "train.precision=fp32",
    "eval.train_subset=512",
    "eval.test_subset=200",
]


def test_plan_steps_matches_a_hand_computation():
    # (600 - 50 spent - 40 evaluation - reserve) x margin / (0.5 s + 0.1 s of monitor)
    left = (600 - 50 - 40 - FIXED_RESERVE_SECONDS) * PLAN_MARGIN
    assert plan_steps(600, 50, 0.5, 40, 0.1) == int(left / 0.6)
    assert plan_steps(60, 100, 0.5, 10) == 1  # already over budget: one step, then evaluate
    plan = BudgetPlan(1.0, 10, 0.5, 20.0, 0.25, 5.0)
    # another step (0.5 s + 0.25 s of monitor) must still leave 20 s + reserve
    assert not plan.out_of_time(60 - 0.75 - 20 - FIXED_RESERVE_SECONDS - 0.01)
    assert plan.out_of_time(60 - 0.75 - 20 - FIXED_RESERVE_SECONDS)
    assert BudgetPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # re-planned at 5%, 30%, 60% and 85% of the steps, each at least 20 steps after the last
    assert replan_step(1419) == 71 and replan_step(100) == 20 and replan_step(39) is None
    assert replan_step(1000, 1, 50) == 300 and replan_step(1000, 2, 300) == 600
    assert replan_step(1000, 3, 600) == 850 and replan_step(1000, 4, 850) is None  # four
    assert replan_step(100, 1, 20) == 40 and replan_step(50, 2, 40) is None
    # a plan saved before re-plans existed still loads
    new_keys = ("first_steps", "replanned_at_step", "replans")
    old = {k: v for k, v in plan.to_dict().items() if k not in new_keys}
    assert BudgetPlan.from_dict(old) == plan
    # a checkpoint with a damaged plan is a one-line checkpoint error, not a TypeError
    with pytest.raises(CheckpointError, match="time-budget plan is unreadable"):
        saved_plan({"progress": {"budget": {"minutes": 1.0}}})


def test_the_planner_replans_from_the_pace_without_the_monitor():
    planner = BudgetPlanner()
    plan = planner.make_plan(1.0, 5.0, 0.5, 10.0, 0.1, agree=lambda steps: steps - 1)
    assert plan.steps == plan_steps(60, 5, 0.5, 10, 0.1) - 1  # the processes' agreed count
    assert planner.describe_plan(8).startswith(f"time budget 1 min: {plan.steps} steps")
    planner.begin(0, 5.0, 0.0)
    at = replan_step(plan.steps)
    assert planner.replan(at - 1, 20.0, 3.0, agree=int) is None  # not yet
    # at the re-plan step: 2 s of the 10 spent since were the kNN monitor's, not the steps'
    first = plan.steps
    was = planner.replan(at, 15.0, 2.0, agree=int)
    assert was == first and plan.replans == 1 and plan.replanned_at_step == at
    assert plan.step_seconds == pytest.approx(8.0 / at)
    left = plan_steps(60, 15.0, 8.0 / at, 10.0, 0.1)
    assert plan.steps == at + left and plan.first_steps == was
    assert "re-planned at step" in planner.describe_replan(was, 8)
    assert BudgetPlanner().replan(100, 1.0, 0.0, agree=int) is None  # no budget: no plan


def test_schedules_follow_epochs_or_a_planned_step_count():
    config = load_config(TINY, ["train.epochs=2", "optim.warmup_epochs=1"])
    by_epochs = build_schedules(config, num_images=640)
    assert by_epochs.steps_per_epoch == 10 and by_epochs.total_steps == 20
    assert by_epochs.lr[10] == max(by_epochs.lr)  # the warmup ends after one epoch
    planned = build_schedules(config, num_images=640, total_steps=50)
    assert planned.total_steps == 50 and planned.lr[25] == max(planned.lr)  # share kept
    with pytest.raises(TrainingError, match="exceeds the 10 training images"):
        build_schedules(config, num_images=10)


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_a_short_budget_stops_on_time_with_a_final_evaluation(tmp_path, capsys):
    budget = 0.12  # minutes: about 7 s, of which 3 are the fixed reserve
    out = tmp_path / "budget"
    args = ["pretrain", "--config", TINY, "--out", str(out), "--budget-minutes", str(budget)]
    for override in [*SMALL, "train.log_every=1", "train.epochs=4"]:
        args += ["--set", override]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "time budget 0.12 min:" in err and "kNN after training" in err
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["budget"]
    assert plan["minutes"] == budget and plan["steps"] >= 1
    assert summary["steps"] == plan["steps_done"] <= plan["steps"]
    assert summary["knn_top1"] > 0  # the final evaluation ran
    # on time: the planner leaves the evaluation its share; the slack covers noise in
    # the measured step time on a busy machine
    assert plan["run_wall_seconds"] <= budget * 60 * 1.5

    # the measuring steps leave no trace: the same step count given in epochs (the warmup
    # keeps its share) trains to the same losses, bit for bit, up to the re-plan (after it
    # the schedules are laid over the new count)
    steps = plan["first_steps"] or plan["steps"]
    compared = replan_step(steps) if plan["first_steps"] else summary["steps"]
    same = load_config(
        TINY,
        [
            *SMALL,
            "train.log_every=1",
            f"train.epochs={steps / 8}",
            f"optim.warmup_epochs={steps / 8 / 4}",
        ],
    )
    Trainer(same, tmp_path / "epochs").run()
    assert train_losses(tmp_path / "epochs")[:compared] == train_losses(out)[:compared]


def test_a_slow_machine_is_replanned_from_the_measured_pace(tmp_path, monkeypatch):
    # the measuring steps report a quarter of their time, as if the machine slowed 4x after
    # them: the first plan is ~4x too long; without the re-plan the hard stop would cut the
    # run at about a quarter of it, before the cosine reached its low-lr end
    measure = Trainer._measure_step_seconds
    monkeypatch.setattr(
        Trainer, "_measure_step_seconds", lambda self, steps=4: measure(self, steps) / 4
    )
    # 12 s: enough that the first plan (~4x too long) passes its first re-plan point (5%,
    # at least step 20) well before the hard stop would come at about a quarter of it
    config = load_config(TINY, [*SMALL, "train.budget_minutes=0.2", "train.log_every=1"])
    out = tmp_path / "slow"
    summary = Trainer(config, out).run()
    plan = summary["budget"]
    assert plan["replans"] >= 1 and plan["steps"] < plan["first_steps"] / 2  # ~4x slower
    # the new plan fits: the run ends at (or, on a busy machine, near) its planned last step
    assert plan["steps_done"] >= 0.8 * plan["steps"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    budgets = [r for r in records if r["kind"] == "budget"]
    first = replan_step(plan["first_steps"])
    assert [r["step"] for r in budgets][:2] == [0, first]
    assert len(budgets) == 1 + plan["replans"] and budgets[-1]["steps"] == plan["steps"]
    # the lr schedule was laid again over the new count: it ends near zero
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert len(lrs) == plan["steps_done"]
    # at 80% of a warmup+cosine run the lr is at most ~12% of its peak (0 at its end)
    assert lrs[-1] < 0.2 * max(lrs)
    assert plan["run_wall_seconds"] <= 0.2 * 60 * 1.5


def test_resume_keeps_the_plan_and_a_new_budget_bounds_the_time(tmp_path):
    out = tmp_path / "run"
    first = load_config(TINY, [*SMALL, "train.budget_minutes=1", "train.checkpoint_every_steps=2"])
    trainer = Trainer(first, out)
    calls = {"n": 0}

    def stop_at_step_3(module, inputs, output):  # a real SIGTERM during training step 3
        calls["n"] += module.training
        if calls["n"] == 4 + 3:  # after the 4 measuring steps
            os.kill(os.getpid(), signal.SIGTERM)
        return output

    trainer.model.backbone.register_forward_hook(stop_at_step_3)
    summary = trainer.run()
    assert summary["preempted"] and summary["step"] == 3
    saved = load_checkpoint(out)["progress"]
    plan = saved["budget"]
    assert plan["minutes"] == 1.0 and saved["wall_seconds"] > 0

    # resumed with a budget already spent: the planned schedule stays, training stops after
    # one more step and the final evaluation still runs
    spent = saved["wall_seconds"] / 60
    later = load_config(TINY, [*SMALL, f"train.budget_minutes={spent / 2}"])
    resumed = Trainer(later, out, resume="auto")
    assert resumed.budget.plan is not None and resumed.budget.plan.steps == plan["steps"]
    assert resumed.schedules.total_steps == plan["steps"]
    result = resumed.run()
    assert result["steps"] == 4 and result["budget"]["stopped_early"]
    assert result["knn_top1"] > 0


def test_bad_budget_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="train.budget_minutes -1") as error:
        load_config(TINY, ["train.budget_minutes=-1"])
    assert "\n" not in str(error.value)
    # a budget is planned when a run starts, not added to a run resumed without one
    out = tmp_path / "run"
    Trainer(load_config(TINY, [*SMALL, "train.epochs=1", "eval.knn_init=false"]), out).run()
    later = load_config(TINY, [*SMALL, "train.epochs=2", "train.budget_minutes=1"])
    with pytest.raises(TrainingError, match="a budget is planned when a run starts") as error:
        Trainer(later, out, resume="auto").run()
    assert "\n" not in str(error.value)
