"""What a checkpoint holds, and how a run continues from it bit for bit (DINO's explicit
restart state).

A checkpoint holds the query and momentum encoders and the heads, the optimiser and grad
scaler, the schedule position (step, epoch, step within the epoch), every RNG's state, the
counts so far (:class:`RunStats`), the instability detector's state, the time budget's plan,
the resolved config, the input statistics and the package version: tensors and plain
values only, so that ``weights_only=True`` reads it. Data order and augmentation are
functions of (seed, epoch, sample index) and need no state of their own.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocov3 import __version__
from mocov3.errors import CheckpointError
from mocov3.models.moco import load_model_state
from mocov3.runtime.checkpoint import rng_state, set_rng_state


@dataclass
class RunStats:
    """What a run has counted so far, across sessions (a checkpoint's ``progress``)."""

    train_seconds: float = 0.0
    monitor_seconds: float = 0.0
    skipped_steps: int = 0
    loss: float = math.nan
    last_knn: float | None = None
    knn_init: dict[str, Any] | None = None
    loop_seconds: float = 0.0  # the loop's own bookkeeping between steps

    def summary(self, steps: int, batch_size: int) -> dict[str, Any]:
        """What ``summary.json`` reports of a run's training after ``steps`` steps;
        ``loop_overhead_share``: the loop's own time between steps (logging, progress, the
        stability watch, budget checks) over the steps' time."""
        return {
            "images_per_second": round(steps * batch_size / max(self.train_seconds, 1e-9), 2),
            "train_seconds": round(self.train_seconds, 1),
            "loop_overhead_share": round(self.loop_seconds / max(self.train_seconds, 1e-9), 5),
            "final_loss": round(self.loss, 5),
            "steps": steps,
            "skipped_steps": self.skipped_steps,
        }

    def monitor_summary(self) -> dict[str, float]:
        """The kNN monitor's time, and its share of the training time."""
        share = self.monitor_seconds / max(self.train_seconds, 1e-9)
        return {
            "knn_monitor_seconds": round(self.monitor_seconds, 1),
            "knn_monitor_share": round(share, 4),
        }

    @classmethod
    def from_progress(cls, progress: dict[str, Any]) -> RunStats:
        return cls(
            float(progress.get("train_seconds", 0.0)),
            float(progress.get("monitor_seconds", 0.0)),
            int(progress.get("skipped_steps", 0)),
            float(progress.get("loss", math.nan)),
            progress.get("last_knn"),
            progress.get("knn_init"),
            float(progress.get("loop_seconds", 0.0)),
        )


def training_state(
    parts: TrainingParts,
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    progress: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint of a run at ``step`` (``progress``: the stats and what else a resume
    needs; ``extra``: config, input channels and statistics)."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "step": step,
        "epoch": step / steps_per_epoch,
        "epoch_index": step // steps_per_epoch,
        "step_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "rng": rng_state(),
        "progress": progress,
        **extra,
        "version": __version__,
    }


@dataclass
class TrainingParts:
    """The tensors a step changes: the model, the optimiser's moments, the grad scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load a checkpoint's model, optimiser and scaler, then every RNG (a one-line
        CheckpointError for a state this run cannot use)."""
        load_model_state(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"checkpoint {path} has an optimiser or scaler state this run cannot use "
                f"({first[:160]})"
            ) from None
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {path} has an unusable RNG state ({error})"
            ) from None

    @contextlib.contextmanager
    def undone(self) -> Iterator[None]:
        """Whatever steps run inside leave no trace: the model, the optimiser, the scaler
        and every RNG are put back exactly on the way out."""
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        scaler, rng = self.scaler.state_dict(), rng_state()
        try:
            yield
        finally:
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            self.scaler.load_state_dict(scaler)
            set_rng_state(rng)
