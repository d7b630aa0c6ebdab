"""Per-iteration schedule arrays (one value per optimisation step, DINO style).

The paper (and its reference code) updates lr and momentum every iteration using the
fractional epoch ``t = step / steps_per_epoch``. A schedule can be laid again from a step
on over a new length (a time budget's re-plan): the values already used stay, and the rest
continues from the current value, so a laid-again lr never rises after its warmup and a
laid-again momentum never falls.
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


def continue_cosine(start: float, final: float, steps: int) -> np.ndarray:
    """A half-cosine over ``steps`` values from ``start`` (the first) to ``final`` (the
    last): ``final + (start - final) * 0.5 * (1 + cos(pi * i / (steps - 1)))``, held
    monotone against rounding (falling when ``start >= final``, else rising); one step is
    ``[final]``."""
    if steps <= 0:
        raise ValueError("a schedule needs at least one step")
    if steps == 1:
        return np.array([final], dtype=np.float64)
    progress = np.arange(steps, dtype=np.float64) / (steps - 1)
    values = final + (start - final) * 0.5 * (1.0 + np.cos(np.pi * progress))
    values[0], values[-1] = start, final
    monotone = np.minimum if start >= final else np.maximum
    return monotone.accumulate(values)


def relay_warmup_cosine(
    lr: np.ndarray, step: int, total_steps: int, warmup_steps: int, peak: float, final: float
) -> np.ndarray:
    """``lr`` laid again from ``step`` over ``total_steps``: the values before ``step``
    kept; when the warmup runs on (``warmup_steps > step``) a line from ``lr[step]`` up to
    ``peak`` at ``warmup_steps``, then :func:`continue_cosine` from ``peak`` to ``final``;
    otherwise :func:`continue_cosine` from ``lr[step]`` down to ``final`` (or to ``lr[step]``
    itself when that is lower: the lr does not rise after its warmup)."""
    if not 0 <= step < min(len(lr), total_steps):
        raise ValueError(f"cannot lay a {total_steps}-step schedule again from step {step}")
    start = float(lr[step])
    warmup_steps = min(warmup_steps, total_steps)
    if warmup_steps <= step:
        tail = continue_cosine(start, min(final, start), total_steps - step)
        return np.concatenate([lr[:step], tail])
    ramp = start + (peak - start) * np.arange(warmup_steps - step) / (warmup_steps - step)
    decay = total_steps - warmup_steps
    tail = continue_cosine(peak, final, decay) if decay else np.empty(0)
    return np.concatenate([lr[:step], ramp, tail])


def relay_momentum(
    momentum: np.ndarray, step: int, total_steps: int, cosine: bool = True
) -> np.ndarray:
    """``momentum`` laid again from ``step`` over ``total_steps``: the values before
    ``step`` kept, then :func:`continue_cosine` from ``momentum[step]`` up to 1.0 (it never
    falls); constant at the schedule's value when ``cosine`` is off."""
    if not 0 <= step < min(len(momentum), total_steps):
        raise ValueError(f"cannot lay a {total_steps}-step schedule again from step {step}")
    if not cosine:
        return np.full(total_steps, momentum[0], dtype=np.float64)
    tail = continue_cosine(float(momentum[step]), 1.0, total_steps - step)
    return np.concatenate([momentum[:step], tail])
