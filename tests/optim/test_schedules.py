"""Learning-rate and momentum schedules at their landmarks."""

import math

from mocov3.optim.schedules import momentum_cosine, scaled_lr, warmup_cosine


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
