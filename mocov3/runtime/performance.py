"""Speed settings that leave the method unchanged: TF32, channels_last, torch.compile.

Each is a config key (``train.tf32``, ``train.channels_last``, ``train.compile``) applied
here, once, by the trainer and by ``mocov3 bench``, so both measure the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from mocov3.config import TrainConfig


def supports_tf32(device: torch.device) -> bool:
    """TF32 tensor cores exist on CUDA devices of compute capability 8.0 (Ampere) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions use TF32 on Ampere+ GPUs (10-bit mantissa inputs,
    fp32 accumulation, as PyTorch's own guidance for training). Returns whether it is on."""
    active = enabled and supports_tf32(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = active
        torch.backends.cudnn.allow_tf32 = active
    return active


def apply_memory_format(model: nn.Module, settings: TrainConfig) -> nn.Module:
    """``channels_last``: 4-D weights (convolutions) in NHWC, where cuDNN and oneDNN run
    convolutions fastest; a no-op for tensors that are not 4-D."""
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_memory_format(images: torch.Tensor, settings: TrainConfig) -> torch.Tensor:
    if settings.channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def compile_backbones(model: nn.Module, settings: TrainConfig) -> list[str]:
    """``train.compile``: compile the backbones in place (``nn.Module.compile`` keeps the
    state-dict keys, so checkpoints stay interchangeable). The heads are small and hold
    BatchNorm with per-view statistics; they stay eager. Returns the compiled names."""
    if not settings.compile:
        return []
    compiled = []
    for name in ("backbone", "momentum_backbone"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            module.compile()
            compiled.append(name)
    return compiled
