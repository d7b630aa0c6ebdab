"""Per-iteration schedule arrays (one value per optimisation step, DINO style).

The paper (and its reference code) updates lr and momentum every iteration using the
fractional epoch ``t = step / steps_per_epoch``.
"""

from __future__ import annotations

import numpy as np


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256.0


def warmup_cosine(
    peak: float, total_steps: int, warmup_steps: int, final: float = 0.0
) -> np.ndarray:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine to ``final``.

    Step s of the warmup gets ``peak * s / warmup_steps`` (0 at step 0, as the reference);
    step s after it gets ``final + (peak - final) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)``.
    """
    if total_steps <= 0:
        raise ValueError("a schedule needs at least one step")
    warmup_steps = min(warmup_steps, total_steps)
    steps = np.arange(total_steps, dtype=np.float64)
    warm = peak * steps[:warmup_steps] / max(warmup_steps, 1)
    decay_len = max(total_steps - warmup_steps, 1)
    progress = (steps[warmup_steps:] - warmup_steps) / decay_len
    cosine = final + (peak - final) * 0.5 * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warm, cosine])


def momentum_cosine(base_momentum: float, total_steps: int, cosine: bool = True) -> np.ndarray:
    """m(t) = 1 - 0.5 * (1 + cos(pi * t / T)) * (1 - m0): m0 at step 0, rising to 1.0."""
    if not cosine:
        return np.full(total_steps, base_momentum, dtype=np.float64)
    progress = np.arange(total_steps, dtype=np.float64) / total_steps
    return 1.0 - 0.5 * (1.0 + np.cos(np.pi * progress)) * (1.0 - base_momentum)
