"""Linear probing of a frozen backbone (MoCo v3 protocol, with an lr sweep in one pass).

The backbone stays frozen in eval mode. By default its features are computed once and
cached (the probe without augmentation), so training the classifier costs next to nothing
and several classifiers, one per learning rate, are trained side by side on the same
batches: the weights are one ``[L, D, C]`` tensor, the loss is the sum of the L per-classifier
mean cross-entropies (so each classifier gets exactly its own gradient), and each gets its
own lr in the SGD update.

Recipe (paper, Sec. 4 and its reference ``main_lincls.py``): SGD with momentum 0.9, weight
decay 0, 90 epochs, batch 1024, cosine lr decay to 0 (here per iteration), lr given as a base
lr scaled by batch / 256 (the paper's ViT probe uses base lr ~3 without BatchNorm). A
parameter-free BatchNorm (``BatchNorm1d(affine=False)``: standardise with batch statistics
while training, running statistics at evaluation) sits before the classifier by default, as
MAE's probe does; it makes the probe far less sensitive to the lr. All classifiers see the
same features, so their BatchNorms would be identical: one is shared.

Model selection is honest: a seeded ``val_fraction`` of the training split is held out, the
lr is chosen on it alone, and the test split is evaluated once, with the chosen classifier.
The chosen classifier is *not* retrained on train + val (it is reported as trained on the
train part only). Afterwards the command checks that no backbone tensor changed.

``--augmented`` is the reference probe: every epoch the training features are recomputed
from RandomResizedCrop (scale 0.08-1) + horizontal-flip views of the training images, the
backbone still frozen in eval mode under ``no_grad``. That is one backbone pass over the
training set per epoch: meant for GPUs, slow on a CPU. ``--crop-scale LO HI`` changes the
crop's area range, e.g. to the one the backbone was pretrained with (the reference's 0.08
is the paper's ImageNet pretraining crop; a small-image preset crops far less).

Under torchrun each process extracts its share of the features, which are then shared,
and takes its slice of every batch: the BatchNorm's statistics and the gradients are summed
over the processes, so every process takes the one-process step.

``--features`` picks what the probe reads (:mod:`mocov3.eval.features`): the class token by
default, as the paper; DINO's ``cls+avgpool``, ``last4`` and ``last4+avgpool`` for
comparison.

:func:`probe_run` is the whole probe of an opened checkpoint, given :class:`ProbeSettings`:
``mocov3 linear`` and ``mocov3 study`` (its ``linear:`` block) both call it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mocov3.data.labelled import WHOLE, EvalSplit, Views
from mocov3.errors import ConfigError, DatasetError
from mocov3.eval.features import ProbeFeatures, snapshot, unchanged
from mocov3.eval.knn import local_features
from mocov3.eval.splits import labelled_splits
from mocov3.models.checkpoint import LoadedRun
from mocov3.runtime.device import resolve_device
from mocov3.runtime.distributed import (
    gather_rows,
    launched_info,
    rank_and_world,
    shard_range,
    sum_over_processes,
)
from mocov3.runtime.precision import eval_precision
from mocov3.runtime.progress import Progress

MOMENTUM = 0.9
INIT_STD = 0.01  # the reference initialises the classifier weight with N(0, 0.01), bias 0
DEFAULT_LRS_BN = (0.03, 0.1, 0.3, 1.0, 3.0)  # base lrs (x batch / 256) with the BatchNorm
DEFAULT_LRS_NO_BN = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # base lrs without it
AUG_SCALE = (0.08, 1.0)  # RandomResizedCrop of the reference probe


# ----------------------------------------------------------------------------- classifiers


@dataclass
class LinearProbes:
    """L trained linear classifiers (one per lr) behind one shared parameter-free BatchNorm."""

    weight: torch.Tensor  # [L, D, C]
    bias: torch.Tensor  # [L, C]
    lrs: tuple[float, ...]
    bn: nn.BatchNorm1d | None  # affine=False; in eval mode: running statistics

    @torch.no_grad()
    def logits(self, features: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``[L, N, C]`` logits of every classifier, or ``[N, C]`` of classifier ``index``."""
        x = features.float()
        if self.bn is not None:
            self.bn.eval()
            x = self.bn(x)
        if index is not None:
            return x @ self.weight[index] + self.bias[index]
        return torch.einsum("nd,ldc->lnc", x, self.weight) + self.bias[:, None, :]

    def accuracy(
        self, features: torch.Tensor, labels: torch.Tensor, index: int | None = None
    ) -> torch.Tensor:
        """Top-1 in percent: ``[L]`` for all classifiers, a 0-d tensor for ``index``."""
        predicted = self.logits(features, index).argmax(dim=-1)
        return 100.0 * (predicted == labels).float().mean(dim=-1)


