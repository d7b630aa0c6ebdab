"""End-to-end fine-tuning of a pretrained ViT, and the same recipe from random init.

The paper (Chen, Xie, He, ICCV 2021, Sec. 4 / Table 4) fine-tunes with the DeiT recipe
(ViT-B, 150 epochs -> 83.2% on ImageNet). This module follows the parts of it that
matter at every scale, as MAE and BEiT also do:

* the whole network trains (backbone + a new linear ``head``) with AdamW, betas
  (0.9, 0.999), weight decay 0.05, lr = base_lr * batch / 256 with linear warmup and a
  per-iteration cosine decay;
* layer-wise lr decay (BEiT/MAE): patch embedding and tokens are layer 0, block i is layer
  i + 1, the final norm and the head are layer depth + 1, and layer l gets
  ``lr * layer_decay ** (depth + 1 - l)``; biases, norms, cls_token and pos_embed get no
  weight decay;
* stochastic depth (drop path, rate rising linearly over the blocks) and label smoothing;
* RandomResizedCrop + horizontal flip, batched on the training device with per-sample
  counter-based randomness (``sample_keys(seed, epoch, index)``).

ResNet backbones (``model.arch: resnet*``) get the same recipe with the layer-wise decay
applied per stage (stem 0, ``layer1``-``layer4`` 1-4, head 5) and no drop path (torchvision's
ResNet has none; ``--drop-path`` defaults to 0 for them and a non-zero value is refused).

Left out of DeiT's recipe: RandAugment, mixup/cutmix, random erasing and repeated
augmentation (ImageNet-scale regularisers that hurt tiny models on small data).

``--from-scratch`` builds the same architecture from random init and runs exactly the same
recipe (epochs, batch, lr, schedule, augmentation, seed), so ``finetune_top1 -
scratch_top1`` measures what pretraining is worth instead of assuming it.

Defaults are for small data (Fashion-MNIST-sized sets, tiny ViTs, a few hundred steps on a
CPU), chosen by measurement, not copied from ImageNet: base lr 1e-2, layer decay 0.75, 10
epochs with 1 warmup epoch, batch 128, drop path 0.1, label smoothing 0.1, and crop scale
(1, 1), i.e. flip only. On the tiny preset (2-epoch pretraining, 2048 images, 10 epochs,
seed 0, 2-core CPU, 2026-11-26) base lr 1e-3 with crop scale (0.25, 1) reached 45.1% top-1,
4e-3 62.7%, 1e-2 with (0.5, 1) 65.5%, with (0.8, 1) 72.7% and 1e-2 flip-only 77.0%: at 28 px
and this budget the tiny ViT underfits, and cropping costs more than it regularises. The
ImageNet ViT-B recipe is ``--lr 5e-4 --layer-decay 0.65 --crop-min 0.08`` (MAE; DeiT
reports its lr as 5e-4 per 512 images), 100-300 epochs.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mocov3.config import is_resnet_arch
from mocov3.data.augment import crop_flip_views, normalize
from mocov3.data.counters import sample_keys
from mocov3.data.images import ImageDataset
from mocov3.data.sampling import epoch_order
from mocov3.data.sources import load_data
from mocov3.errors import ConfigError, DatasetError, TrainingError
from mocov3.models.checkpoint import LoadedRun
from mocov3.models.moco import build_backbone, feature_dim
from mocov3.models.resnet import is_resnet
from mocov3.models.vit import DropPath
from mocov3.optim.schedules import scaled_lr, warmup_cosine
from mocov3.runtime.device import seed_everything
from mocov3.runtime.precision import autocast_context, check_precision, resolve_precision

_HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init (trunc normal), bias zero

# Config keys ``--set`` may change. Everything else the fine-tuning recipe takes from its
# own flags; accepting e.g. optim.base_lr and then ignoring it would be a silent no-op.
SETTABLE_PREFIXES = ("data.",)
SETTABLE_KEYS = (
    "train.precision",
    "train.device",
    "train.threads",
    "eval.batch_size",
    "eval.test_subset",
)
FLAG_FOR_KEY = {
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "train.seed": "--seed",
    "optim.base_lr": "--lr",
    "optim.weight_decay": "--weight-decay",
    "optim.warmup_epochs": "--warmup-epochs",
    "model.drop_path_rate": "--drop-path",
    "augment.crop_scale": "--crop-min",
}


# ----------------------------------------------------------------------------- model


class FineTuneModel(nn.Module):
    """A backbone (class-token features ``[B, D]``) and a linear classifier ``head``."""

    def __init__(self, backbone: nn.Module, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), num_classes)
        # Own generator: the head starts identical whether the backbone was loaded or built
        # from random init (which draws from the global generator).
        generator = torch.Generator().manual_seed(seed)
        nn.init.trunc_normal_(self.head.weight, std=_HEAD_INIT_STD, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def set_drop_path(backbone: nn.Module, rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), as
    timm/DeiT, set on the existing ``DropPath`` modules; returns the per-block rates."""
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"--drop-path {rate} must be in [0, 1)")
    if is_resnet(backbone):
        if rate > 0:
            raise ConfigError("a ResNet backbone has no stochastic depth: use --drop-path 0")
        return []
    blocks = list(backbone.blocks)
    rates = torch.linspace(0, rate, len(blocks)).tolist()
    for block, block_rate in zip(blocks, rates, strict=True):
        paths = [m for m in block.modules() if isinstance(m, DropPath)]
        if not paths:
            raise ConfigError("this backbone has no DropPath modules to set --drop-path on")
        for module in paths:
            module.rate = float(block_rate)
    return rates


