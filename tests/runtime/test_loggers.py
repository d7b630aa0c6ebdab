"""Experiment trackers (``train.loggers``): a real tiny run, resumed once, mirrors
``metrics.jsonl`` to TensorBoard, W&B (offline) and MLflow (a file store in the run
directory), and each tracker's own files are read back; nothing touches the network."""

from __future__ import annotations

import importlib.util
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.errors import ConfigError, TrainingError
from mocov3.runtime import logging as logging_module
from mocov3.runtime.loggers import (
    MLFLOW_ID_FILE,
    WANDB_ID_FILE,
    check_loggers,
    mlflow_tracking_uri,
    scalars,
)
from mocov3.runtime.logging import MetricsLog, read_metrics
from mocov3.train import trainer as trainer_module

TINY = "configs/tiny.yaml"
SMALL = [
    "data.subset=512",
    "train.batch_size=64",
    "train.precision=fp32",
    "eval.train_subset=512",
    "eval.test_subset=200",
    "train.log_every=2",
    "train.loggers=[tensorboard, wandb, mlflow]",
]


@pytest.fixture
def no_network(monkeypatch) -> list[Any]:
    """Refuse and record every Internet connection this process tries (W&B's Go core, a
    child process, was checked with ``strace -f -e connect``: Unix sockets only)."""
    tried: list[Any] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            tried.append(address)
            raise OSError("network refused by the test")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return tried


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch, no_network) -> list[Any]:
    """W&B offline with its files under tmp_path; MLflow at its default store (in the run
    directory) with telemetry off."""
    home = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in (
        "WANDB_PROJECT",
        "WANDB_API_KEY",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_ALLOW_FILE_STORE",
    ):
        monkeypatch.delenv(name, raising=False)
    return no_network


def pretrain_args(out: Path, *overrides: str) -> list[str]:
    sets = [arg for text in [*SMALL, *overrides] for arg in ("--set", text)]
    return ["pretrain", "--config", TINY, "--out", str(out), *sets]


