"""Optimiser construction: AdamW over the query side's trainable tensors only."""

from __future__ import annotations

import torch
from torch import nn

from mocov3.config import OptimConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Tensors the optimiser may change. Frozen ones (random patch projection, sin-cos table,
    the whole momentum encoder) are excluded, so weight decay cannot move them either."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(
    model: nn.Module, config: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    # The reference applies weight decay to every trainable ViT tensor, biases and norms
    # included; we keep that. Fused AdamW is exact and faster on CUDA.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        trainable_parameters(model),
        lr=0.0,  # set every step from the schedule
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        fused=fused,
    )
