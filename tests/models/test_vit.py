"""The ViT backbone: timm compatibility, init, position tables, frozen tensors."""

import math

import pytest
import timm
import torch

from mocov3.models.vit import VisionTransformer, sincos_position_table


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
