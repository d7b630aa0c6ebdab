"""Preemption: SIGTERM (what schedulers and torchrun send) or Ctrl-C asks the run to stop.

The handler only records the signal; the training loop finishes its step, every process
agrees to stop after the same one, a checkpoint is written and the run exits with status 0,
printing how to resume. A second signal raises ``KeyboardInterrupt`` at once (status 130):
an atomic write it cuts short leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.received`` is the first signal's number
    (None until one arrives). Outside the main thread, where Python cannot install signal
    handlers, it does nothing; on exit the previous handlers are back."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        """The received signal's name (SIGTERM when none was received)."""
        return signal.Signals(self.received).name if self.received else "SIGTERM"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum  # no printing here: a handler may interrupt a print

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        self._previous = {}


def preempted_summary(
    stop: StopSignals, step: int, total_steps: int, checkpoint: str | Path, processes: int
) -> dict[str, Any]:
    """What a long command that stopped on a signal reports (the same keys for every one):
    the signal, the steps done of the total, the checkpoint that continues it."""
    return {
        "preempted": True,
        "signal": stop.name if stop.received else None,
        "step": step,
        "total_steps": total_steps,
        "checkpoint": str(checkpoint),
        "processes": processes,
    }
