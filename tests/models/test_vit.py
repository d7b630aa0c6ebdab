"""The ViT backbone: timm compatibility, init, position tables, frozen tensors."""

import math

import pytest
import timm
import torch

from mocov3.config import load_config, resolve_model_dims
from mocov3.errors import ConfigError
from mocov3.models.heads import SyncBatchNorm2d
from mocov3.models.moco import build_backbone
from mocov3.models.vit import (
    ConvStem,
    TokenBatchNorm,
    VisionTransformer,
    set_attention_kernel,
    set_class_token_only,
    sincos_position_table,
    uses_explicit_attention,
)


def _pair(pos_embed: str, img_size: int = 32, patch: int = 4, in_chans: int = 3):
    ours = VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=96,
        depth=3,
        num_heads=12,
        pos_embed=pos_embed,
    )
    theirs = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=96,
        depth=3,
        num_heads=12,
        num_classes=0,
        pos_embed="none" if pos_embed == "none" else "learn",
    )
    return ours, theirs


@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "none"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_state_dict_loads_into_timm_and_gives_same_features(pos_embed, in_chans):
    torch.manual_seed(0)
    ours, theirs = _pair(pos_embed, in_chans=in_chans)
    ours_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_keys = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_keys == theirs_keys
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, in_chans, 32, 32)
    with torch.no_grad():
        expected = theirs(x)  # num_classes=0, global_pool='token': class token after norm
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_paper_sizes_and_vit_small_has_twelve_heads():
    from mocov3.config import VIT_SIZES

    assert VIT_SIZES["vit_small"] == (384, 12, 12)
    assert VIT_SIZES["vit_tiny"] == (192, 12, 3)
    assert VIT_SIZES["vit_base"] == (768, 12, 12)
    assert VIT_SIZES["vit_large"] == (1024, 24, 16)
    assert VIT_SIZES["vit_huge"] == (1280, 32, 16)


def test_sincos_table_values_by_hand():
    dim, grid = 8, 2
    table = sincos_position_table(grid, dim)
    assert table.shape == (1, 1 + grid * grid, dim)
    assert torch.all(table[0, 0] == 0)  # class token position is all zeros
    omega = torch.tensor([1.0, 1.0 / 100.0])  # 1 / 10000 ** (i / 2) for i = 0, 1
    # token (row r, col c) at index 1 + r * grid + c: first axis r, second axis c
    for r in range(grid):
        for c in range(grid):
            row = table[0, 1 + r * grid + c]
            expected = torch.cat(
                [
                    torch.sin(r * omega),
                    torch.cos(r * omega),
                    torch.sin(c * omega),
                    torch.cos(c * omega),
                ]
            )
            torch.testing.assert_close(row, expected)


def test_moco_init_bounds():
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4
    )
    qkv = vit.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (64 + 64))  # qkv treated as three 64x64 matrices
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    fc1 = vit.blocks[0].mlp.fc1.weight
    xavier = math.sqrt(6.0 / (64 + 256))
    assert fc1.abs().max() <= xavier and fc1.abs().max() > 0.9 * xavier
    patch = vit.patch_embed.proj.weight
    patch_bound = math.sqrt(6.0 / (3 * 16 + 64))
    assert patch.abs().max() <= patch_bound and patch.abs().max() > 0.9 * patch_bound
    assert torch.all(vit.blocks[1].mlp.fc2.bias == 0)
    assert vit.cls_token.std() < 1e-5
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6


def test_any_image_and_patch_size():
    vit = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2
    )
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    assert vit.pos_embed.shape == (1, 17, 32)
    with pytest.raises(ValueError, match="multiple"):
        VisionTransformer(img_size=30, patch_size=4)


# ------------------------------------------------------------------------------ ViT-BN


def _vit_bn() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=28,
        patch_size=14,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_norm="batchnorm",
    )


def test_vit_bn_swaps_only_the_norm_before_each_mlp():
    vit = _vit_bn()
    assert all(isinstance(block.norm2, TokenBatchNorm) for block in vit.blocks)
    assert all(isinstance(block.norm1, torch.nn.LayerNorm) for block in vit.blocks)
    assert isinstance(vit.norm, torch.nn.LayerNorm)  # the feature is still read after LN
    plain = VisionTransformer(28, 14, 1, 32, 2, 2)
    assert isinstance(plain.blocks[0].norm2, torch.nn.LayerNorm)  # the default is the paper's ViT
    with pytest.raises(ValueError, match="mlp_norm 'groupnorm'"):
        VisionTransformer(28, 14, 1, 32, 2, 2, mlp_norm="groupnorm")