def build_criterion(label_smoothing: float) -> nn.CrossEntropyLoss:
    """Cross-entropy with ``label_smoothing`` (DeiT: 0.1)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing {label_smoothing} must be in [0, 1)")
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _resnet_layer_id(name: str) -> int:
    """Per-stage ids for a ResNet: stem (conv1, bn1) 0, ``layerK`` K, the head 5."""
    parts = name.split(".")
    if parts[0] == "backbone":
        parts = parts[1:]
    if parts[0].startswith("layer"):
        return int(parts[0][len("layer") :])
    return 0 if parts[0] in ("conv1", "bn1") else 5


def _layer_id(name: str, depth: int) -> int:
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if parts[0] == "backbone":
        parts = parts[1:]
    if parts[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    return depth + 1  # final norm, head


def _no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim <= 1 or name.split(".")[-1] in ("cls_token", "pos_embed")


def layer_decay_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups with BEiT/MAE layer-wise lr decay.

    ``model`` is a :class:`FineTuneModel` (or a bare ViT). Each group holds one layer's
    tensors with or without weight decay: ``lr = base_lr * lr_scale``,
    ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; ``names`` lists its tensors.
    Frozen tensors (the sin-cos position table) are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"--layer-decay {layer_decay} must be in (0, 1]")
    backbone = getattr(model, "backbone", model)
    resnet = is_resnet(backbone)
    depth = 4 if resnet else len(backbone.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = _resnet_layer_id(name) if resnet else _layer_id(name, depth)
        decay = not _no_weight_decay(name, parameter)
        if (layer, decay) not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[(layer, decay)] = {
                "params": [],
                "names": [],
                "layer_id": layer,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[(layer, decay)]["params"].append(parameter)
        groups[(layer, decay)]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------- settings


@dataclass
class FineTuneSettings:
    """The fine-tuning recipe; identical for the pretrained and the from-scratch run."""

    epochs: float = 10.0
    batch_size: int = 128
    base_lr: float = 1e-2  # lr = base_lr * batch_size / 256
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    crop_min: float = 1.0  # RandomResizedCrop scale (crop_min, 1); 1: flip only
    seed: int = 0
    from_scratch: bool = False
    encoder: str = "query"  # which pretrained backbone to start from

    def validate(self) -> None:
        checks = (
            (self.epochs > 0, f"--epochs {self.epochs} must be positive"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1"),
            (self.base_lr > 0, f"--lr {self.base_lr} must be positive"),
            (0.0 < self.layer_decay <= 1.0, f"--layer-decay {self.layer_decay} not in (0, 1]"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0"),
            (0.0 <= self.drop_path < 1.0, f"--drop-path {self.drop_path} not in [0, 1)"),
            (
                0.0 <= self.label_smoothing < 1.0,
                f"--label-smoothing {self.label_smoothing} not in [0, 1)",
            ),
            (
                0.0 <= self.warmup_epochs <= self.epochs,
                f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs}]",
            ),
            (0.0 < self.crop_min <= 1.0, f"--crop-min {self.crop_min} must be in (0, 1]"),
            (self.encoder in ("query", "momentum"), "--encoder must be query or momentum"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def build_model(run: LoadedRun, num_classes: int, settings: FineTuneSettings) -> FineTuneModel:
    """The network to fine-tune: the checkpoint's backbone (a copy; ``run`` is untouched) or,
    with ``from_scratch``, the same architecture freshly initialised from ``settings.seed``.
    Drop path is set and the patch projection made trainable in both cases."""
    if settings.from_scratch:
        seed_everything(settings.seed)
        backbone = build_backbone(run.config, run.in_chans)
    else:
        backbone = copy.deepcopy(run.backbone(settings.encoder))
    # Every tensor trains, the patch projection included: the frozen random projection is
    # a *pretraining* stability trick (paper Sec. 5.1), and DeiT fine-tuning trains it. (A
    # momentum encoder's copy has requires_grad False everywhere, so set all of them.) The
    # sin-cos position table stays fixed: it is a constant, not a learned tensor.
    fixed_table = getattr(backbone, "pos_embed_type", None) == "sincos"
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad = not (fixed_table and name == "pos_embed")
    set_drop_path(backbone, settings.drop_path)
    return FineTuneModel(backbone, num_classes, seed=settings.seed)


# ----------------------------------------------------------------------------- data


def _labelled_splits(run: LoadedRun) -> tuple[ImageDataset, ImageDataset, int]:
    config = run.config
    train_set, test_set = load_data(config)
    if train_set.labels is None or test_set is None or test_set.labels is None:
        raise DatasetError(
            f"data '{config.data.name}' needs labelled train and test splits for fine-tuning"
        )
    in_chans = run.in_chans
    if train_set.channels != in_chans:
        raise DatasetError(
            f"the data has {train_set.channels} channels but the checkpoint's model takes "
            f"{in_chans}; add --set data.channels={in_chans}"
        )
    if config.eval.test_subset:
        test_set = test_set.subset(config.eval.test_subset)
    num_classes = max(len(train_set.classes), int(train_set.labels.max()) + 1)
    if int(test_set.labels.max()) >= num_classes:
        raise DatasetError("the test split has classes the training split lacks")
    return train_set, test_set, num_classes


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    precision: str,
    batch_size: int = 512,
) -> float:
    """Top-1 (%) in eval mode on whole (uncropped) images."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(dataset), batch_size):
            images = dataset.images[start : start + batch_size].to(device)
            labels = dataset.labels[start : start + batch_size].to(device)
            with autocast_context(device, precision):
                logits = model(normalize(images, mean, std))
            correct += int((logits.argmax(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(dataset), 1)


def finetune(
    run: LoadedRun, settings: FineTuneSettings, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], FineTuneModel]:
    """Fine-tune (or train from scratch) and evaluate once on the test split.

    Returns the result dict (``finetune_top1`` or ``scratch_top1`` and the recipe) and the
    trained model.
    """
    started = time.perf_counter()
    settings.validate()
    device = torch.device(device)
    config = run.config
    check_precision(config.train.precision, device)
    precision = resolve_precision(config.train.precision, device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    train_set, test_set, num_classes = _labelled_splits(run)
    batch = settings.batch_size
    steps_per_epoch = len(train_set) // batch  # drop_last
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {batch} exceeds the {len(train_set)} training images; lower it"
        )
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    peak_lr = scaled_lr(settings.base_lr, batch)
    lr = warmup_cosine(peak_lr, total_steps, round(settings.warmup_epochs * steps_per_epoch))

    model = build_model(run, num_classes, settings).to(device)
    groups = layer_decay_param_groups(model, peak_lr, settings.weight_decay, settings.layer_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=peak_lr, betas=(0.9, 0.999), fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = build_criterion(settings.label_smoothing)
    mean, std = train_set.mean, train_set.std
    seed_everything(settings.seed)  # drop-path masks: same stream for both runs

    model.train()
    train_tic = time.perf_counter()
    loss_value, epoch_losses = math.nan, []
    for step in range(total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0:
            order = epoch_order(settings.seed, epoch, len(train_set))
        indices = order[index * batch : (index + 1) * batch]
        images = train_set.images[indices].to(device, non_blocking=True)
        labels = train_set.labels[indices].to(device, non_blocking=True)
        keys = sample_keys(settings.seed, epoch, indices)
        x = crop_flip_views(images, keys, (settings.crop_min, 1.0), mean, std)
        for group in optimizer.param_groups:
            group["lr"] = float(lr[step]) * group["lr_scale"]
        with autocast_context(device, precision):
            loss = criterion(model(x).float(), labels)
        if not torch.isfinite(loss):
            raise TrainingError(f"fine-tuning loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_value = loss.item()
        epoch_losses.append(loss_value)
        if index == steps_per_epoch - 1 or step == total_steps - 1:
            print(
                f"epoch {(step + 1) / steps_per_epoch:.2f}  loss {np.mean(epoch_losses):.4f}  "
                f"lr {lr[step]:.2e}",
                file=sys.stderr,
            )
            epoch_losses = []
    train_seconds = time.perf_counter() - train_tic

    top1 = evaluate(model, test_set, mean, std, device, precision, config.eval.batch_size)
    key = "scratch_top1" if settings.from_scratch else "finetune_top1"
    result: dict[str, Any] = {key: round(top1, 2)}
    recipe = asdict(settings)
    if settings.from_scratch:
        recipe["encoder"] = None
    result.update(
        recipe,
        lr=peak_lr,
        steps=total_steps,
        num_classes=num_classes,
        train_images=len(train_set),
        test_images=len(test_set),
        final_loss=round(loss_value, 5),
        precision=precision,
        device=str(device),
        checkpoint=str(run.path),
        train_seconds=round(train_seconds, 1),
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    return result, model


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``--set`` keys the recipe does not read (or takes from its own flags)."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith(SETTABLE_PREFIXES) or key in SETTABLE_KEYS:
            continue
        if key in FLAG_FOR_KEY:
            raise ConfigError(f"finetune takes {key} from {FLAG_FOR_KEY[key]}, not --set")
        raise ConfigError(
            f"finetune does not read config key '{key}' (--set accepts data.*, "
            f"{', '.join(SETTABLE_KEYS)})"
        )


def default_drop_path(run: LoadedRun) -> float:
    """The drop-path default for the checkpoint's backbone: 0.1 for a ViT, 0 for a ResNet
    (it has none)."""
    return 0.0 if is_resnet_arch(run.config.model.arch) else FineTuneSettings().drop_path
