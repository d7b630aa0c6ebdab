"""The pretraining loop: build what a run needs, then step, watch, checkpoint, evaluate.

Data in memory as uint8 (or streamed views), batched two-view augmentation on the
training device, bf16 autocast where it is fast, per-iteration lr and momentum schedules,
kNN before, during and after training, ``metrics.jsonl`` and TensorBoard, checkpoints that
resume bit for bit, and SIGTERM handling. Each job has its own module; this one wires them
together: :mod:`~mocov3.train.run_dir` (files), :mod:`~mocov3.train.step` (one step),
:mod:`~mocov3.train.budget` (length and schedules), :mod:`~mocov3.train.monitor` (kNN and
instability), :mod:`~mocov3.runtime.signals` (preemption).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mocov3.config import Config
from mocov3.data.augment import TwoViewAugment
from mocov3.data.counters import sample_keys
from mocov3.data.sampling import StepSampler, per_process_batch
from mocov3.data.sources import BatchSource, load_training_data
from mocov3.data.stream import report_unreadable
from mocov3.errors import TrainingError
from mocov3.models.moco import MoCo, build_moco
from mocov3.runtime.device import resolve_device, start_runtime
from mocov3.runtime.distributed import (
    ProcessInfo,
    any_process,
    barrier,
    launched_info,
    main_process_value,
    mean_count,
    mean_value,
    process_group,
)
from mocov3.runtime.loggers import check_loggers
from mocov3.runtime.logging import MetricsLog, NullLog, Progress
from mocov3.runtime.performance import apply_memory_format, compile_backbones, to_memory_format
from mocov3.runtime.signals import StopSignals
from mocov3.train.budget import (
    BudgetPlanner,
    build_schedules,
    describe_length,
    plan_schedules,
    saved_plan,
)
from mocov3.train.monitor import KnnMonitor, Log, StabilityWatch
from mocov3.train.run_dir import RunDirectory, check_restorable
from mocov3.train.stability import InstabilityDetector
from mocov3.train.state import RunStats, training_state
from mocov3.train.step import StepResult, build_train_step

PlotRun = Callable[[Path], list[Path]]


class Trainer:
    """Holds what one pretraining run needs; ``run`` does the work and returns the summary.

    ``resume``: ``"auto"`` (the newest usable checkpoint in ``out_dir``; none: start
    afresh), a checkpoint file, or a run directory. ``resume_command``: the command printed
    when a signal stops the run. ``overwrite``: replace an earlier run in ``out_dir``.
    ``plot``: draws the run's plots from its directory (at ``train.plot_every`` and at the
    end); None draws none.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        resume: str | Path | None = None,
        resume_command: str | None = None,
        overwrite: bool = False,
        process: ProcessInfo | None = None,
        plot: PlotRun | None = None,
    ) -> None:
        self._clock = time.perf_counter()  # a time budget counts from here
        self.spent_before = 0.0  # wall seconds of the sessions before a resume
        self.config, t = config, config.train
        self.process = process or ProcessInfo()
        self.is_main = self.process.is_main
        # the run's first line says what sets its length: a new run's once its directory and
        # data are found (a run that cannot start prints its one-line error alone), a resumed
        # run's before its checkpoint is looked for (which may print notes)
        self.progress = Progress(1, t.log_every, quiet=not self.is_main)
        self.run_dir = RunDirectory(out_dir, self.is_main)
        self.out_dir = self.run_dir.path
        self.resume_command, self.plot = resume_command, plot
        # every process checks (they all fail alike); only the main process changes files
        per_process_batch(t.batch_size, self.process.world_size)
        # a tracker asked for and not installed fails here, before any data is read
        self.loggers, logger_note = check_loggers(t.loggers)
        self.run_dir.prepare(resume, overwrite)
        if resume is not None:
            self.progress.message(describe_length(config))
        found = self.run_dir.find_resume(resume, config)  # before the data: fail fast
        state, self.resume_from = found or (None, None)
        runtime = start_runtime(t, self.process)
        self.device, self.tf32 = runtime.device, runtime.tf32
        t.precision = runtime.precision  # resolved once: config.yaml says what the run used
        evaluates = config.eval.knn_init or config.eval.knn_final
        self.data = load_training_data(config, with_test=evaluates)
        if resume is None:
            self.progress.message(describe_length(config))
        if logger_note:
            self.progress.message(logger_note)
        if evaluates and self.data.test_set is None:
            note = "note: no labelled val/ or test/ split, so kNN evaluation is skipped"
            print(note, file=sys.stderr)
        if self.data.kind == "memory" and config.data.decode == "gpu":
            note = "note: data.decode=gpu decodes streamed data; this run's images are in memory"
            print(note, file=sys.stderr)
        # a resume keeps the plan (and its pending re-plans); a new budget bounds the time
        # of all sessions
        plan = saved_plan(state) if t.budget_minutes else None
        if plan is not None:
            plan.minutes = float(t.budget_minutes or 0)
        self.budget = BudgetPlanner(plan)
        self.schedules = plan_schedules(config, self.data.num_images, plan)
        self.model: MoCo = build_moco(config, self.data.channels).to(self.device)
        apply_memory_format(self.model, t)
        compile_backbones(self.model, t)
        self.train_step = build_train_step(config, self.model, self.device)
        self.augment = TwoViewAugment(
            config.augment, config.data.image_size, self.data.mean, self.data.std
        )
        self.detector = InstabilityDetector.from_config(config.stability)
        self.watch = StabilityWatch(self.detector)
        self.knn = KnnMonitor(config, self.data, self.device, self.is_main)
        rank, world = self.process.rank, self.process.world_size
        self.sampler = StepSampler(self.data.num_images, t.batch_size, t.seed, rank, world)
        self.step, self.stats = 0, RunStats()
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self.stop = StopSignals()
        self._stopping = False  # the stop all processes agreed on (see _agree_to_stop)
        self._budget_stop = False  # the time budget ran out before the planned steps
        self._overhead = 0.0  # seconds of checkpoints and plots this session (budget.py)
        self._eval_seconds_per_image: float | None = None  # measured by the kNN at init
        self.batches: BatchSource | None = None
        self.unreadable: dict[int, str] = {}  # images the streams substituted this session
        if state is not None:
            self._restore(state)
        self.batches = self._batch_source(self.step, self.schedules.total_steps)
        barrier()  # every process has read its checkpoint before the main one cleans up
        if self.is_main:
            self.run_dir.remove_later_checkpoints(self.step, self.resume_from)

    def _batch_source(self, start: int, stop: int) -> BatchSource:
        local = self.process.local_world_size
        return self.data.batch_source(
            self.sampler, self.device, self.config, start, stop, local, self.unreadable
        )

    def elapsed(self) -> float:
        """Wall seconds this run has used, earlier sessions included."""
        return self.spent_before + time.perf_counter() - self._clock

    def close(self) -> None:
        """Release the input pipeline (streaming workers); safe to call more than once."""
        if self.batches is not None:
            self.batches.close()

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was written: weights, optimiser, scaler, the
        schedule position, the counts so far and every RNG."""
        path = self.resume_from
        assert path is not None
        total = self.schedules.total_steps
        check_restorable(state, path, self.data.channels, self.schedules.steps_per_epoch, total)
        self.run_dir.note_config_changes(state, self.config, path)
        progress = state.get("progress", {})
        self.step = self._saved_step = int(state["step"])
        self.spent_before = float(progress.get("wall_seconds", 0.0))
        self.stats = RunStats.from_progress(progress)
        self.detector.load_state_dict(progress.get("stability", {}))
        self.last_checkpoint = path
        self.train_step.parts.restore(state, path)  # the RNGs last
        print(f"resuming from {path} at step {self.step}/{total}", file=sys.stderr)

    def checkpoint_state(self) -> dict[str, Any]:
        plan = self.budget.plan
        progress = {
            **asdict(self.stats),
            "stability": self.watch.state_dict(self.step),
            "wall_seconds": self.elapsed(),
            "budget": plan.to_dict() if plan else None,
        }
        inputs = {
            "config": self.config.to_dict(),
            "in_chans": self.data.channels,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
        }
        spe, total = self.schedules.steps_per_epoch, self.schedules.total_steps
        return training_state(self.train_step.parts, self.step, spe, total, progress, inputs)

    # ------------------------------------------------------------------ one step
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's two augmented views at ``step``; the augmentation of each image is
        drawn from (seed, epoch, sample index) alone, so it does not depend on the world size."""
        assert self.batches is not None
        images, indices = self.batches(step)
        epoch = step // self.schedules.steps_per_epoch
        keys = sample_keys(self.config.train.seed, epoch, indices).to(self.device)
        x1, x2 = self.augment(images, keys)
        return to_memory_format(x1, self.config.train), to_memory_format(x2, self.config.train)

    def take_step(self, step: int) -> StepResult:
        """One optimisation step; a non-finite loss or gradient stops the run with one line
        (nothing written) unless ``train.skip_nonfinite`` skips it."""
        lr, momentum = float(self.schedules.lr[step]), float(self.schedules.momentum[step])
        result = self.train_step(*self.batch(step), step, lr, momentum)
        if result.nonfinite is not None and not result.skipped:
            kept = (
                f"the last checkpoint ({self.last_checkpoint}) is untouched"
                if self.last_checkpoint
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"{result.nonfinite}: lower optim.base_lr or raise optim.warmup_epochs, or set "
                f"train.skip_nonfinite=true to skip such steps; {kept}"
            )
        return result

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Train, evaluate, plot; only the main process writes files and prints."""
        resumed = self.resume_from is not None
        log: Log = NullLog()
        if self.is_main:
            self.run_dir.write_config(self.config)
            self.run_dir.start_metrics(self.step if resumed else None)
            # a resumed run continues its trackers' runs (TensorBoard drops the events a
            # killed session logged after the checkpoint)
            log = MetricsLog(
                self.out_dir,
                self.loggers,
                self.step if resumed else None,
                self.config.to_dict(),
            )
        every = self.config.train.log_every
        self.progress = Progress(self.schedules.total_steps, every, quiet=not self.is_main)
        self.watch.progress = self.progress
        summary: dict[str, Any] = {"epochs": self.config.train.epochs}
        if self.process.world_size > 1:
            summary["processes"] = self.process.world_size
        with self.stop:
            try:
                summary.update(self._run(log))
            finally:  # the trackers mark a stopped run killed, an exception failed
                log.close("killed" if summary.get("preempted") else None)
            if summary.get("preempted") or not self.is_main:
                return summary
            if self.plot is not None:
                summary["plots"] = [str(p) for p in self.plot(self.out_dir)]
            self.run_dir.write_summary(summary)
        return summary

    def _run(self, log: Log) -> dict[str, Any]:
        started = time.perf_counter()
        if self.resume_from is None and self.config.eval.knn_init:
            self._knn_at_init(log)
        results: dict[str, Any] = {}
        if self.stats.knn_init is not None:
            results["knn_top1_init"] = self.stats.knn_init["knn_top1"]
        if self.config.train.budget_minutes and self.budget.plan is None:
            if self.step > 0:
                raise TrainingError(
                    f"train.budget_minutes is set, but {self.resume_from} was written by a run "
                    "without a time budget: a budget is planned when a run starts; resume "
                    "without it, or start a new run with it"
                )
            self._plan_budget(log)
        self._train_loop(log)
        if self._stopping:
            return self._preempted()
        results.update(self.stats.summary(self.step, self.config.train.batch_size))
        results["instability_events"] = self.detector.summary()
        # the in-memory set's left-out files, or those this process's streams substituted
        results["unreadable_images"] = self.data.skipped + len(self.unreadable)
        if self.unreadable:
            report_unreadable(self.unreadable)
        if self.resume_from is not None:
            results["resumed_from"] = str(self.resume_from)
        if self.config.eval.monitor_every:
            results.update(self.stats.monitor_summary())
        if self.config.eval.knn_final and (final := self.knn.evaluate(self.model.backbone)):
            log.log("knn", self.step, **final)
            self.progress.message(f"kNN after training: {final}")
            results.update(final)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["run_wall_seconds"] = round(self.elapsed(), 1)  # all sessions, setup included
        if (plan := self.budget.plan) is not None:
            results["epochs"] = round(self.step / self.schedules.steps_per_epoch, 4)
            results["budget"] = {
                **plan.to_dict(),
                "steps_done": self.step,
                "stopped_early": self.step < plan.steps,
                "run_wall_seconds": round(self.elapsed(), 1),
            }
        return results

    def _knn_at_init(self, log: Log) -> None:
        tic = time.perf_counter()
        if (init := self.knn.evaluate(self.model.backbone)) is not None:
            images = init["train_images"] + init["test_images"]
            self._eval_seconds_per_image = (time.perf_counter() - tic) / images
            log.log("knn", 0, **init)
            self.progress.message(f"kNN at random init: {init}")
            self.stats.knn_init = init

    def _train_loop(self, log: Log) -> None:
        self.model.train()
        window: list[float] = []
        if (start := self._monitor(log)) is not None:
            self.stats.last_knn = start["knn_top1"]  # the monitor's own start, same subset
        self.budget.begin(self.step, self.elapsed(), self.stats.monitor_seconds, self._overhead)
        while self.step < self.schedules.total_steps and not self._agree_to_stop():
            tic = time.perf_counter()
            result = self.take_step(self.step)
            if self.device.type == "cuda":  # the step's queued kernels are the step's time
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - tic
            window = (window + [elapsed])[-20:]
            tic = time.perf_counter()
            out_of_time = self._after_step(result, sum(window) / len(window), log)
            self.stats.train_seconds += elapsed
            self.stats.loop_seconds += time.perf_counter() - tic  # summary.json's overhead
            tic = time.perf_counter()
            self._maybe_checkpoint()
            self._overhead += time.perf_counter() - tic  # the budget counts it apart
            if self._agree_to_stop() or out_of_time:
                break
            tic = time.perf_counter()
            if (monitored := self._monitor(log)) is not None:
                self.stats.last_knn = monitored["knn_top1"]
                self.stats.monitor_seconds += time.perf_counter() - tic

    def _after_step(self, result: StepResult, per_step: float, log: Log) -> bool:
        """The loop's bookkeeping after a step: counts, the stability watch, the log and the
        progress line, the budget's re-plan; True when the time budget has run out."""
        spe, batch = self.schedules.steps_per_epoch, self.config.train.batch_size
        self.stats.loss = result.loss
        if result.skipped:
            self.stats.skipped_steps += 1
            self.progress.message(f"warning: skipped the step: {result.nonfinite}")
            log.log("skipped", self.step + 1, reason=result.nonfinite)
        self.watch.observe_step(self.step + 1, result.loss, result.grad_norms, log)
        values = {
            "loss": result.loss,
            "lr": float(self.schedules.lr[self.step]),
            "momentum": float(self.schedules.momentum[self.step]),
            "images_per_second": batch / per_step,
        }
        if (self.step + 1) % self.config.train.log_every == 0 or self.step == 0:
            log.log("train", self.step + 1, epoch=(self.step + 1) / spe, **values)
        fields = _progress_fields(values, self.step, spe, self.stats.last_knn, self.detector)
        self.progress.update(self.step, fields, per_step)
        self.step += 1
        self._maybe_replan(log)
        out_of_time = self._agree_out_of_time()
        if out_of_time:
            self._budget_stop = True
            self.progress.message(
                f"time budget reached after step {self.step} of "
                f"{self.schedules.total_steps} planned (the machine ran slower than "
                "measured); evaluating now"
            )
        return out_of_time

    def _monitor(self, log: Log) -> dict[str, float] | None:
        """The kNN monitor on its subset when due (see :class:`KnnMonitor`)."""
        if not self.knn.due(self.step, self.schedules.total_steps):
            return None
        result = self.knn.evaluate(self.model.backbone, self.knn.monitor_sizes())
        if result is not None:
            log.log("knn_monitor", self.step, **result)
            self.watch.observe_knn(self.step, result["knn_top1"], log)
        return result

    # ------------------------------------------------------------------ checkpoints
    def _maybe_checkpoint(self) -> None:
        t, spe = self.config.train, self.schedules.steps_per_epoch
        at_end = self.step == self.schedules.total_steps or self._budget_stop
        every = t.checkpoint_every_steps or t.checkpoint_every * spe
        epoch, within = divmod(self.step, spe)
        milestone = epoch if within == 0 and epoch in t.milestones else None
        if at_end or self.step % every == 0 or milestone is not None:
            self._save(milestone)
        if self.plot and self.is_main and not at_end and self.step % (t.plot_every * spe) == 0:
            self.plot(self.out_dir)

    def _save(self, milestone: int | None = None) -> None:
        if self.is_main:  # the main process writes for all (they hold the same state)
            keep = self.config.train.keep_checkpoints
            state = self.checkpoint_state()
            self.last_checkpoint = self.run_dir.save(state, self.step, keep, milestone)
        self._saved_step = self.step

    # ------------------------------------------------------------------ stopping
    def _agree_to_stop(self) -> bool:
        """Whether any process got a stop signal: a signal may reach the processes at
        different steps, and they must all stop after the same one."""
        self._stopping = any_process(self.stop.received is not None, self.device)
        return self._stopping

    def _preempted(self) -> dict[str, Any]:
        """After a signal: make sure the current step is checkpointed, say how to go on."""
        if self._saved_step != self.step:
            self._save()
        command = self.resume_command or self.run_dir.resume_command()
        self.progress.message(
            f"stopped by {self.stop.name} after step {self.step}/{self.schedules.total_steps}, "
            f"checkpoint {self.last_checkpoint}; resume with: {command}"
        )
        return {
            "preempted": True,
            "signal": self.stop.name,
            "step": self.step,
            "checkpoint": str(self.last_checkpoint),
            "resume_command": command,
        }

    # ------------------------------------------------------------------ time budget
    def _plan_budget(self, log: Log) -> None:
        """Measure a step, estimate the evaluation, and lay the schedules over the steps
        that fit in ``train.budget_minutes`` (see :mod:`mocov3.train.budget`)."""
        step_seconds = self._measure_step_seconds()
        final_images = sum(self.knn.final_sizes())
        monitor_images = self.knn.monitor_images_per_step()
        per_image = 0.0
        if final_images or monitor_images:
            per_image = self._eval_seconds_per_image or self.knn.seconds_per_image(
                self.model.backbone
            )
        plan = self.budget.make_plan(
            float(self.config.train.budget_minutes or 0),
            self.elapsed(),
            step_seconds,
            1.1 * per_image * final_images,
            per_image * monitor_images,
            lambda steps: mean_count(steps, self.device),
        )
        self._lay_schedules()
        self.progress.message(self.budget.describe_plan(self.schedules.steps_per_epoch))
        log.log("budget", 0, **plan.to_dict())

    def _lay_schedules(self) -> None:
        """The schedules of the budget's plan (:func:`plan_schedules`), and the batches and
        progress line to its step count."""
        self.schedules = plan_schedules(self.config, self.data.num_images, self.budget.plan)
        steps = self.schedules.total_steps
        self.close()
        self.batches = self._batch_source(self.step, steps)
        self.progress.total = steps

    def _maybe_replan(self, log: Log) -> None:
        """Plan again at the budget's re-plan points from the run's own pace, so the
        schedules end when the budget does (see :class:`BudgetPlanner`)."""
        elapsed, monitor = self.elapsed(), self.stats.monitor_seconds
        replanned = self.budget.replan(
            self.step,
            elapsed,
            monitor,
            lambda steps: int(main_process_value(steps, self.device)),
            self._overhead,
        )
        if replanned is None or (plan := self.budget.plan) is None:
            return
        if plan.steps != self.schedules.total_steps:
            self._lay_schedules()
        spe = self.schedules.steps_per_epoch
        self.progress.message(self.budget.describe_replan(replanned, spe))
        log.log("budget", self.step, **plan.to_dict())

    def _agree_out_of_time(self) -> bool:
        """Whether the budget leaves only the final evaluation's time (any process)."""
        plan = self.budget.plan
        if plan is None or self.step >= self.schedules.total_steps:
            return False
        return any_process(plan.out_of_time(self.elapsed()), self.device)

    def _measure_step_seconds(self, steps: int = 4) -> float:
        """The median time of real training steps 2..``steps`` (the first pays one-off
        costs), the processes' mean; the steps leave no trace (``TrainingParts.undone``)."""
        times = []
        with self.train_step.parts.undone():
            schedules, original = self.schedules, self.batches
            # the epoch-based schedule may be shorter than ``steps``
            total = max(steps, schedules.total_steps)
            self.schedules = build_schedules(self.config, self.data.num_images, total)
            self.batches = self._batch_source(0, steps)
            try:
                for step in range(steps):
                    tic = time.perf_counter()
                    self.take_step(step)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times.append(time.perf_counter() - tic)
            finally:
                self.close()
                self.batches, self.schedules = original, schedules
        seconds = statistics.median(times[1:]) if len(times) > 1 else times[0]
        return mean_value(seconds, self.device)


