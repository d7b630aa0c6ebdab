"""The optimiser builder: AdamW's fused kernel by default, the same update as torch's loop."""

from __future__ import annotations

import torch
from torch import nn

from mocov3.config import OptimConfig
from mocov3.optim.optimizers import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    model[0].bias.requires_grad = False  # frozen tensors stay out of the optimiser
    return model


def _three_steps(fused: bool | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"), fused)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    return model, optimizer


def test_fused_adamw_is_the_cpu_default_and_updates_like_torchs_loop() -> None:
    fused_model, fused = _three_steps(None)
    loop_model, loop = _three_steps(False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert len(fused.param_groups[0]["params"]) == 5  # the frozen bias left out
    for ours, theirs in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[2].weight, _model()[2].weight)  # it did train
