"""Learning-rate and momentum schedules at their landmarks."""

import math

import numpy as np
import pytest

from mocov3.optim.schedules import (
    continue_cosine,
    momentum_cosine,
    relay_momentum,
    relay_warmup_cosine,
    scaled_lr,
    warmup_cosine,
)


def test_lr_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == 1.5e-4 * 16


def test_warmup_cosine_landmarks():
    lr = warmup_cosine(peak=1.0, total_steps=100, warmup_steps=20)
    assert len(lr) == 100
    assert lr[0] == 0.0
    assert math.isclose(lr[10], 0.5)
    assert math.isclose(lr[20], 1.0)  # end of warmup: the peak
    assert math.isclose(lr[60], 0.5)  # middle of the cosine
    assert math.isclose(lr[99], 0.5 * (1 + math.cos(math.pi * 79 / 80)))
    assert lr[99] < 1e-3 and all(a >= b for a, b in zip(lr[20:], lr[21:], strict=False))


def test_momentum_cosine_landmarks():
    m = momentum_cosine(0.99, total_steps=100)
    assert math.isclose(m[0], 0.99)
    assert math.isclose(m[50], 0.995)  # halfway: 1 - 0.5 * 0.01
    assert m[99] > 0.99999 and m[99] < 1.0
    assert all(a <= b for a, b in zip(m, m[1:], strict=False))
    assert all(v == 0.99 for v in momentum_cosine(0.99, 10, cosine=False))


def test_continue_cosine_runs_from_its_start_to_its_end():
    down = continue_cosine(0.8, 0.1, 101)
    assert down[0] == 0.8 and down[-1] == 0.1 and math.isclose(down[50], 0.45)
    assert np.all(np.diff(down) <= 0)
    up = continue_cosine(0.99, 1.0, 50)
    assert up[0] == 0.99 and up[-1] == 1.0 and np.all(np.diff(up) >= 0)
    assert list(continue_cosine(0.5, 0.0, 1)) == [0.0]
    with pytest.raises(ValueError):
        continue_cosine(0.5, 0.0, 0)


def test_a_schedule_laid_again_keeps_its_past_and_never_turns_back():
    lr = warmup_cosine(peak=1.0, total_steps=100, warmup_steps=20, final=0.01)
    # after the warmup, shorter or longer: from the current value down to the end
    for total in (60, 300):
        again = relay_warmup_cosine(lr, 50, total, 20, peak=1.0, final=0.01)
        assert len(again) == total and np.array_equal(again[:51], lr[:51])
        assert np.all(np.diff(again[20:]) <= 0) and again[-1] == 0.01
    # inside the warmup: on to the same peak at the new warmup end, then down
    again = relay_warmup_cosine(lr, 10, 200, 40, peak=1.0, final=0.01)
    assert np.array_equal(again[:11], lr[:11]) and np.all(np.diff(again[:41]) > 0)
    assert again[40] == 1.0 and np.all(np.diff(again[40:]) <= 0) and again[-1] == 0.01
    # an lr below the final value does not climb to it
    low = relay_warmup_cosine(lr, 1, 30, 1, peak=1.0, final=0.5)
    assert np.all(low[1:] == lr[1])
    momentum = momentum_cosine(0.99, 100)
    for total in (60, 300):
        again = relay_momentum(momentum, 50, total)
        assert np.array_equal(again[:51], momentum[:51]) and again[-1] == 1.0
        assert np.all(np.diff(again) >= 0)
    assert np.all(relay_momentum(np.full(100, 0.99), 50, 70, cosine=False) == 0.99)
    with pytest.raises(ValueError, match="from step 100"):
        relay_momentum(momentum, 100, 120)
