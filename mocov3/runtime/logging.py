"""Run logging: ``metrics.jsonl``, its mirrors in experiment trackers (TensorBoard, W&B,
MLflow: :mod:`mocov3.runtime.loggers`) and a one-line progress display."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from mocov3.errors import TrainingError, one_line
from mocov3.runtime.loggers import Logger, open_logger

_START_HINTS = {
    "wandb": "log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline",
    "mlflow": "check MLFLOW_TRACKING_URI and that its server is up",
    "tensorboard": "check that the run directory is writable",
}


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` and mirrors its numbers to
    the trackers ``loggers`` names. Each record has ``kind`` (train, knn, ...) and ``step``.

    ``resumed_at``: the step a resumed run starts at (None: a new run); ``config``: the
    resolved config, which each tracker records. A tracker that fails while the run goes on
    is dropped with one warning: it is a mirror, and ``metrics.jsonl`` has every record."""

    def __init__(
        self,
        run_dir: Path,
        loggers: Sequence[str] = ("tensorboard",),
        resumed_at: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.loggers: dict[str, Logger] = {}
        try:
            for name in loggers:
                self.loggers[name] = _start(name, run_dir, resumed_at)
                if config is not None:
                    self.loggers[name].log_config(config)
        except BaseException:
            self._close_loggers("failed")
            raise
        self._stream = self.path.open("a")

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        self._each(lambda logger: logger.log(kind, step, values))

    def close(self, status: str | None = None) -> None:
        """Close the file and the trackers, telling them how the run ended: ``finished``,
        ``failed`` or ``killed``. None: read it from the exception on its way out (called
        from a ``finally``), so a crashed run does not show as finished in W&B or MLflow."""
        if status is None:
            error = sys.exc_info()[1]
            status = "finished" if error is None else "failed"
            if isinstance(error, KeyboardInterrupt):
                status = "killed"
        self._stream.close()
        self._close_loggers(status)

    def _close_loggers(self, status: str) -> None:
        self._each(lambda logger: logger.close(status))
        self.loggers.clear()

    def _each(self, call: Callable[[Logger], None]) -> None:
        """``call`` on every tracker; one that raises is dropped with a warning (a tracker
        server's hiccup must not stop hours of training)."""
        for name, logger in list(self.loggers.items()):
            try:
                call(logger)
            except Exception as error:
                del self.loggers[name]
                print(
                    f"warning: the {name} logger failed ({one_line(error)[:200]}) and is off for "
                    "the rest of this run; metrics.jsonl has every record",
                    file=sys.stderr,
                )


def _start(name: str, run_dir: Path, resumed_at: int | None) -> Logger:
    """Open one tracker; a failure is one line naming the fix (the run has not trained yet)."""
    try:
        return open_logger(name, run_dir, resumed_at)
    except Exception as error:
        raise TrainingError(
            f"train.loggers: {name} could not start ({one_line(error)[:300]}): "
            f"{_START_HINTS[name]}, or drop it from train.loggers"
        ) from error


class NullLog:
    """What processes other than the main one log to: nothing."""

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self, status: str | None = None) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """A progress line: redrawn in place on a terminal, printed every ``every`` steps otherwise."""

    def __init__(
        self, total_steps: int, every: int, stream: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.total = total_steps
        self.every = every
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.quiet = quiet  # processes other than the main one print nothing

    def update(self, step: int, fields: dict[str, str], seconds_per_step: float) -> None:
        if self.quiet:
            return
        done = step + 1
        if not self.interactive and done % self.every and done != self.total:
            return
        eta = format_duration((self.total - done) * seconds_per_step)
        width = 20
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        line = f"[{bar}] {done}/{self.total} {text} eta {eta}"
        if self.interactive:
            self.stream.write("\r" + line.ljust(110)[:160])
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.interactive:
            self.stream.write("\r" + " " * 110 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