def test_token_batchnorm_standardises_each_channel_over_all_tokens_by_hand():
    torch.manual_seed(0)
    tokens = torch.randn(3, 5, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 7.0
    norm = TokenBatchNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
    out = norm(tokens)
    rows = tokens.reshape(15, 4)  # batch and tokens pooled: 15 samples per channel
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    expected = (tokens - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # running statistics move 10% toward the batch's, the variance unbiased over 15
    torch.testing.assert_close(norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * rows.var(0, unbiased=True))


def test_vit_bn_in_eval_mode_gives_each_image_the_same_feature_in_any_batch():
    vit = _vit_bn()
    images = torch.randn(6, 1, 28, 28)
    for _ in range(3):  # train-mode passes set the running statistics
        vit(images)
    vit.eval()
    together = vit(images)
    alone = torch.cat([vit(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    vit.train()  # in train mode, the batch's statistics: another batch, another feature
    assert not torch.allclose(vit(images)[:3], vit(images[:3]), atol=1e-4)


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_every_attention_kernel_computes_the_same_function(kernel: str) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2, num_heads=4
    )
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    expected.sum().backward()
    grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    assert set_attention_kernel(model, kernel) == 2
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        set_attention_kernel(model, "flash")


def test_auto_attention_picks_the_explicit_ops_for_bf16_on_a_cpu_only() -> None:
    q = torch.zeros(1, 1, 2, 4)
    assert uses_explicit_attention("auto", q.bfloat16())
    assert not uses_explicit_attention("auto", q)
    assert uses_explicit_attention("explicit", q) and not uses_explicit_attention(
        "sdpa", q.bfloat16()
    )


def test_the_class_token_only_last_block_is_the_same_function() -> None:
    """The last block's other tokens are never read: skipping them changes no output and no
    gradient (a random readout of the feature, so the gradients are not ~0 as for a sum of a
    LayerNorm's outputs)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=3, num_heads=3
    )
    x, readout = torch.randn(4, 3, 16, 16), torch.randn(4, 48)
    results = []
    for shortcut in (True, False):
        model.zero_grad()
        model.class_token_only_last_block = shortcut
        out = model(x)
        (out * readout).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (short, short_grads), (full, full_grads) = results
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, model.forward_tokens(x)[:, 0].detach(), rtol=0, atol=0)
    assert short_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():  # to rounding, relative to the tensor's largest
        assert (short_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name
    assert set_class_token_only(model, False) == 1 and not model.class_token_only_last_block
    # a standalone ViT runs every token; MoCo's encoders (build_moco) turn the shortcut on
    fresh = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3)
    assert not fresh.class_token_only_last_block
    # ViT-BN's MLP norm takes statistics over every token, so it keeps the whole block
    assert not VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3,
                                 mlp_norm="batchnorm").class_token_only_last_block  # fmt: skip


def _conv_stem_parameters(in_chans: int, dim: int) -> int:
    """By hand: 3x3 convs without bias from in_chans to dim/8, dim/4, dim/2, dim; a BN
    (weight and bias) after each; a 1x1 conv dim -> dim with bias."""
    widths = [dim // 8, dim // 4, dim // 2, dim]
    convs = sum(9 * a * b for a, b in zip([in_chans, *widths[:-1]], widths, strict=True))
    return convs + 2 * sum(widths) + dim * dim + dim


def test_conv_stem_layers_shapes_and_parameter_count_by_hand():
    stem = ConvStem(img_size=224, patch_size=16, in_chans=3, embed_dim=384)
    kinds = [type(layer).__name__ for layer in stem.proj]
    assert kinds == ["Conv2d", "SyncBatchNorm2d", "ReLU"] * 4 + ["Conv2d"]  # BN after each conv
    convs = [layer for layer in stem.proj if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 96, 192, 384, 384]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    assert [c.bias is not None for c in convs] == [False] * 4 + [True]
    assert all(isinstance(stem.proj[i], SyncBatchNorm2d) for i in (1, 4, 7, 10))
    assert sum(p.numel() for p in stem.parameters()) == _conv_stem_parameters(3, 384) == 1021488
    tokens = stem(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 196, 384) and stem.grid_size == 14


def test_conv_stem_vit_small_is_the_references_vit_conv_small():
    overrides = ["model.stem=conv", "model.freeze_patch_embed=false", "moco.concat_views=false"]
    config = load_config(None, ["model.arch=vit_small", *overrides])
    assert resolve_model_dims(config.model) == (384, 11, 12)  # one block fewer
    conv = build_backbone(config, 3)
    patch = build_backbone(load_config(None, ["model.arch=vit_small"]), 3)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    block = count(patch.blocks[0])
    assert count(conv) == count(patch) - count(patch.patch_embed) - block + _conv_stem_parameters(
        3, 384
    )
    assert conv(torch.randn(2, 3, 224, 224)).shape == (2, 384)
    with pytest.raises(ValueError, match="not frozen"):
        conv.freeze_patch_embed()
    explicit = load_config(
        None,
        [
            "model.arch=vit_custom",
            "model.embed_dim=64",
            "model.depth=3",
            "model.num_heads=2",
            *overrides,
        ],
    )
    assert resolve_model_dims(explicit.model)[1] == 3  # an explicit depth is kept


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.patch_size=8", "data.image_size=32"], "patch_size 16"),
        (["model.freeze_patch_embed=true"], "freeze_patch_embed must be false"),
        (["moco.concat_views=true"], "concat_views must be false"),
        (["model.stem=hybrid"], "must be patch or conv"),
    ],
)
def test_conv_stem_settings_it_cannot_honour_are_one_line_errors(overrides, message):
    base = ["model.stem=conv", "model.freeze_patch_embed=false", "moco.concat_views=false"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, *overrides])
    with pytest.raises(ConfigError, match="model.stem is a ViT option"):
        load_config("configs/resnet18_demo.yaml", ["model.stem=conv"])
