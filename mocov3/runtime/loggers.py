"""Experiment trackers that mirror a run's ``metrics.jsonl``: TensorBoard, Weights & Biases
and MLflow (``train.loggers``).

``metrics.jsonl`` stays the run's record (the plots and reports read it); a tracker gets the
same numbers, each numeric value as the scalar ``KIND/NAME`` at the record's step, and the
resolved config. Each tracker is a small class with three methods, ``log_config``, ``log``
and ``close``; its package is imported only when the run asks for it, and
:func:`check_loggers` says which is missing before a run reads any data.

A resumed run continues its trackers' runs: TensorBoard hides the events a killed session
wrote after the checkpoint (``purge_step``); W&B and MLflow continue the run whose id the
run directory keeps (``wandb-run-id``, ``mlflow-run-id``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from mocov3.config import LOGGERS
from mocov3.errors import ConfigError, has_package

# the package each logger imports; its pip extra has the logger's name (mocov3[wandb])
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
WANDB_ID_FILE = "wandb-run-id"
MLFLOW_ID_FILE = "mlflow-run-id"
STATUSES = ("finished", "failed", "killed")


class Logger(Protocol):
    """What every tracker does. ``log`` gets a ``metrics.jsonl`` record's values and mirrors
    the numeric ones (:func:`scalars`); ``close`` gets how the run ended (:data:`STATUSES`)."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None: ...

    def close(self, status: str = "finished") -> None: ...


def check_loggers(names: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """The loggers a run can use, and a note on any it leaves out; raised before any data
    is read. TensorBoard, the default, is left out with a note when it is not installed
    (the core install trains without it, and ``metrics.jsonl`` holds every value); a
    tracker the run asked for by name is a one-line error naming both fixes: hours of
    training should not end without the log they were meant to feed."""
    missing = [name for name in names if not has_package(PACKAGES[name])]
    note = None
    if "tensorboard" in missing:
        missing.remove("tensorboard")
        note = (
            "note: no TensorBoard logs: tensorboard is not installed (pip install "
            "'mocov3[tensorboard]'); metrics.jsonl holds every value"
        )
    usable = tuple(name for name in names if has_package(PACKAGES[name]))
    if not missing:
        return usable, note
    quoted = " and ".join(f"'{name}'" for name in missing)
    kept = ",".join(usable)
    verb, them = ("is", "it") if len(missing) == 1 else ("are", "them")
    raise ConfigError(
        f"train.loggers includes {quoted}, which {verb} not installed: pip install "
        f"'mocov3[{','.join(missing)}]', or drop {them} (--set \"train.loggers=[{kept}]\")"
    )


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record as ``KIND/NAME`` (booleans and text are left out)."""
    return {
        f"{kind}/{name}": value
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"base_lr": 0.1}}`` as ``{"optim.base_lr": 0.1}`` (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_id(path: Path) -> str | None:
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def open_logger(name: str, run_dir: Path, resumed_at: int | None) -> Logger:
    """The tracker ``name`` for ``run_dir``; ``resumed_at``: the step a resumed run starts
    at (None: a new run, which starts new tracker runs)."""
    if name == "tensorboard":
        return TensorBoardLogger(run_dir, resumed_at)
    if name == "wandb":
        return WandbLogger(run_dir, resumed_at)
    if name == "mlflow":
        return MlflowLogger(run_dir, resumed_at)
    raise ConfigError(f"train.loggers: unknown logger '{name}' (choose from {', '.join(LOGGERS)})")


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger:
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides the events a killed session logged after its checkpoint
        purge = None if resumed_at is None else resumed_at + 1
        self.start = resumed_at or 0
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log_config(self, config: dict[str, Any]) -> None:
        # indented four spaces: TensorBoard renders text as Markdown, this keeps it verbatim
        text = yaml.safe_dump(config, sort_keys=False)
        block = "\n".join(f"    {line}" for line in text.splitlines())
        self.writer.add_text("config", block, self.start)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        for name, value in scalars(kind, values).items():
            self.writer.add_scalar(name, value, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()


# --------------------------------------------------------------------------- W&B


class WandbLogger:
    """A W&B run named after the run directory, its files in ``RUN_DIR/wandb``.

    W&B reads its own environment: ``WANDB_MODE=offline`` keeps everything local (upload
    later with ``wandb sync``), ``WANDB_ENTITY``, ``WANDB_API_KEY``; the project is
    ``WANDB_PROJECT`` or ``mocov3``. Each record is one W&B row whose x-axis is our ``step``
    (rows may go back in step: an instability event is logged when it is recognised, and a
    resumed run repeats the steps a killed session logged after its checkpoint)."""

    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = _read_id(id_file) if resumed_at is not None else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "mocov3",
            name=run_dir.resolve().name,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        id_file.write_text(self.run.id + "\n")

    def log_config(self, config: dict[str, Any]) -> None:
        # a resumed run may change settings (a new budget): the latest values win
        self.run.config.update(config, allow_val_change=True)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if numbers := scalars(kind, values):
            self.run.log({**numbers, "step": step})

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


# --------------------------------------------------------------------------- MLflow

_METRIC_NAME = re.compile(r"[^\w/.\- :]")  # what MLflow accepts in a metric name


def mlflow_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or a file store in ``RUN_DIR/mlruns``: it needs no server
    and no database package (mlflow-skinny has none). MLflow 3 keeps file stores behind
    ``MLFLOW_ALLOW_FILE_STORE``, which this default therefore turns on."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir.resolve() / "mlruns").as_uri()


class MlflowLogger:
    """An MLflow run named after the run directory, in the experiment
    ``MLFLOW_EXPERIMENT_NAME`` (or ``mocov3``); the config as params ``section.key``."""

    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
        id_file = run_dir / MLFLOW_ID_FILE
        run_id = _read_id(id_file) if resumed_at is not None else None
        self.resumed = False
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.resumed = True
            except MlflowException:  # not in this store (MLFLOW_TRACKING_URI changed)
                run_id = None
        if run_id is None:
            run_id = self._create_run(run_dir)
        self.run_id = run_id
        id_file.write_text(run_id + "\n")

    def _create_run(self, run_dir: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mocov3"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        tags = {"mocov3.run_dir": str(run_dir.resolve())}
        run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags)
        return run.info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        """Params, cut to MLflow's length limit. MLflow never changes a param, so a resumed
        run logs only new keys and records a changed value as the tag ``changed.KEY``."""
        from mlflow.entities import Param, RunTag

        limit = _param_value_limit()
        values = {key: str(value)[:limit] for key, value in flatten(config).items()}
        before = self.client.get_run(self.run_id).data.params if self.resumed else {}
        params = [Param(k, v) for k, v in values.items() if k not in before]
        tags = [RunTag(f"changed.{k}", v) for k, v in values.items() if before.get(k, v) != v]
        self.client.log_batch(self.run_id, params=params, tags=tags)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(_METRIC_NAME.sub("_", name), float(value), now, step)
            for name, value in scalars(kind, values).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())


def _param_value_limit() -> int:
    """The longest param value this MLflow accepts (6000 characters in MLflow 2 and 3)."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        return 500  # MLflow 1's limit
    return int(MAX_PARAM_VAL_LENGTH)
