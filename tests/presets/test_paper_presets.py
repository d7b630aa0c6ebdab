"""The paper's large-model recipes (ViT-L/16, ViT-H/14, ViT-BN-L/7): sizes against timm's
models and hand counts, the paper's hyper-parameters, and one training step of each at a
reduced width on the CPU."""

import pytest
import timm
import torch

from mocov3.config import load_config, resolve_model_dims
from mocov3.models.moco import build_backbone, build_moco
from mocov3.optim.optimizers import build_optimizer

PAPER_VIT_RECIPE = {  # Sec. 4 / Table 4: every ViT of the paper trains with these
    "optim.name": "adamw",
    "optim.base_lr": 1.5e-4,
    "optim.weight_decay": 0.1,
    "optim.warmup_epochs": 40,
    "moco.momentum": 0.99,
    "moco.temperature": 0.2,
    "train.epochs": 300,
    "train.batch_size": 4096,
    "model.proj_hidden_dim": 4096,
    "model.pred_hidden_dim": 4096,
    "model.freeze_patch_embed": True,
    "model.pos_embed": "sincos",
    "augment.crop_scale": [0.08, 1.0],
}
LARGE = [  # preset, (dim, depth, heads), patch, MLP norm, timm's model of the same shape
    ("vit_large_imagenet", (1024, 24, 16), 16, "layernorm", "vit_large_patch16_224"),
    ("vit_huge_imagenet", (1280, 32, 16), 14, "layernorm", "vit_huge_patch14_224"),
    ("vit_bn_large7_imagenet", (1024, 24, 16), 7, "batchnorm", None),
]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _setting(config, key: str):
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize(("preset", "dims", "patch", "norm", "timm_name"), LARGE)
def test_large_presets_hold_the_papers_recipe(preset, dims, patch, norm, timm_name):
    config = load_config(preset)
    assert resolve_model_dims(config.model) == dims
    assert (config.model.patch_size, config.model.mlp_norm, config.data.image_size) == (
        patch,
        norm,
        224,
    )
    assert {key: _setting(config, key) for key in PAPER_VIT_RECIPE} == PAPER_VIT_RECIPE


@pytest.mark.parametrize(("preset", "dims", "patch", "norm", "timm_name"), LARGE)
def test_large_presets_count_the_parameters_of_their_timm_models(
    preset, dims, patch, norm, timm_name
):
    with torch.device("meta"):  # the shapes without the memory (ViT-H: 631M parameters)
        ours = _count(build_backbone(load_config(preset), 3))
        vit_large = _count(timm.create_model("vit_large_patch16_224", num_classes=0))
        theirs = _count(timm.create_model(timm_name, num_classes=0)) if timm_name else None
    if timm_name:
        assert ours == theirs
        return
    # ViT-BN-L/7 by hand from timm's ViT-L/16: a 7x7 patch projection instead of 16x16,
    # 32x32 + 1 positions instead of 14x14 + 1, and a BatchNorm's weight and bias where
    # the LayerNorm had its two (its running statistics are buffers, not parameters)
    dim = 1024
    by_hand = vit_large - 3 * 16 * 16 * dim + 3 * 7 * 7 * dim + (1025 - 197) * dim
    assert ours == by_hand == 303_513_600


@pytest.mark.parametrize(("preset", "dims", "patch", "norm", "timm_name"), LARGE)
def test_large_presets_train_one_step_at_reduced_width(preset, dims, patch, norm, timm_name):
    reduced = [
        "model.embed_dim=32",
        "model.num_heads=2",
        "model.depth=2",
        "model.proj_hidden_dim=64",
        "model.pred_hidden_dim=64",
        "model.out_dim=32",
        f"data.image_size={4 * patch}",
        "data.name=synthetic",
        "train.batch_size=8",
    ]
    config = load_config(preset, reduced)
    torch.manual_seed(0)
    model = build_moco(config, 3)
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    patch_before = model.backbone.patch_embed.proj.weight.detach().clone()
    qkv_before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    size = config.data.image_size
    views = [torch.randn(8, 3, size, size) for _ in range(2)]
    loss = model(*views, momentum=config.moco.momentum)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert torch.equal(model.backbone.patch_embed.proj.weight, patch_before)  # frozen
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, qkv_before)
    if norm == "batchnorm":
        assert int(model.backbone.blocks[0].norm2.num_batches_tracked) == 2  # one per view
