"""The reference-mirroring bench row computes our model's function, the reference's way."""

from __future__ import annotations

import pytest
import torch

from mocov3.config import AugmentConfig, load_config
from mocov3.models.moco import build_moco
from mocov3.tools.reference_step import ReferenceInput, ReferenceMoCo, ReferenceStep, reference_view


def _pair(concat: bool = False):
    config = load_config("configs/tiny.yaml", [f"moco.concat_views={str(concat).lower()}"])
    torch.manual_seed(0)
    ours = build_moco(config, 1)
    return config, ours, ReferenceMoCo(ours)


def test_the_mirror_computes_our_loss_gradients_and_momentum_update() -> None:
    _, ours, mirror = _pair()
    generator = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(8, 1, 28, 28, generator=generator) for _ in range(2))
    loss, reference_loss = ours(x1, x2, 0.9), mirror(x1, x2, 0.9)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-5)
    loss.backward()
    reference_loss.backward()
    pairs = [
        (ours.backbone.blocks[0].attn.qkv.weight, mirror.base_encoder.blocks[0].attn.qkv.weight),
        # (not the class token: it starts near 0 and the first LayerNorm divides by its
        # tiny spread, so its gradient amplifies rounding differences ~100x)
        (ours.backbone.blocks[-1].mlp.fc2.weight, mirror.base_encoder.blocks[-1].mlp.fc2.weight),
        (ours.projector[0].weight, mirror.base_encoder.head[0].weight),
        (ours.predictor[3].weight, mirror.predictor[3].weight),
    ]
    for our, their in pairs:
        torch.testing.assert_close(our.grad, their.grad, rtol=1e-4, atol=1e-6)
    # the EMA ran before the keys in both, and moved the momentum encoders alike
    ema = (
        ours.momentum_backbone.blocks[1].mlp.fc1.weight,
        mirror.momentum_encoder.blocks[1].mlp.fc1.weight,
    )
    torch.testing.assert_close(*ema)
    assert all(p.grad is None for p in mirror.momentum_encoder.parameters())
    # the heads are plain torch BatchNorm, with the same running statistics after a step
    norm = mirror.predictor[1]
    assert type(norm) is torch.nn.BatchNorm1d
    torch.testing.assert_close(norm.running_mean, ours.predictor[1].running_mean)


def test_the_mirror_refuses_a_resnet() -> None:
    config = load_config("configs/resnet18_demo.yaml")
    with pytest.raises(ValueError, match="ViT"):
        ReferenceMoCo(build_moco(config, 3))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_per_image_views_are_normalised_float_images(channels: int) -> None:
    images = torch.randint(0, 256, (4, channels, 20, 20), dtype=torch.uint8)
    config = load_config("configs/tiny.yaml", ["data.image_size=16", "model.patch_size=4"])
    views = ReferenceInput(config, images, (0.5, 0.25), workers=0, device=torch.device("cpu"))
    first, second = views.next(torch.device("cpu"))
    for view in (first, second):
        assert view.shape == (4, channels, 16, 16) and view.dtype == torch.float32
        assert -2.0 - 1e-6 <= float(view.min()) and float(view.max()) <= 2.0 + 1e-6
    again, _ = views.next(torch.device("cpu"))
    assert not torch.equal(first, again)  # a new random crop every step
    # view 2 of the recipe solarizes, view 1 does not
    recipe = AugmentConfig()
    names = [type(op).__name__ for op in reference_view(recipe, 1, 16, (0.5,), (0.25,)).transforms]
    assert names.count("RandomApply") == 3


def test_a_reference_step_trains_the_base_encoder_only_by_gradient() -> None:
    config, ours, _ = _pair()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    step = ReferenceStep(ours, config, images, torch.device("cpu"), 1e-3, 0, (0.5, 0.25))
    before = step.model.base_encoder.blocks[0].mlp.fc1.weight.detach().clone()
    frozen = step.model.base_encoder.patch_embed.proj.weight.detach().clone()
    waited, seconds = step(0)
    assert 0 < waited < seconds
    assert not torch.equal(before, step.model.base_encoder.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(frozen, step.model.base_encoder.patch_embed.proj.weight)
    step.close()