def init_classifier(dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial ``[D, C]`` weight (N(0, 0.01) from a generator seeded with ``seed``, drawn
    first) and zero ``[C]`` bias. Every classifier of a sweep starts from this same point."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, num_classes, generator=generator) * INIT_STD
    return weight, torch.zeros(num_classes)


@torch.no_grad()
def standardise(x: torch.Tensor, bn: nn.BatchNorm1d, batch: int) -> torch.Tensor:
    """``bn`` (parameter-free) in training mode over a global batch of ``batch`` rows of
    which this process holds ``x``: the mean and the biased variance summed over the
    processes, the running statistics updated as ``nn.BatchNorm1d`` updates them (unbiased
    variance, its momentum). The features are constants, so no gradient flows here."""
    mean = sum_over_processes(x.sum(dim=0)) / batch
    var = sum_over_processes((x - mean).square().sum(dim=0)) / batch
    momentum = bn.momentum if bn.momentum is not None else 0.1
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
    bn.running_var.mul_(1.0 - momentum).add_(var * batch / max(batch - 1, 1), alpha=momentum)
    return (x - mean) / torch.sqrt(var + bn.eps)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``order``; a last batch of one sample (BatchNorm cannot
    standardise it) is dropped."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def train_linear_probes(
    train_x: torch.Tensor | Callable[[int], torch.Tensor],
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int = 90,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    batchnorm: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``len(lrs)`` linear classifiers side by side in one pass; validate each.

    ``lrs`` are the actual peak learning rates (no batch scaling here). ``train_x`` is the
    cached ``[N, D]`` feature tensor, or a callable ``epoch -> [N, D]`` for the augmented probe.
    SGD with momentum 0.9 and ``weight_decay`` on weight and bias (as ``torch.optim.SGD`` on
    the reference's ``nn.Linear``), the lr decaying per iteration as ``lr * 0.5 * (1 +
    cos(pi * t / T))``. Randomness: one generator seeded with ``seed`` draws the initial weight
    (:func:`init_classifier`), then one ``randperm`` per epoch; batches are consecutive slices
    of it, a trailing single sample being dropped.

    Returns ``{"val_top1": [L] list (percent; 0 for a classifier that diverged), "diverged":
    [L] list of bools, "probes": LinearProbes}``.
    """
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
        raise ValueError(f"lrs must be positive numbers, got {lrs}")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    n = int(train_y.shape[0])
    if n < 2:
        raise ValueError("linear probing needs at least 2 training samples")
    features_of = train_x if callable(train_x) else (lambda epoch: train_x)
    features = features_of(0)
    dim = int(features.shape[1])

    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, num_classes, generator=generator) * INIT_STD
    count = len(lrs)
    weight = w0.expand(count, dim, num_classes).clone().requires_grad_(True)
    bias = torch.zeros(count, num_classes, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    bn = nn.BatchNorm1d(dim, affine=False) if batchnorm else None
    peak = torch.tensor(lrs)

    steps_per_epoch = len(_batches(torch.arange(n), batch_size))
    total = epochs * steps_per_epoch
    step = 0
    rank, world = rank_and_world()
    progress = Progress(f"linear probes ({count} lrs)", epochs, unit="epochs")
    for epoch in range(epochs):
        if epoch > 0:
            features = features_of(epoch)
        order = torch.randperm(n, generator=generator)
        for index in _batches(order, batch_size):
            span = shard_range(len(index), rank, world)  # this process's part of the batch
            mine = index[span.start : span.stop]
            x = features[mine].float()
            if bn is not None:
                x = standardise(x, bn, len(index))
            logits = torch.einsum("nd,ldc->lnc", x, weight) + bias[:, None, :]
            loss = F.cross_entropy(
                logits.reshape(-1, num_classes), train_y[mine].repeat(count), reduction="sum"
            ) / len(index)
            grads = [sum_over_processes(g) for g in torch.autograd.grad(loss, (weight, bias))]
            lr = peak * (0.5 * (1.0 + math.cos(math.pi * step / total)))
            with torch.no_grad():
                for param, grad, buf, shape in zip(
                    (weight, bias), grads, buffers, ((-1, 1, 1), (-1, 1)), strict=True
                ):
                    if weight_decay:
                        grad = grad.add(param, alpha=weight_decay)
                    buf.mul_(MOMENTUM).add_(grad)
                    param.sub_(lr.view(shape) * buf)
            step += 1
        progress.update(1)
    progress.close()
    probes = LinearProbes(weight.detach(), bias.detach(), lrs, bn)
    diverged = [
        not (bool(torch.isfinite(weight[i]).all()) and bool(torch.isfinite(bias[i]).all()))
        for i in range(count)
    ]
    if len(val_y):
        accuracy = probes.accuracy(val_x, val_y).tolist()
        val_top1 = [0.0 if bad else acc for acc, bad in zip(accuracy, diverged, strict=True)]
    else:
        val_top1 = []
    return {"val_top1": val_top1, "diverged": diverged, "probes": probes}


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (train indices, val indices) of ``n`` samples, ``round(n * fraction)``
    (at least 1 when the fraction is positive) going to val; both sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 2:
        raise ValueError(f"{n} samples leave fewer than 2 to train on after the val split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return order[n_val:].sort().values, order[:n_val].sort().values


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    lrs: Sequence[float],
    val_fraction: float = 0.1,
    epochs: int = 90,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    batchnorm: bool = True,
    seed: int = 0,
    num_classes: int | None = None,
    augmented_features: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Sweep ``lrs`` (actual lrs), choose on a held-out val part, report test top-1 once.

    A seeded ``val_fraction`` of the training samples (not stratified) is held out; the
    classifiers train on the rest; the lr with the best val top-1 wins (ties: the first in
    ``lrs``). Only that classifier is evaluated on the test split, once; it is not retrained
    on train + val. ``val_fraction=0`` is allowed with a single lr (nothing to choose).

    ``augmented_features(epoch, train_indices)``: features of augmented views of the given
    training samples for that epoch (the augmented probe); the val part always uses the
    clean ``train_feats``.

    Returns ``{"linear_top1", "best_lr", "val_top1_per_lr": {lr: top1}, "val_top1",
    "diverged_lrs", "train_samples", "val_samples", "probes"}`` (accuracies in percent).
    """
    lrs = tuple(float(lr) for lr in lrs)
    if val_fraction == 0 and len(lrs) > 1:
        raise ValueError("choosing among several lrs needs a val split (val_fraction > 0)")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_idx, val_idx = split_train_val(len(train_labels), val_fraction, seed)
    train_x: torch.Tensor | Callable[[int], torch.Tensor] = train_feats[train_idx]
    if augmented_features is not None:
        augment = augmented_features
        train_x = lambda epoch: augment(epoch, train_idx)  # noqa: E731
    sweep = train_linear_probes(
        train_x,
        train_labels[train_idx],
        train_feats[val_idx],
        train_labels[val_idx],
        num_classes,
        lrs,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        batchnorm=batchnorm,
        seed=seed,
    )
    val_top1 = sweep["val_top1"]
    best = max(range(len(lrs)), key=lambda i: (val_top1[i], -i)) if val_top1 else 0
    probes: LinearProbes = sweep["probes"]
    test_top1 = probes.accuracy(test_feats, test_labels, index=best).item()  # the one time
    return {
        "linear_top1": test_top1,
        "best_lr": lrs[best],
        "val_top1_per_lr": dict(zip(lrs, val_top1, strict=True)) if val_top1 else {},
        "val_top1": val_top1[best] if val_top1 else None,
        "diverged_lrs": [lr for lr, bad in zip(lrs, sweep["diverged"], strict=True) if bad],
        "train_samples": len(train_idx),
        "val_samples": len(val_idx),
        "probes": probes,
    }


# ----------------------------------------------------------------------------- features


def split_features(
    backbone: nn.Module,
    split: EvalSplit,
    device: torch.device,
    batch_size: int,
    precision: str,
    label: str,
    indices: torch.Tensor | None = None,
    views: Views = WHOLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32: 2 GB for ImageNet's 1.28M x 384) of ``split``'s images
    ``indices`` (all by default), each process extracting its share, then shared by all:
    ``(features [n, D], indices [n])``, a streamed split's unreadable images left out."""
    features, kept = local_features(
        backbone, split, device, batch_size, precision, label, dtype=torch.float32,
        unit_norm=False, views=views, indices=indices,
    )  # fmt: skip
    return gather_rows(features), gather_rows(kept)


def augmented_features(
    backbone: nn.Module,
    split: EvalSplit,
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    device: torch.device,
    batch_size: int = 512,
    precision: str = "fp32",
    crop_scale: Sequence[float] = AUG_SCALE,
) -> torch.Tensor:
    """Features of ``split``'s images ``indices`` after RandomResizedCrop (area
    ``crop_scale``, the reference's 0.08-1 by default) + flip (p 0.5), shared by every
    process: ``[len(indices), D]`` float32 on the CPU.

    The views depend only on (seed, epoch, index) (counter-based, as pretraining's); the
    backbone is put in eval mode and run under ``no_grad``.
    """
    views = Views("crop", (float(crop_scale[0]), float(crop_scale[1])), seed, epoch)
    features, kept = split_features(
        backbone, split, device, batch_size, precision, f"augmented views, epoch {epoch}",
        indices, views,
    )  # fmt: skip
    if not torch.equal(kept, indices):
        raise DatasetError(
            f"{len(indices) - len(kept)} training images could not be read again for the "
            "augmented probe: check the files (or drop --augmented)"
        )
    return features


def probe_backbone(
    backbone: nn.Module,
    train_set: EvalSplit,
    test_set: EvalSplit,
    lrs: Sequence[float],
    device: torch.device,
    precision: str = "fp32",
    feature_batch_size: int = 512,
    augmented: bool = False,
    crop_scale: Sequence[float] = AUG_SCALE,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Snapshot the backbone, extract features (eval mode, each process its share),
    :func:`linear_probe` (the same on every process), then check that no backbone tensor
    changed (``backbone_unchanged``). ``lrs`` are actual lrs; ``crop_scale`` is the
    augmented probe's crop area range."""
    before = snapshot(backbone)
    args = (device, feature_batch_size, precision)
    train_feats, train_kept = split_features(backbone, train_set, *args, "probe features, train")
    test_feats, test_kept = split_features(backbone, test_set, *args, "probe features, test")
    assert train_set.labels is not None and test_set.labels is not None
    aug = None
    if augmented:
        seed = int(probe_kwargs.get("seed", 0))

        def aug(epoch: int, rows: torch.Tensor) -> torch.Tensor:
            return augmented_features(
                backbone, train_set, train_kept[rows], epoch, seed, *args, crop_scale=crop_scale
            )

    result = linear_probe(
        train_feats,
        train_set.labels[train_kept],
        test_feats,
        test_set.labels[test_kept],
        lrs,
        augmented_features=aug,
        **probe_kwargs,
    )
    result["backbone_unchanged"] = unchanged(backbone, before)
    result["test_samples"] = len(test_kept)
    return result


# ----------------------------------------------------------------------------- command


def result_file_name(features: str, augmented: bool = False) -> str:
    """``linear.json`` for the paper's class-token probe on cached features; other feature
    kinds and the augmented probe write beside it (``linear-last4.json``,
    ``linear-cls-avgpool.json``, ``linear-augmented.json``, ``linear-last4-augmented.json``)
    instead of replacing it."""
    parts = ["linear"] if features == "cls" else ["linear", features.replace("+", "-")]
    if augmented:
        parts.append("augmented")
    return "-".join(parts) + ".json"


def write_result(run: LoadedRun, settings: ProbeSettings, summary: dict[str, Any]) -> Path:
    """Write a probe's summary as one JSON line beside the checkpoint, in the file
    :func:`result_file_name` names for its features and protocol."""
    path = run.run_dir / result_file_name(settings.features, settings.augmented)
    path.write_text(json.dumps(summary) + "\n")
    return path


@dataclass(frozen=True)
class ProbeSettings:
    """How :func:`probe_run` probes a checkpoint: the ``mocov3 linear`` options (its
    defaults are the paper's recipe, with the BatchNorm) and the ``linear:`` block of a
    study (:mod:`mocov3.tools.study`) both become one of these."""

    base_lrs: tuple[float, ...] = DEFAULT_LRS_BN  # each scaled by batch_size / 256
    epochs: int = 90
    batch_size: int = 1024
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    batchnorm: bool = True
    augmented: bool = False
    crop_scale: tuple[float, float] | None = None  # the augmented probe's; None: AUG_SCALE
    features: str = "cls"
    encoder: str = "query"
    device: str | None = None  # None: the run's train.device

    def check(self) -> None:
        """Raise ConfigError, in one line naming the option, for a value that cannot work."""
        lrs = self.base_lrs
        if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
            raise ConfigError(f"--lrs must be positive, got {list(lrs)}")
        if len(set(lrs)) != len(lrs):
            raise ConfigError(f"--lrs has repeated values: {list(lrs)}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be >= 2, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.val_fraction < 1.0 or (self.val_fraction == 0 and len(lrs) > 1):
            raise ConfigError(
                f"--val-fraction must be in (0, 1) (0 only with a single lr), got "
                f"{self.val_fraction}"
            )
        if self.crop_scale is not None:
            if not self.augmented:  # the cached probe sees whole images: no crop to change
                raise ConfigError("--crop-scale applies to the augmented probe: add --augmented")
            low, high = self.crop_scale
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(
                    f"--crop-scale must be LO HI with 0 < LO <= HI <= 1, got {low} {high}"
                )


def probe_run(run: LoadedRun, settings: ProbeSettings) -> dict[str, Any]:
    """Linear-probe the backbone of an opened checkpoint on its own data (``run.config``,
    overrides applied; ``eval.test_subset`` honoured) and return the summary that ``mocov3
    linear`` writes: test top-1 of the classifier chosen on the held-out part, the chosen
    *base* lr, every lr's val top-1, and whether the backbone stayed unchanged."""
    started = time.perf_counter()
    settings.check()
    config = run.config
    try:  # refused before any data is read
        features = ProbeFeatures(run.backbone(settings.encoder), settings.features)
    except ValueError as error:  # e.g. token features asked of a ResNet
        raise ConfigError(str(error)) from error
    device = resolve_device(settings.device or config.train.device, launched_info())
    features = features.to(device)
    precision = eval_precision(config.train.precision, device)
    normalisation = (run.state["mean"], run.state["std"])
    train_set, test_set = labelled_splits(
        config, "linear probing", run.in_chans, normalisation, config.eval.test_subset
    )

    scale = settings.batch_size / 256.0  # the linear scaling rule: lr = base lr * batch / 256
    crop_scale = settings.crop_scale or AUG_SCALE  # what the augmented probe crops
    by_actual = {lr * scale: lr for lr in settings.base_lrs}
    try:
        result = probe_backbone(
            features,
            train_set,
            test_set,
            list(by_actual),
            device,
            precision=precision,
            feature_batch_size=config.eval.batch_size,
            augmented=settings.augmented,
            crop_scale=crop_scale,
            val_fraction=settings.val_fraction,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            weight_decay=settings.weight_decay,
            batchnorm=settings.batchnorm,
            seed=config.train.seed,
            num_classes=train_set.num_classes,
        )
    except ValueError as error:  # e.g. too few samples for the val split
        raise ConfigError(str(error)) from error
    return {
        "linear_top1": round(result["linear_top1"], 2),
        "best_lr": by_actual[result["best_lr"]],
        "lr_scale": scale,
        "val_top1_per_lr": {
            str(by_actual[lr]): round(acc, 2) for lr, acc in result["val_top1_per_lr"].items()
        },
        "diverged_lrs": [by_actual[lr] for lr in result["diverged_lrs"]],
        "backbone_unchanged": result["backbone_unchanged"],
        "encoder": settings.encoder,
        "features": settings.features,
        "feature_dim": int(result["probes"].weight.shape[1]),
        "batchnorm": settings.batchnorm,
        "augmented": settings.augmented,
        "crop_scale": list(crop_scale) if settings.augmented else None,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "weight_decay": settings.weight_decay,
        "train_images": result["train_samples"],
        "val_images": result["val_samples"],
        "test_images": result["test_samples"],
        "streamed": train_set.streamed,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
