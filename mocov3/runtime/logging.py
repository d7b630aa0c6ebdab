"""Run logging: ``metrics.jsonl``, TensorBoard events and a one-line progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard. Each record has ``kind`` (train, knn, ...) and ``step``."""

    def __init__(
        self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._stream = self.path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides events a killed session logged from that step on
            self._writer = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=purge_step
            )

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._stream.close()
        if self._writer is not None:
            self._writer.close()


class NullLog:
    """What processes other than the main one log to: nothing."""

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
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
