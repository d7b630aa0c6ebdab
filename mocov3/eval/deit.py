"""The regularisers of DeiT's fine-tuning recipe, as timm implements them.

DeiT (Touvron et al., ICML 2021, ``main.py``) fine-tunes with Mixup (alpha 0.8) and CutMix
(alpha 1.0) switched per batch with probability 0.5, label smoothing 0.1 folded into their
soft targets, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing (p 0.25, per-pixel
normal noise) and stochastic depth 0.1; MoCo v3 (Chen, Xie, He, ICCV 2021, Sec. 4) uses
that recipe unchanged. timm's objects are used as they are (the same code DeiT runs);
RandAugment itself runs where images are cut (:func:`mocov3.data.labelled.rand_augment`).

Determinism. timm's pieces draw from Python's ``random``, NumPy's and torch's global
generators. :func:`seed_step` seeds all three from (seed, step, rank) right before a step's
Mixup/CutMix, random erasing and forward pass (drop path), so a resumed run draws exactly
what the uninterrupted one drew. Mixup/CutMix pair the images of each process's batch (the
batch flipped), as DeiT under DDP does, and each process draws its own lambda: a run on W
processes matches a run on one only in distribution. With them, erasing and drop path off,
every remaining draw is per sample (:func:`~mocov3.data.counters.sample_keys`) and the runs
agree up to floating-point summation order.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from mocov3.data.counters import sample_keys
from mocov3.errors import ConfigError

DEIT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
MIXUP_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("pixel", "rand", "const")
_STEP_DOMAIN = 0x5EED_57E9  # keeps step seeds apart from the per-sample keys of (seed, epoch)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 64-bit seed that is a function of (seed, step, rank) only (splitmix64-hashed)."""
    key = sample_keys(seed ^ _STEP_DOMAIN, step, torch.tensor([rank]))
    return int(key[0]) & ((1 << 64) - 1)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device) for one step."""
    value = step_seed(seed, step, rank)
    random.seed(value)
    np.random.seed([value & 0xFFFFFFFF, value >> 32])
    torch.manual_seed(value)


def check_rand_augment(config: str | None) -> None:
    """Refuse, in one line, a RandAugment string timm cannot parse (before any data is read)."""
    if not config:
        return
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(config, {"translate_const": 10, "img_mean": (128, 128, 128)})
    except Exception as error:  # noqa: BLE001  timm asserts or raises on bad strings
        raise ConfigError(
            f"--rand-augment {config!r} is not a timm RandAugment string (e.g. "
            f"{DEIT_RAND_AUGMENT}): {type(error).__name__} {error}".strip()
        ) from None


def build_mixup(
    mixup: float,
    cutmix: float,
    prob: float,
    switch_prob: float,
    mode: str,
    label_smoothing: float,
    num_classes: int,
) -> Any:
    """timm's ``Mixup`` (soft targets with label smoothing), or None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def build_erasing(probability: float, mode: str, device: torch.device) -> Any:
    """timm's ``RandomErasing`` for a normalised batch on ``device`` (one box per image, as
    DeiT's ``re_count`` 1, no split), or None when ``probability`` is 0."""
    if probability <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(
        probability=probability, mode=mode, max_count=1, num_splits=0, device=str(device)
    )


def build_criterion(label_smoothing: float, soft_targets: bool = False) -> nn.Module:
    """timm's ``SoftTargetCrossEntropy`` for Mixup's soft targets (they carry the smoothing),
    else cross-entropy with ``label_smoothing`` (DeiT: 0.1)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing {label_smoothing} must be in [0, 1)")
    if soft_targets:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class Regularisers:
    """A step's batch-level augmentation on the normalised batch, drawn after
    :func:`seed_step`, in DeiT's order: random erasing (per image, in its transform), then
    Mixup/CutMix of the batch (in its training loop)."""

    def __init__(self, mixup: Any, erasing: Any) -> None:
        self.mixup, self.erasing = mixup, erasing

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            x = self.erasing(x)
        if self.mixup is not None:
            if len(x) % 2:  # timm mixes pairs: an odd batch (unreadable images) loses one
                x, labels = x[:-1], labels[:-1]
            x, labels = self.mixup(x, labels)
        return x, labels