# --------------------------------------------------------------------------- reading W&B back


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks
    of 32 KiB, each record a 7-byte header (CRC, length, type) and its bytes, a record split
    over blocks as FIRST, MIDDLE..., LAST (wandb 0.31 ships no reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, parts, records = 32768, 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        elif kind == 0:
            parts = []
    return records


def _items(items: Any) -> dict[str, Any]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config and the history rows of every offline session of ``run_dir``'s W&B run."""
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    config: dict[str, Any] = {}
    rows = []
    for session in sessions:
        for record in wandb_records(next(session.glob("*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update(_items(record.run.config.update))
            elif kind == "config":
                config.update(_items(record.config.update))
            elif kind == "history":
                rows.append(_items(record.history.item))
    return config, rows


# --------------------------------------------------------------------------- the tests


def test_a_run_mirrors_its_metrics_to_every_tracker_and_resumes_their_runs(
    tmp_path, capsys, offline_trackers
):
    out = tmp_path / "run"
    assert main(pretrain_args(out, "train.epochs=1")) == 0
    first_ids = [(out / name).read_text() for name in (WANDB_ID_FILE, MLFLOW_ID_FILE)]
    # the second session continues the same tracker runs; its config changes train.epochs
    assert main([*pretrain_args(out, "train.epochs=2"), "--resume", "auto"]) == 0
    stdout = capsys.readouterr().out
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 16  # still the last line
    assert [(out / name).read_text() for name in (WANDB_ID_FILE, MLFLOW_ID_FILE)] == first_ids
    records = read_metrics(out / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    final = [r for r in records if r["kind"] == "knn"][-1]

    # TensorBoard: the event files of both sessions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    board = {event.step: event.value for event in events.Scalars("train/loss")}
    assert board == pytest.approx(losses, rel=1e-6)  # stored as float32
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "base_lr: 0.01" in text

    # MLflow: the file store in the run directory, one run over both sessions
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run = client.get_run(first_ids[1].strip())
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {metric.step: metric.value for metric in history} == losses
    assert len(history) == len(losses)
    knn = client.get_metric_history(run.info.run_id, "knn/knn_top1")
    assert (knn[-1].step, knn[-1].value) == (final["step"], final["knn_top1"])
    assert run.data.params["optim.base_lr"] == "0.01"
    assert run.data.params["train.epochs"] == "1.0"  # a param keeps its first value
    assert run.data.tags["changed.train.epochs"] == "2.0"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"

    # W&B: the offline files of both sessions, one row per record with our step as x-axis
    assert len(list((out / "wandb").glob(f"offline-run-*-{first_ids[0].strip()}*"))) == 2
    config, rows = wandb_run(out)
    assert config["optim"]["base_lr"] == 0.01 and config["train"]["epochs"] == 2.0
    assert config["train"]["loggers"] == ["tensorboard", "wandb", "mlflow"]
    assert {row["step"]: row["train/loss"] for row in rows if "train/loss" in row} == losses
    knn_rows = [row for row in rows if "knn/knn_top1" in row]
    assert (knn_rows[-1]["step"], knn_rows[-1]["knn/knn_top1"]) == (
        final["step"],
        final["knn_top1"],
    )
    assert offline_trackers == []  # no Internet connection was tried


def test_an_unknown_or_repeated_logger_is_a_one_line_error(capsys):
    allowed = "may name each of tensorboard, wandb, mlflow once"
    for value in ("[tensorboard, neptune]", "[wandb, mlflow, wandb]"):
        with pytest.raises(ConfigError, match=allowed) as error:
            load_config(TINY, [f"train.loggers={value}"])
        assert "\n" not in str(error.value)
    assert load_config(TINY, ["train.loggers=[]"]).train.loggers == ()
    assert main(["pretrain", "--config", TINY, "--set", "train.loggers=[neptune]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: train.loggers ['neptune'] {allowed}"


def without(monkeypatch, *packages: str) -> None:
    """Make ``packages`` look uninstalled to :func:`check_loggers`."""
    find_spec = importlib.util.find_spec

    def find(name: str, package: str | None = None) -> Any:
        return None if name in packages else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find)


def test_a_missing_package_fails_before_any_data_with_the_install_hint(
    tmp_path, monkeypatch, capsys
):
    without(monkeypatch, "wandb", "tensorboard")

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("data was read before the logger check")

    monkeypatch.setattr(trainer_module, "load_training_data", no_data)
    out = tmp_path / "run"
    assert main(pretrain_args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: train.loggers includes 'wandb', which is not installed: "
        "pip install 'mocov3[wandb]', or drop it "
        '(--set "train.loggers=[mlflow]")'
    )
    without(monkeypatch, "wandb", "mlflow", "tensorboard")
    with pytest.raises(ConfigError) as error:
        check_loggers(("wandb", "mlflow"))
    assert str(error.value) == (
        "train.loggers includes 'wandb' and 'mlflow', which are not installed: pip install "
        "'mocov3[wandb,mlflow]', or drop them (--set \"train.loggers=[]\")"
    )
    # the default, TensorBoard, is left out with a note: the core install trains without it
    usable, note = check_loggers(("tensorboard",))
    assert usable == () and "pip install 'mocov3[tensorboard]'" in note
    monkeypatch.undo()
    assert check_loggers(("mlflow", "tensorboard")) == (("mlflow", "tensorboard"), None)
    assert check_loggers(()) == ((), None)


class Recorder:
    """A tracker that keeps what it is given; ``fail`` makes ``log`` raise."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.logged, self.status = fail, [], None

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("server gone\naway")
        self.logged.append((step, scalars(kind, values)))

    def close(self, status: str = "finished") -> None:
        self.status = status


def test_a_failing_tracker_is_dropped_and_a_crash_is_marked_failed(tmp_path, capsys):
    log = MetricsLog(tmp_path, loggers=())
    good, bad = Recorder(), Recorder(fail=True)
    log.loggers.update(good=good, bad=bad)
    log.log("train", 3, loss=0.5, ok=True, note="text")
    log.log("train", 4, loss=0.25)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: the bad logger failed")
    assert good.logged == [(3, {"train/loss": 0.5}), (4, {"train/loss": 0.25})]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3, 4]
    with pytest.raises(ValueError):
        try:
            raise ValueError("the run crashed")
        finally:
            log.close()  # as the trainer's finally calls it
    assert good.status == "failed" and bad.status is None


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    def refuse(name: str, run_dir: Path, resumed_at: int | None) -> None:
        raise RuntimeError("api key not configured\n(no tty)")

    monkeypatch.setattr(logging_module, "open_logger", refuse)
    with pytest.raises(TrainingError, match="wandb could not start .api key") as error:
        MetricsLog(tmp_path, loggers=("wandb",))
    assert "\n" not in str(error.value) and "WANDB_MODE=offline" in str(error.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert mlflow_tracking_uri(tmp_path) == "http://tracking.example:5000"
