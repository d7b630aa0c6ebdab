"""What a linear probe reads: the class token by default, DINO's cls+avgpool, last4 and
last4+avgpool against hand-built features, clear errors where a kind does not apply, and the CLI."""

import json
import re

import pytest
import torch

from mocov3.cli import main
from mocov3.eval.features import ProbeFeatures
from mocov3.models.resnet import build_resnet
from mocov3.models.vit import VisionTransformer


def small_vit(depth: int = 5) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=depth,
                            num_heads=2)
    with torch.no_grad():  # a class token as the init leaves it (1e-6) would hide mix-ups
        vit.cls_token.normal_()
    return vit.eval()


def block_outputs(vit: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, caught by forward hooks on the every-token forward pass (the
    plain forward's last block computes the class token alone)."""
    caught: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: caught.append(o)) for b in vit.blocks]
    try:
        vit.forward_tokens(images)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


@torch.no_grad()
def test_each_kind_equals_its_hand_built_features():
    vit = small_vit()
    images = torch.randn(3, 1, 28, 28)
    outputs = block_outputs(vit, images)
    final = vit.norm(outputs[-1])

    assert torch.equal(ProbeFeatures(vit, "cls")(images), vit(images))
    pooled = ProbeFeatures(vit, "cls+avgpool")(images)
    expected = torch.cat([final[:, 0], final[:, 1:].mean(dim=1)], dim=1)
    assert pooled.shape == (3, 64) and torch.allclose(pooled, expected, atol=1e-6)
    last4 = ProbeFeatures(vit, "last4")(images)
    expected = torch.cat([vit.norm(out)[:, 0] for out in outputs[-4:]], dim=1)
    assert last4.shape == (3, 128) and torch.allclose(last4, expected, atol=1e-6)
    # the blocks differ, so the four class tokens do too (not one token repeated)
    assert not torch.allclose(last4[:, :32], last4[:, 96:], atol=1e-3)
    # and the last of them is the paper's feature
    assert torch.allclose(last4[:, 96:], vit(images), atol=1e-6)
    both = ProbeFeatures(vit, "last4+avgpool")(images)
    expected = torch.cat([last4, final[:, 1:].mean(dim=1)], dim=1)  # the LAST block's patches
    assert both.shape == (3, 160) and torch.allclose(both, expected, atol=1e-6)


def test_wrapper_adds_no_parameters_and_keeps_the_backbone_mode():
    vit = small_vit()  # in eval mode
    wrapped = ProbeFeatures(vit, "last4")
    assert list(wrapped.state_dict()) == [f"backbone.{key}" for key in vit.state_dict()]
    # extract_features restores the wrapper's mode afterwards: it must be the backbone's
    assert not wrapped.training and not vit.training


@pytest.mark.parametrize(
    ("backbone", "kind", "fix"),
    [
        (build_resnet("resnet18", 1, small_stem=True), "cls+avgpool", "use features 'cls'"),
        (small_vit(depth=3), "last4", "use 'cls' or 'cls+avgpool'"),
        (small_vit(depth=3), "last4+avgpool", "'last4+avgpool' need a ViT of at least 4"),
        (build_resnet("resnet18", 1, small_stem=True), "last4+avgpool", "use features 'cls'"),
        (small_vit(), "avgpool", "cls, cls+avgpool, last4, last4+avgpool"),
    ],
)
def test_kinds_that_do_not_apply_are_refused_with_the_fix(backbone, kind, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        ProbeFeatures(backbone, kind)


def test_cli_writes_other_kinds_beside_the_papers_probe(tiny_run, capsys):
    paper = tiny_run / "linear.json"
    before = paper.read_bytes() if paper.exists() else None
    argv = ["linear", "--checkpoint", str(tiny_run), "--epochs", "2", "--lrs", "1",
            "--batch-size", "256", "--set", "eval.test_subset=300"]
    assert main([*argv, "--features", "cls+avgpool"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["features"] == "cls+avgpool" and result["feature_dim"] == 128  # 2 x dim 64
    assert result["backbone_unchanged"] is True and result["linear_top1"] > 30.0
    assert json.loads((tiny_run / "linear-cls-avgpool.json").read_text()) == result
    assert (paper.read_bytes() if paper.exists() else None) == before

    # the tiny preset's ViT has 2 blocks: last4 is refused in one line, nothing written
    assert main([*argv, "--features", "last4"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "at least 4 blocks" in error
    assert not (tiny_run / "linear-last4.json").exists()
