"""Fine-tuning: layer-wise lr decay, drop path, label smoothing, and the command end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mocov3.cli import main
from mocov3.eval.finetune import (
    FineTuneModel,
    FineTuneSettings,
    build_criterion,
    build_model,
    finetune,
    layer_decay_param_groups,
    set_drop_path,
)
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.vit import VisionTransformer


def tiny_vit(**kwargs) -> VisionTransformer:
    options = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2)
    return VisionTransformer(**{**options, **kwargs})


def test_layer_decay_groups_by_hand():
    model = FineTuneModel(tiny_vit(pos_embed="learned"), num_classes=3)
    groups = layer_decay_param_groups(model, base_lr=1.0, weight_decay=0.05, layer_decay=0.5)
    where = {name: group for group in groups for name in group["names"]}
    # depth 2: patch_embed/tokens layer 0 -> 0.5**3, blocks.0 -> 0.5**2, blocks.1 -> 0.5,
    # final norm and head -> 1
    expected = {
        "backbone.patch_embed.proj.weight": 0.125,
        "backbone.cls_token": 0.125,
        "backbone.pos_embed": 0.125,
        "backbone.blocks.0.attn.qkv.weight": 0.25,
        "backbone.blocks.0.norm1.weight": 0.25,
        "backbone.blocks.1.mlp.fc2.weight": 0.5,
        "backbone.norm.weight": 1.0,
        "head.weight": 1.0,
        "head.bias": 1.0,
    }
    for name, scale in expected.items():
        assert where[name]["lr_scale"] == scale, name
        assert where[name]["lr"] == scale, name
    no_decay = [
        "backbone.patch_embed.proj.bias",
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.1.norm2.weight",
        "backbone.blocks.1.norm2.bias",
        "backbone.norm.bias",
        "head.bias",
    ]
    for name in no_decay:
        assert where[name]["weight_decay"] == 0.0, name
    for name in (
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.1.mlp.fc1.weight",
        "head.weight",
    ):
        assert where[name]["weight_decay"] == 0.05, name
    # every trainable tensor exactly once
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_frozen_sincos_table_is_left_out_of_the_groups():
    model = FineTuneModel(tiny_vit(), num_classes=3)  # sin-cos: requires_grad False
    groups = layer_decay_param_groups(model, 1.0, 0.05, 0.75)
    names = {name for group in groups for name in group["names"]}
    assert "backbone.pos_embed" not in names
    assert "backbone.patch_embed.proj.weight" in names


def test_drop_path_active_in_train_mode_only():
    torch.manual_seed(0)
    model = FineTuneModel(tiny_vit(), num_classes=3)
    assert set_drop_path(model.backbone, 0.5) == [0.0, 0.5]
    x = torch.randn(8, 1, 8, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    set_drop_path(model.backbone, 0.0)
    model.train()
    assert torch.equal(model(x), model(x))


def test_label_smoothing_reaches_the_loss():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    eps = 0.3
    log_p = F.log_softmax(logits, dim=1)
    # smoothed target: (1 - eps) on the label + eps / K everywhere
    target = torch.full_like(log_p, eps / 3)
    target[torch.arange(2), labels] += 1 - eps
    by_hand = -(target * log_p).sum(dim=1).mean()
    assert torch.allclose(build_criterion(eps)(logits, labels), by_hand)
    assert not torch.allclose(build_criterion(0.0)(logits, labels), by_hand)


TINY = ["--set", "data.subset=512", "--set", "eval.test_subset=300", "--batch-size", "64"]


def test_pretrained_weights_are_loaded_and_scratch_is_fresh(tiny_run):
    run = open_checkpoint(tiny_run)
    saved = {
        k[len("backbone.") :]: v for k, v in run.state["model"].items() if k.startswith("backbone.")
    }
    pretrained = build_model(run, 10, FineTuneSettings())
    scratch = build_model(run, 10, FineTuneSettings(from_scratch=True))
    loaded = pretrained.backbone.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = scratch.backbone.state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    assert torch.equal(pretrained.head.weight, scratch.head.weight)  # same seed, same head
    momentum = build_model(run, 10, FineTuneSettings(encoder="momentum")).backbone
    assert all(p.requires_grad for n, p in momentum.named_parameters() if n != "pos_embed")


def test_finetuning_trains_the_whole_network(tiny_run):
    run = open_checkpoint(tiny_run, ["data.subset=256", "eval.test_subset=100"])
    settings = FineTuneSettings(epochs=1, batch_size=64, warmup_epochs=0.25)
    result, model = finetune(run, settings)
    saved = run.state["model"]
    after = model.backbone.state_dict()
    for name in (
        "patch_embed.proj.weight",
        "cls_token",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
    ):
        assert not torch.equal(after[name], saved[f"backbone.{name}"]), name
    assert torch.equal(after["pos_embed"], saved["backbone.pos_embed"])  # fixed sin-cos table
    assert result["steps"] == 4 and 0.0 <= result["finetune_top1"] <= 100.0


def test_cli_finetune_and_from_scratch(tiny_run, capsys):
    cases = (
        ((), "finetune_top1", "finetune.json"),
        (("--from-scratch",), "scratch_top1", "scratch.json"),
    )
    for flag, key, name in cases:
        argv = ["finetune", "--checkpoint", str(tiny_run), "--epochs", "1", *TINY, *flag]
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 0.0 <= result[key] <= 100.0
        assert result["epochs"] == 1 and result["layer_decay"] == 0.75
        assert result["test_images"] == 300 and result["train_images"] == 512
        assert math.isfinite(result["final_loss"]) and result["wall_seconds"] > 0
        assert json.loads((tiny_run / name).read_text())[key] == result[key]


@pytest.mark.parametrize(
    "extra",
    [
        ["--set", "optim.base_lr=1"],
        ["--from-scratch", "--encoder", "momentum"],
        ["--warmup-epochs", "2"],
    ],
)
def test_cli_rejects_options_it_would_ignore(tiny_run, capsys, extra):
    assert main(["finetune", "--checkpoint", str(tiny_run), "--epochs", "1", *extra]) == 2
    assert capsys.readouterr().err.startswith("error: ")
