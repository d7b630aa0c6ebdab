"""Projector and predictor MLPs of MoCo v3 (Chen, Xie, He, ICCV 2021, Sec. 3 and Appendix).

Every Linear is bias-free; hidden layers are Linear-BN-ReLU; the last layer is Linear
followed, when ``last_bn``, by an affine-free BatchNorm. ViT: projector 3 layers
``D -> 4096 -> 4096 -> 256``, predictor 2 layers ``256 -> 4096 -> 256``, both with the last
BN. (ResNet: projector 2 layers with last BN, predictor 2 layers without.)

The BatchNorms are :class:`SyncBatchNorm1d`: statistics over the *global* batch of a view,
as the reference (SyncBN over all GPUs), in one process or many. :class:`SyncBatchNorm2d`
is the same for the ResNet backbone's feature maps.
"""

from __future__ import annotations

import torch
from torch import nn

from mocov3.runtime.distributed import differentiable_sum, is_distributed, rank_and_world


class _GlobalBatchStats:
    """Training statistics over every process's batch, for any ``[N, C, *]`` input.

    Alone it is the wrapped ``nn.BatchNorm`` class (same code path, same state-dict keys).
    Under DDP it all-reduces the per-channel sum and then the sum of squared deviations
    (two passes, as accurate as one process's), with gradients flowing back through the
    reductions. Unlike ``nn.SyncBatchNorm`` it also runs on CPU with gloo, so a
    multi-process run can be tested, and checked against one process, on any machine.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)  # type: ignore[misc]
        return self._global_batch_norm(x)

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        _, world = rank_and_world()
        dims = [0, *range(2, x.dim())]  # every axis but the channel axis
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        # every process holds the same per-process batch
        count = (x.numel() // max(x.shape[1], 1)) * world
        values = x.float()
        mean = differentiable_sum(values.sum(dim=dims)) / count
        centred = values - mean.view(shape)
        var = differentiable_sum((centred * centred).sum(dim=dims)) / count  # biased, as BN
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


class SyncBatchNorm1d(_GlobalBatchStats, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics span every process's batch (the heads)."""


class SyncBatchNorm2d(_GlobalBatchStats, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every process's batch: the ResNet
    backbone's norm layer, as the reference converts every BN to SyncBN under DDP."""


def build_mlp(
    num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """``num_layers`` bias-free Linear layers, BN+ReLU between, optional affine-free last BN."""
    if num_layers < 1:
        raise ValueError("an MLP head needs at least one layer")
    layers: list[nn.Module] = []
    for index in range(num_layers):
        in_dim = input_dim if index == 0 else hidden_dim
        is_last = index == num_layers - 1
        out_dim = output_dim if is_last else hidden_dim
        layers.append(nn.Linear(in_dim, out_dim, bias=False))
        if not is_last:
            layers += [SyncBatchNorm1d(out_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            # affine-free: the paper's heads end in a plain standardisation
            layers.append(SyncBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
