"""LARS, the optimiser of MoCo v3's ResNet-50 runs (Chen, Xie, He, ICCV 2021, Sec. 4).

Layer-wise adaptive rate scaling (You, Gitman, Ginsburg, 2017) as the reference code uses
it: for every tensor of more than one dimension (conv and linear weights)

    d = g + wd * w
    d = d * (eta * |w| / |d|)        (eta = trust coefficient; 1 when |w| or |d| is 0)

and for one-dimensional tensors (biases, BN gammas and betas) ``d = g``: neither weight
decay nor the trust ratio, which would otherwise shrink the BN scales and let the tiny
norms of biases set their own step. Then heavy-ball momentum and the scheduled lr:

    mu = momentum * mu + d
    w = w - lr * mu

The trust ratio makes each weight's step a fixed fraction (lr * eta) of its norm, so the
large batch (4096) can use a large lr (base 0.3-0.6 per 256) without the first layers'
small weights exploding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """LARS with weight decay and trust ratio for tensors of ``ndim > 1`` only.

    ``state[p]["mu"]`` is the momentum buffer; ``state_dict()`` / ``load_state_dict()``
    round-trip it, so a resumed run continues with the same momentum.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and "
                f"trust_coefficient > 0 (got {lr}, {weight_decay}, {momentum}, "
                f"{trust_coefficient})"
            )
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
        )
        super().__init__(params, defaults)

    @staticmethod
    def scaled_update(
        param: torch.Tensor, grad: torch.Tensor, weight_decay: float, trust_coefficient: float
    ) -> torch.Tensor:
        """``(g + wd * w) * eta * |w| / |g + wd * w|`` for a weight; ``g`` for a 1-d tensor."""
        if param.ndim <= 1:
            return grad
        update = grad.add(param, alpha=weight_decay)
        param_norm = torch.linalg.vector_norm(param)
        update_norm = torch.linalg.vector_norm(update)
        ratio = trust_coefficient * param_norm / update_norm
        # a zero weight (fresh zero-init) or a zero update keeps the plain step
        usable = (param_norm > 0) & (update_norm > 0)
        return update.mul(torch.where(usable, ratio, torch.ones_like(ratio)))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        update = self.scaled_update(
            param, param.grad, group["weight_decay"], group["trust_coefficient"]
        )
        state = self.state[param]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        mu = state["mu"]
        mu.mul_(group["momentum"]).add_(update)
        param.add_(mu, alpha=-group["lr"])
