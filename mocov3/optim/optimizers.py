"""Optimiser construction over the query side's trainable tensors only: AdamW (the paper's
ViT recipe) or LARS (its ResNet recipe, :mod:`mocov3.optim.lars`)."""

from __future__ import annotations

import torch
from torch import nn

from mocov3.config import OptimConfig
from mocov3.optim.lars import LARS


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Tensors the optimiser may change. Frozen ones (random patch projection, sin-cos table,
    the whole momentum encoder) are excluded, so weight decay cannot move them either."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(
    model: nn.Module, config: OptimConfig, device: torch.device, fused: bool | None = None
) -> torch.optim.Optimizer:
    """``config.name``: adamw or lars; the lr is 0 here and set every step by the trainer.

    ``fused``: AdamW's fused kernel (None: on CPU and CUDA, where torch has one). It computes
    the same update as torch's default per-tensor loop, in one pass over each tensor: 6x
    faster on a 2-core EPYC (docs/benchmarks.md). False gives torch's default, for the bench.
    """
    if config.name == "lars":
        return build_lars(model, config)
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    # The reference applies weight decay to every trainable ViT tensor, biases and norms
    # included; we keep that.
    return torch.optim.AdamW(
        trainable_parameters(model),
        lr=0.0,  # set every step from the schedule
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        fused=fused or None,
    )


def build_lars(model: nn.Module, config: OptimConfig) -> LARS:
    """The reference's ResNet optimiser: LARS, momentum 0.9, trust coefficient 0.001; 1-d
    tensors (biases, BN) are exempt from weight decay and trust ratio inside LARS itself."""
    return LARS(
        trainable_parameters(model),
        lr=0.0,  # set every step from the schedule
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        trust_coefficient=config.trust_coefficient,
    )
