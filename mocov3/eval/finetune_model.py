"""The network fine-tuning trains and its recipe: a backbone and a linear head, stochastic
depth, layer-wise lr decay (BEiT/MAE) and :class:`FineTuneSettings`, the recipe both the
pretrained and the from-scratch run follow (:mod:`mocov3.eval.finetune` runs it).

Defaults are the small-data recipe measured in :mod:`mocov3.eval.finetune`'s docstring; the
DeiT recipe the paper fine-tunes with (Chen, Xie, He, ICCV 2021, Sec. 4; Touvron et al.,
ICML 2021) ships as ``configs/eval/finetune_deit_vit_{small,base}.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mocov3.errors import ConfigError
from mocov3.eval.deit import ERASING_MODES, MIXUP_MODES, check_rand_augment
from mocov3.models.checkpoint import LoadedRun
from mocov3.models.moco import build_backbone, feature_dim
from mocov3.models.resnet import is_resnet
from mocov3.models.vit import DropPath
from mocov3.runtime.device import seed_everything

_HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init (trunc normal), bias zero
EVAL_VIEWS = ("whole", "centre")


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
    """The fine-tuning recipe; identical for the pretrained and the from-scratch run.

    The defaults are the small-data recipe; the DeiT recipe (``configs/eval/
    finetune_deit_vit_*.yaml``) sets base lr 5e-4 per 512 images, no layer decay, 5 warmup
    epochs, batch 1024, crop scale 0.08, Mixup 0.8 / CutMix 1.0, RandAugment, erasing 0.25
    and the resize-256/224 + centre-crop evaluation."""

    epochs: float = 10.0
    batch_size: int = 128  # the global batch, over all processes
    base_lr: float = 1e-2  # lr = base_lr * batch_size / lr_batch
    lr_batch: int = 256  # the batch base_lr is given for (DeiT: 512)
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    crop_min: float = 1.0  # RandomResizedCrop scale (crop_min, 1); 1: flip only
    mixup: float = 0.0  # Mixup alpha (DeiT 0.8); 0 with cutmix 0: no mixing
    cutmix: float = 0.0  # CutMix alpha (DeiT 1.0)
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both on
    mixup_mode: str = "batch"  # timm's: one lambda per batch | pair | elem
    rand_augment: str | None = None  # timm's RandAugment string (DeiT rand-m9-mstd0.5-inc1)
    random_erasing: float = 0.0  # probability per image (DeiT 0.25)
    erasing_mode: str = "pixel"  # timm's fill: per-pixel normal noise | rand | const
    eval_view: str = "whole"  # whole images | centre: resize size*256/224, centre crop (DeiT)
    seed: int = 0
    from_scratch: bool = False
    encoder: str = "query"  # which pretrained backbone to start from

    def __post_init__(self) -> None:
        if isinstance(self.rand_augment, str) and self.rand_augment.lower() in ("", "none"):
            self.rand_augment = None  # "none" on the command line turns a recipe's off

    @property
    def mixes(self) -> bool:
        """Whether Mixup/CutMix is on (its soft targets then carry the label smoothing)."""
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> None:
        """Raise ConfigError, in one line naming the option, for a value that cannot work."""
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)
        check_rand_augment(self.rand_augment)

    def _checks(self) -> tuple[tuple[bool, str], ...]:
        unit = (0.0, 1.0)
        return (
            (self.epochs > 0, f"--epochs {self.epochs} must be positive"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1"),
            (self.base_lr > 0, f"--lr {self.base_lr} must be positive"),
            (self.lr_batch >= 1, f"--lr-batch {self.lr_batch} must be >= 1"),
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
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (_within(self.mixup_prob, unit), f"--mixup-prob {self.mixup_prob} not in [0, 1]"),
            (
                _within(self.mixup_switch_prob, unit),
                f"--mixup-switch-prob {self.mixup_switch_prob} not in [0, 1]",
            ),
            (self.mixup_mode in MIXUP_MODES, f"--mixup-mode must be one of {MIXUP_MODES}"),
            (
                _within(self.random_erasing, unit),
                f"--random-erasing {self.random_erasing} not in [0, 1]",
            ),
            (
                self.erasing_mode in ERASING_MODES,
                f"--erasing-mode must be one of {ERASING_MODES}",
            ),
            (self.eval_view in EVAL_VIEWS, f"--eval-view must be one of {EVAL_VIEWS}"),
            (self.encoder in ("query", "momentum"), "--encoder must be query or momentum"),
        )


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


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
