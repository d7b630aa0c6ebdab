"""One optimisation step on its own: no dataset, no run directory, random views."""

from __future__ import annotations

import copy

import pytest
import torch

from mocov3.config import load_config
from mocov3.models.moco import build_moco
from mocov3.train.step import build_train_step, first_nonfinite_grad

CPU = torch.device("cpu")


def tiny_step(*overrides: str):
    config = load_config(
        "configs/tiny.yaml", ["train.precision=fp32", "stability.grad_every=2", *overrides]
    )
    torch.manual_seed(0)
    model = build_moco(config, in_chans=1)
    return model, build_train_step(config, model, CPU)


def views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 1, 28, 28, generator=generator).unbind(0)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(module.state_dict())


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_a_step_moves_the_query_side_and_measures_gradients_every_grad_every():
    model, step = tiny_step()
    before = state(model)
    first = step(*views(), step=0, lr=1e-3, momentum=0.99)
    assert first.nonfinite is None and not first.skipped and first.grad_norms is None
    assert 0 < first.loss < 10
    moved = changed(before, model)
    assert "predictor.0.weight" in moved and "backbone.blocks.0.attn.qkv.weight" in moved
    # the frozen patch projection and the sin-cos table never move
    assert not moved & {"backbone.patch_embed.proj.weight", "backbone.pos_embed"}
    assert step.optimizer.param_groups[0]["lr"] == 1e-3
    second = step(*views(1), step=1, lr=2e-3, momentum=0.99)  # (step + 1) % 2 == 0
    assert second.grad_norms is not None
    assert {"blocks.first", "projector", "predictor", "total"} <= set(second.grad_norms)


def test_a_non_finite_loss_is_reported_before_the_optimiser_moves_anything():
    model, step = tiny_step()
    model.predictor.register_forward_hook(lambda m, i, out: out * float("nan"))
    before = state(model)
    result = step(*views(), step=4, lr=1e-3, momentum=0.99)
    assert result.nonfinite is not None and not result.skipped
    assert result.nonfinite.startswith("loss became nan at step 5 (lr 0.001)")
    # only the momentum encoder's EMA (done in the forward pass) and BN statistics ran
    moved = changed(before, model)
    assert not {name for name in moved if name.startswith(("backbone.", "predictor."))
                and "running" not in name and "num_batches" not in name}  # fmt: skip


def test_skip_nonfinite_drops_the_gradients_and_puts_batchnorm_statistics_back():
    model, step = tiny_step("train.skip_nonfinite=true")
    name, parameter = step.named_trainable[-1]
    parameter.register_hook(lambda grad: grad * float("inf"))
    before = state(model)
    result = step(*views(), step=0, lr=1e-3, momentum=0.99)
    assert result.skipped and result.nonfinite is not None
    assert result.nonfinite.startswith(f"gradient of {name} (inf) became non-finite")
    assert all(p.grad is None for _, p in step.named_trainable)
    moved = changed(before, model)
    assert moved and all(key.startswith("momentum_") for key in moved), moved  # EMA only


def test_first_nonfinite_grad_names_the_first_bad_tensor_in_order():
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.ones(3), torch.tensor([0.0, float("nan"), 1.0])
    named = [("a", a), ("b", b), ("c", c)]  # c has no gradient
    assert first_nonfinite_grad(named) == "b (nan)"
    b.grad = torch.tensor([float("-inf"), 0.0, 0.0])
    assert first_nonfinite_grad(named) == "b (inf)"
    b.grad = torch.zeros(3)
    assert first_nonfinite_grad(named) is None
    assert first_nonfinite_grad([("c", c)]) is None


@pytest.mark.parametrize("grad_norms", [True, False])
def test_the_gradient_monitor_follows_the_config(grad_norms: bool):
    _, step = tiny_step(f"stability.grad_norms={str(grad_norms).lower()}")
    assert (step.grad_monitor is not None) == grad_norms
