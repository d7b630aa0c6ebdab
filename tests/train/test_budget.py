"""Time-budgeted training (train.budget_minutes, mocov3/train/budget.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.errors import CheckpointError, ConfigError, TrainingError
from mocov3.runtime.checkpoint import load_checkpoint
from mocov3.train.budget import (
    FIXED_RESERVE_SECONDS,
    PLAN_MARGIN,
    WINDOW_STEPS,
    BudgetPlan,
    BudgetPlanner,
    build_schedules,
    describe_length,
    plan_schedules,
    plan_steps,
    relay_schedules,
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
    # a plan saved before re-plans (or their layouts) were kept still loads
    new_keys = ("first_steps", "replanned_at_step", "replans", "segments")
    old = {k: v for k, v in plan.to_dict().items() if k not in new_keys}
    assert BudgetPlan.from_dict(old) == plan
    # a checkpoint with a damaged plan is a one-line checkpoint error, not a TypeError
    with pytest.raises(CheckpointError, match="time-budget plan is unreadable"):
        saved_plan({"progress": {"budget": {"minutes": 1.0}}})


def drive(planner, steps, elapsed, seconds_per_step, stalls=None, monitor=None):
    """Call ``planner.replan`` after each of ``steps`` (a range) on a synthetic clock: each
    step takes ``seconds_per_step``, plus ``stalls[step]`` seconds of wall time (another
    process's) and ``monitor[step]`` seconds of kNN monitor. Returns the clock, the monitor
    seconds and the (step, was, now) of each re-plan."""
    monitor_seconds, replans = 0.0, []
    for step in steps:
        elapsed += seconds_per_step + (stalls or {}).get(step, 0.0)
        extra = (monitor or {}).get(step, 0.0)
        elapsed, monitor_seconds = elapsed + extra, monitor_seconds + extra
        if (was := planner.replan(step, elapsed, monitor_seconds, agree=int)) is not None:
            replans.append((step, was, planner.plan.steps))
    return elapsed, monitor_seconds, replans


def test_the_planner_replans_from_the_pace_without_the_monitor():
    planner = BudgetPlanner()
    plan = planner.make_plan(1.0, 5.0, 0.5, 10.0, 0.1, agree=lambda steps: steps - 1)
    assert plan.steps == plan_steps(60, 5, 0.5, 10, 0.1) - 1  # the processes' agreed count
    assert plan.segments == [[0, plan.steps]]
    assert planner.describe_plan(8).startswith(f"time budget 1 min: {plan.steps} steps")
    planner.begin(0, 5.0, 0.0)
    at = replan_step(plan.steps)
    first = plan.steps
    # 0.4 s per step, and 2 s of kNN monitor after step 7: not the steps' time
    elapsed, _, replans = drive(planner, range(1, at), 5.0, 0.4, monitor={7: 2.0})
    assert replans == [] and len(planner.windows) == (at - 1) // WINDOW_STEPS  # not yet
    elapsed, _, replans = drive(planner, [at], elapsed, 0.4)
    assert replans == [(at, first, plan.steps)]
    assert plan.replans == 1 and plan.replanned_at_step == at
    assert plan.step_seconds == pytest.approx(0.4)
    left = plan_steps(60, elapsed, plan.step_seconds, 10.0, 0.1)
    assert plan.steps == at + left and plan.first_steps == first
    assert plan.segments == [[0, first], [at, plan.steps]]
    assert "re-planned at step" in planner.describe_replan(first, 8)
    assert BudgetPlanner().replan(100, 1.0, 0.0, agree=int) is None  # no budget: no plan


def test_a_stall_costs_its_own_time_not_the_pace():
    # the demo's case: a 14-minute budget at 0.24 s per step, and another process stalls the
    # machine for 120 s before the first re-plan; the plan loses the steps those 120 s would
    # have held and no more (a mean pace since the plan would count them in every step to
    # come, and cut the plan to about a quarter)
    def run(stalls):
        planner = BudgetPlanner()
        planner.make_plan(14.0, 30.0, 0.24, 20.0, 0.0, agree=int)
        planner.begin(0, 30.0, 0.0)
        return planner, drive(planner, range(1, 1200), 30.0, 0.24, stalls)[2]

    planner, smooth = run({})
    stalled = run({100: 120.0})[1]
    assert len(smooth) == len(stalled) == 2  # at 5% and 30% of the plan
    assert smooth[0][0] == stalled[0][0] > 100 and smooth[0][1] == stalled[0][1]
    lost = 120.0 * PLAN_MARGIN / 0.24  # the steps the stall's time would have held
    assert abs(smooth[0][2] - lost - stalled[0][2]) <= 2
    # the second re-plan keeps the stalled plan where it was (the margin moves it a few
    # steps), rather than swinging back up
    assert abs(smooth[1][2] - lost - stalled[1][2]) <= 10
    assert abs(stalled[1][2] - stalled[0][2]) < 0.01 * stalled[0][2]

    # a resumed session measures its own windows: none before the resume, and a stall right
    # after it is passed over as soon as there are enough windows for a re-plan
    saved = json.loads(json.dumps(planner.plan.to_dict()))
    resumed = BudgetPlanner(BudgetPlan.from_dict(saved))
    start = replan_step(saved["steps"], saved["replans"], saved["replanned_at_step"]) + 50
    resumed.begin(start, 30.0 + 0.24 * start, 0.0)
    made = drive(resumed, range(start + 1, start + 20), 30.0 + 0.24 * start, 0.24, {start + 2: 60})
    assert [step for step, _, _ in made[2]] == [start + 3 * WINDOW_STEPS]
    assert resumed.plan.step_seconds == pytest.approx(0.24)


def test_replans_never_raise_the_lr_after_the_warmup():
    # warmup 10% of the run; the plan grows a little in the warmup, shrinks (a slower pace)
    # after it, then grows (a faster one); min_lr above 0 so that its end is seen
    config = load_config(TINY, ["optim.warmup_epochs=0.2", "optim.min_lr=1e-5"])
    planner = BudgetPlanner()
    plan = planner.make_plan(1.0, 0.0, 0.1, 0.0, 0.0, agree=int)
    planner.begin(0, 0.0, 0.0)
    live = plan_schedules(config, 512, plan)
    first_warmup, elapsed, step, counts = live.warmup_steps, 0.0, 0, [plan.steps]
    for pace in (0.1, 0.15, 0.05):  # each up to the next re-plan
        at = replan_step(plan.steps, plan.replans, plan.replanned_at_step)
        elapsed, _, made = drive(planner, range(step + 1, at + 1), elapsed, pace)
        (step, _, total), before = made[0], live.lr.copy()
        live = relay_schedules(config, live, step, total)  # as the run lays them
        assert np.array_equal(live.lr[:step], before[:step])  # the steps taken stay
        counts.append(total)
    assert counts[2] < counts[1] < counts[3]  # fewer, then more steps
    assert plan.segments[0] == [0, counts[0]] and len(plan.segments) == 4
    assert 0 < first_warmup < plan.segments[2][0]  # the later re-plans come after the warmup
    warmup = live.warmup_steps
    assert live.lr[warmup] == max(live.lr) and live.total_steps == plan.steps
    assert np.all(np.diff(live.lr[warmup:]) <= 0)  # never rises after the warmup
    assert np.all(np.diff(live.momentum) >= 0) and live.momentum[-1] == 1.0
    assert live.lr[-1] == config.optim.min_lr
    # a resumed run rebuilds the very same arrays from the plan its checkpoint saved
    saved = BudgetPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    rebuilt = plan_schedules(config, 512, saved)
    assert np.array_equal(rebuilt.lr, live.lr) and np.array_equal(rebuilt.momentum, live.momentum)
    # a plan saved without layouts was laid over its step count alone, and still is
    legacy = BudgetPlan.from_dict({**plan.to_dict(), "segments": []})
    assert np.array_equal(
        plan_schedules(config, 512, legacy).lr, build_schedules(config, 512, plan.steps).lr
    )


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


def test_a_stalled_run_keeps_its_lr_falling_and_resumes_the_same_schedules(
    tmp_path, monkeypatch, capsys
):
    # a synthetic clock: every step takes 8 s, and another process stalls the machine for
    # 120 s during step 9, before the first re-plan (at step 20); the first plan is ~72 steps
    step_seconds, stall = 8.0, 120.0
    monkeypatch.setattr(Trainer, "_measure_step_seconds", lambda self, steps=4: step_seconds)
    monkeypatch.setattr(
        Trainer, "elapsed", lambda self: step_seconds * self.step + stall * (self.step >= 9)
    )
    overrides = ["train.budget_minutes=10", "optim.warmup_epochs=0.2", "train.log_every=1"]
    overrides += ["eval.knn_init=false", "train.checkpoint_every_steps=1000", "train.threads=1"]
    config = load_config(TINY, [*SMALL, *overrides])
    out = tmp_path / "stalled"
    trainer = Trainer(config, out)
    summary = trainer.run()
    assert capsys.readouterr().err.splitlines()[0].startswith("length: a 10-minute time budget")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    budgets = [r for r in records if r["kind"] == "budget"]
    assert summary["budget"]["replans"] >= 2 and budgets[1]["step"] == 20
    # the first re-plan loses what the 120 s would have held, not a share of every step
    assert budgets[1]["steps"] >= budgets[0]["steps"] - stall * PLAN_MARGIN / step_seconds - 2
    train = [r for r in records if r["kind"] == "train"]
    lrs, momenta = [r["lr"] for r in train], [r["momentum"] for r in train]
    assert len(lrs) == summary["steps"] and budgets[-1]["step"] < len(lrs)
    peak = lrs.index(max(lrs))
    assert 0 < peak < 20 and np.all(np.diff(lrs[peak:]) <= 0)  # never rises after it
    assert np.all(np.diff(momenta) >= 0)
    # resumed, the run rebuilds the schedules it trained with from its checkpoint's plan
    resumed = Trainer(config, out, resume="auto")
    assert np.array_equal(resumed.schedules.lr, trainer.schedules.lr)
    assert np.array_equal(resumed.schedules.momentum, trainer.schedules.momentum)
    assert capsys.readouterr().err.splitlines()[0].startswith("length: a 10-minute")


def test_the_first_line_says_what_sets_the_length(tmp_path, capsys):
    budgeted = load_config("configs/demo.yaml", [])
    assert describe_length(budgeted) == (
        "length: a 14-minute time budget (train.budget_minutes) sizes the run; train.epochs "
        "2.5 sets only the warmup's share (0.25 / 2.5 epochs); --epochs without "
        "--budget-minutes trains exactly that many epochs instead"
    )
    overrides = [*SMALL, "optim.warmup_epochs=0.125", "eval.knn_init=false"]
    overrides += ["eval.knn_final=false"]
    config = load_config(TINY, [*overrides, "train.epochs=0.25"])  # 2 steps
    expected = "length: 0.25 epochs (train.epochs), warmup 0.125 epochs; no time budget"
    assert describe_length(config) == expected
    out = tmp_path / "epochs"
    Trainer(config, out).run()
    assert capsys.readouterr().err.splitlines()[0] == expected
    # resumed (and lengthened), the line still comes first
    longer = load_config(TINY, [*overrides, "train.epochs=0.5"])
    assert Trainer(longer, out, resume="auto").run()["steps"] == 4
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("length: 0.5 epochs") and "resuming from" in "\n".join(err)


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


def test_recurring_checkpoints_are_budgeted_while_a_stall_is_not():
    # 0.24 s per step, a 5 s checkpoint every 100 steps that the trainer times (overhead),
    # and one 120 s stall: the pace is the median window plus the checkpoints' mean cost
    planner = BudgetPlanner()
    planner.make_plan(14.0, 30.0, 0.24, 20.0, 0.0, agree=int)
    planner.begin(0, 30.0, 0.0, 0.0)
    elapsed, overhead, previous, paces = 30.0, 0.0, (0, 0.0), []
    for step in range(1, 1200):
        elapsed += 0.24 + (120.0 if step == 150 else 0.0)
        if step % 100 == 0:
            elapsed, overhead = elapsed + 5.0, overhead + 5.0
        if planner.replan(step, elapsed, 0.0, int, overhead) is not None:
            # the checkpoints since the previous plan, spread over its steps; not the stall
            expected = 0.24 + (overhead - previous[1]) / (step - previous[0])
            paces.append((planner.plan.step_seconds, expected))
            previous = (step, overhead)
    assert len(paces) == 2 and paces[1][1] > 0.24 + 0.04  # 5 s per 100 steps
    for pace, expected in paces:
        assert pace == pytest.approx(expected, abs=1e-6)
