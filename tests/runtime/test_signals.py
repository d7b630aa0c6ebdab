"""Preemption signals on their own: recorded, not acted on, and the handlers put back."""

from __future__ import annotations

import os
import signal

import pytest

from mocov3.runtime.signals import StopSignals


def test_the_first_signal_is_recorded_the_second_interrupts_and_handlers_return():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        assert stop.received is None and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ctrl_c_is_named():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.name == "SIGINT"
