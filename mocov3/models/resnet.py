"""ResNet backbones for MoCo v3 (Chen, Xie, He, ICCV 2021, Sec. 4 and Table 10's R-50 rows).

The reference builds torchvision's ResNet with ``zero_init_residual=True`` (the last BN
gamma of every residual block starts at 0, so each block starts as the identity and the
deep network trains like a shallow one early on), replaces ``fc`` by the projector and
converts every BatchNorm to SyncBN. Here ``fc`` becomes ``nn.Identity`` (the projector is
a separate module of :class:`~mocov3.models.moco.MoCo`), so the backbone returns the
global-average-pooled feature, ``[B, 2048]`` for ResNet-50 and ``[B, 512]`` for ResNet-18.

State-dict keys are torchvision's own (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ...), which timm's ResNets share: a pretrained trunk loads with
``strict=True`` into ``torchvision.models.resnet50()`` or ``timm.create_model("resnet50")``
once their ``fc`` is removed.

``small_stem`` is for 28-64 px images (CIFAR/Fashion-MNIST practice, as in SimCLR's
CIFAR ResNet): a 3x3 stride-1 ``conv1`` and no max-pool, so a 28 px image still reaches
``layer4`` at 4x4 instead of 1x1.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet

from mocov3.models.heads import SyncBatchNorm2d

# name: (torchvision builder, feature dim, residual blocks)
RESNETS: dict[str, tuple[Callable[..., resnet.ResNet], int, int]] = {
    "resnet18": (resnet.resnet18, 512, 8),
    "resnet34": (resnet.resnet34, 512, 16),
    "resnet50": (resnet.resnet50, 2048, 16),
    "resnet101": (resnet.resnet101, 2048, 33),
}


def _stem_conv(in_chans: int, small_stem: bool, width: int = 64) -> nn.Conv2d:
    """torchvision's 7x7 stride-2 stem, or the 3x3 stride-1 small-image stem; bias-free
    (a BN follows), He-initialised as torchvision initialises every convolution."""
    if small_stem:
        conv = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _set_width(model: resnet.ResNet, width: int) -> None:
    """Rebuild ``model``'s stages with ``width`` channels in layer1 (doubling per stage, as
    torchvision's 64/128/256/512), re-initialised exactly as torchvision initialises: He
    normal convolutions, BN gamma 1 / beta 0, and the last BN of every block at gamma 0."""
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    block = type(stages[0][0])
    model.inplanes = width
    model.bn1 = model._norm_layer(width)
    for index, stage in enumerate(stages):
        stride = 1 if index == 0 else 2  # as torchvision: layer1 keeps the stem's resolution
        new_stage = model._make_layer(block, width * 2**index, len(stage), stride=stride)
        setattr(model, f"layer{index + 1}", new_stage)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, resnet.Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, resnet.BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def build_resnet(
    arch: str, in_chans: int = 3, small_stem: bool = False, width: int = 64
) -> resnet.ResNet:
    """torchvision ResNet ``arch`` from random init, as the MoCo v3 backbone.

    ``zero_init_residual=True`` as the reference; every BN is :class:`SyncBatchNorm2d`
    (plain BatchNorm2d in one process, global statistics under DDP); ``fc`` is
    ``nn.Identity`` and ``embed_dim`` (also ``num_features``, timm's name) is the feature
    dimension. ``in_chans`` 1 (grey images) or 3 replaces ``conv1``'s input channels.
    """
    if arch not in RESNETS:
        raise ValueError(f"unknown ResNet {arch!r} (choose one of: {', '.join(RESNETS)})")
    builder, dim, _ = RESNETS[arch]
    model = builder(weights=None, zero_init_residual=True, norm_layer=SyncBatchNorm2d)
    if width != 64:
        _set_width(model, width)
        dim = dim * width // 64
    if small_stem or in_chans != 3 or width != 64:
        model.conv1 = _stem_conv(in_chans, small_stem, width)
    if small_stem:
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.embed_dim = dim
    model.num_features = dim
    model.small_stem = small_stem
    return model


def is_resnet(module: nn.Module) -> bool:
    return isinstance(module, resnet.ResNet)