def _progress_fields(
    values: dict[str, float],
    step: int,
    steps_per_epoch: int,
    last_knn: float | None,
    detector: InstabilityDetector,
) -> dict[str, str]:
    """What the progress line shows after ``step``."""
    fields = {
        "ep": f"{(step + 1) / steps_per_epoch:.2f}",
        "loss": f"{values['loss']:.4f}",
        "lr": f"{values['lr']:.2e}",
        "m": f"{values['momentum']:.4f}",
        "img/s": f"{values['images_per_second']:.0f}",
    }
    if last_knn is not None:
        fields["knn"] = f"{last_knn:.1f}"
    fields["inst"] = str(detector.total)
    return fields


def pretrain(
    config: Config,
    out_dir: str | Path,
    resume: str | Path | None = None,
    resume_command: str | None = None,
    overwrite: bool = False,
    plot: PlotRun | None = None,
) -> dict[str, Any]:
    """Run MoCo v3 pretraining into ``out_dir`` and return the summary dict (with
    ``preempted: true`` when a signal stopped it; see :class:`Trainer` for the options).

    Under ``torchrun`` with several processes this joins the process group (gloo on CPU,
    NCCL on CUDA) and leaves it on every way out; each process returns its summary, the
    main process's being the full one."""
    device = resolve_device(config.train.device, launched_info())
    with process_group(device, config.train.dist_timeout_minutes) as process:
        trainer = Trainer(config, out_dir, resume, resume_command, overwrite, process, plot)
        try:
            return trainer.run()
        finally:
            trainer.close()
