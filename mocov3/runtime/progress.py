"""Progress with rate and ETA for the long evaluation commands, on standard error.

On a terminal one line is redrawn in place; anywhere else (a log file, a pipe, a scheduler's
output) every update is a whole line of its own, at most one per ``interval`` seconds plus
the last, so a log reads as a record of how the work went. Nothing is printed for work
that ends within ``delay`` seconds, and only the main process prints under torchrun.
Written here rather than with tqdm because tqdm redraws with carriage returns in files too,
which turns a log into one unreadable line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mocov3.runtime.distributed import is_main_process

TERMINAL_INTERVAL = 0.25  # seconds between redraws of a terminal line
LOG_INTERVAL = 10.0  # seconds between lines in a log file
DELAY = 3.0  # work shorter than this prints nothing


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """``with Progress("features", total=n, unit="img") as bar: ... bar.update(k)``.

    ``total`` counts the whole job's units (all processes' when they share it); ``update``
    takes the units done since the last call, scaled by ``processes`` when each process
    reports only its own share. ``stream`` None: standard error. ``interval`` and
    ``delay`` None: the terminal or log defaults above."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "img",
        stream: TextIO | None = None,
        interval: float | None = None,
        delay: float = DELAY,
        processes: int = 1,
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        default = TERMINAL_INTERVAL if self.terminal else LOG_INTERVAL
        self.interval = default if interval is None else interval
        self.delay, self.processes = delay, processes
        self.enabled = is_main_process()
        self.done = 0
        self.started = time.perf_counter()
        self._last_shown: float | None = None
        self._shown_any = False
        self._shown_done = -1  # the count the last shown line gave

    def update(self, count: int) -> None:
        self.done = min(self.total, self.done + count * self.processes) if self.total else 0
        now = time.perf_counter()
        if not self.enabled or now - self.started < self.delay:
            return
        if self._last_shown is not None and now - self._last_shown < self.interval:
            return
        self._show(now)

    def line(self, now: float | None = None) -> str:
        """The progress line: label, count, percent, rate and ETA."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _duration(left) if left == left else "?"
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%)  "
            f"{rate:,.0f} {self.unit}/s  elapsed {_duration(elapsed)}  eta {eta}"
        )

    def _show(self, now: float) -> None:
        text = self.line(now)
        if self.terminal:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_shown, self._shown_any, self._shown_done = now, True, self.done

    def close(self) -> None:
        """Show the final line (when anything was shown, or the work outlasted ``delay``),
        unless the last update showed it already; end a terminal's line."""
        now = time.perf_counter()
        if not self.enabled:
            return
        final = self.total if self.total else self.done
        if self._shown_done != final and (self._shown_any or now - self.started >= self.delay):
            self.done = final
            self._show(now)
        if self.terminal and self._shown_any:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
