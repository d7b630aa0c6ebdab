"""The MoCo wrapper: heads, gradient flow, momentum update, frozen tensors, concat path."""

import pytest
import torch
from torch import nn

from mocov3.config import load_config
from mocov3.errors import ConfigError
from mocov3.models.heads import build_mlp
from mocov3.models.moco import build_moco
from mocov3.optim.optimizers import build_optimizer

TINY = "configs/tiny.yaml"


def _model(**overrides):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    config = load_config(TINY, ["data.name=synthetic", *sets])
    torch.manual_seed(0)
    return build_moco(config, in_chans=1), config


def test_heads_match_paper_structure():
    projector = build_mlp(3, 384, 4096, 256)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == [
        "Linear",
        "SyncBatchNorm1d",
        "ReLU",
        "Linear",
        "SyncBatchNorm1d",
        "ReLU",
        "Linear",
        "SyncBatchNorm1d",
    ]
    assert all(m.bias is None for m in projector if isinstance(m, nn.Linear))
    assert [m.affine for m in projector if isinstance(m, nn.BatchNorm1d)] == [True, True, False]
    assert projector[0].in_features == 384 and projector[-2].out_features == 256
    predictor = build_mlp(2, 256, 4096, 256)
    assert [type(m).__name__ for m in predictor] == [
        "Linear",
        "SyncBatchNorm1d",
        "ReLU",
        "Linear",
        "SyncBatchNorm1d",
    ]
    assert predictor[-1].affine is False
    no_last_bn = build_mlp(2, 256, 4096, 256, last_bn=False)  # ResNet predictor
    assert isinstance(no_last_bn[-1], nn.Linear)


def _views(batch=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 28, 28, generator=generator), torch.randn(
        batch, 1, 28, 28, generator=generator
    )


def test_gradients_reach_only_the_query_side():
    model, _ = _model()
    x1, x2 = _views()
    model(x1, x2, momentum=0.99).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("momentum_"):
            assert parameter.grad is None, name
            assert not parameter.requires_grad, name
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert model.predictor[0].weight.grad is not None
    assert model.backbone.patch_embed.proj.weight.grad is None  # frozen random projection


def test_momentum_encoder_changes_only_by_the_ema():
    model, config = _model()
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    x1, x2 = _views()
    # first step: moves the query side away from the (identical) momentum copy
    model(x1, x2, momentum=0.9).backward()
    optimizer.step()
    optimizer.zero_grad()
    query = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    key_before = {n: p.detach().clone() for n, p in model.momentum_backbone.named_parameters()}
    m = 0.7
    loss = model(x1, x2, momentum=m)
    for name, key in model.momentum_backbone.named_parameters():
        if model.backbone.get_parameter(name).requires_grad:
            expected = m * key_before[name] + (1 - m) * query[name]
            torch.testing.assert_close(key.detach(), expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(key, key_before[name]), name
    # the backward pass and an optimiser step do not touch the momentum encoder
    after_forward = {n: p.detach().clone() for n, p in model.momentum_backbone.named_parameters()}
    loss.backward()
    optimizer.step()
    for name, key in model.momentum_backbone.named_parameters():
        assert torch.equal(key, after_forward[name]), name
    assert all(
        p not in {id(q) for q in optimizer.param_groups[0]["params"]}
        for p in map(id, model.momentum_parameters())
    )


def test_frozen_patch_projection_and_sincos_table_bit_identical_after_steps():
    model, config = _model()
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    frozen = {
        "patch weight": model.backbone.patch_embed.proj.weight.detach().clone(),
        "patch bias": model.backbone.patch_embed.proj.bias.detach().clone(),
        "pos": model.backbone.pos_embed.detach().clone(),
        "momentum pos": model.momentum_backbone.pos_embed.detach().clone(),
        "momentum patch": model.momentum_backbone.patch_embed.proj.weight.detach().clone(),
    }
    qkv_before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    x1, x2 = _views()
    for _ in range(3):
        model(x1, x2, momentum=0.9).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.backbone.patch_embed.proj.weight, frozen["patch weight"])
    assert torch.equal(model.backbone.patch_embed.proj.bias, frozen["patch bias"])
    assert torch.equal(model.backbone.pos_embed, frozen["pos"])
    assert torch.equal(model.momentum_backbone.pos_embed, frozen["momentum pos"])
    assert torch.equal(model.momentum_backbone.patch_embed.proj.weight, frozen["momentum patch"])
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, qkv_before)


def test_learned_patch_projection_when_not_frozen():
    model, _ = _model(**{"model.freeze_patch_embed": "false"})
    assert model.backbone.patch_embed.proj.weight.requires_grad


def test_freeze_flag_raises_without_patch_projection(monkeypatch):
    import mocov3.models.moco as moco_module

    class NoPatchBackbone(nn.Module):
        embed_dim = 8

        def forward(self, x):
            return x.flatten(1)[:, :8]

    monkeypatch.setattr(moco_module, "build_backbone", lambda config, in_chans: NoPatchBackbone())
    config = load_config(TINY, ["data.name=synthetic"])
    with pytest.raises(ConfigError, match="no patch projection"):
        moco_module.build_moco(config, in_chans=1)


def test_concatenated_views_equal_per_view():
    model, _ = _model()
    x1, x2 = _views()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.concat_views = True
    loss_concat = model(x1, x2, momentum=0.99)
    loss_concat.backward()
    grads_concat = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    model.zero_grad()
    model.concat_views = False
    loss_split = model(x1, x2, momentum=0.99)
    loss_split.backward()
    torch.testing.assert_close(loss_concat, loss_split, atol=1e-5, rtol=1e-5)
    for name, grad in grads_concat.items():  # to rounding, relative to the largest entry
        split = dict(model.named_parameters())[name].grad
        assert (grad - split).abs().max() <= 1e-4 * split.abs().max() + 1e-7, name


def test_both_encoders_compute_only_the_class_token_in_the_last_block():
    model, _ = _model()
    assert model.backbone.class_token_only_last_block
    assert model.momentum_backbone.class_token_only_last_block
    vit_bn = build_moco(
        load_config(TINY, ["model.mlp_norm=batchnorm", "moco.concat_views=false"]), 1
    )
    assert not vit_bn.backbone.class_token_only_last_block  # its MLP norm reads every token


def test_conv_stem_learns_and_its_momentum_copy_moves_only_by_the_ema():
    model, config = _model(
        **{
            "model.stem": "conv",
            "model.patch_size": 16,
            "data.image_size": 32,
            "model.freeze_patch_embed": "false",
            "moco.concat_views": "false",
        }
    )
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(8, 1, 32, 32, generator=generator) for _ in range(2))
    stem, key_stem = model.backbone.patch_embed.proj, model.momentum_backbone.patch_embed.proj
    model(x1, x2, momentum=0.9).backward()
    assert all(p.grad is not None for p in stem.parameters())  # every stem tensor learns
    assert all(p.grad is None and not p.requires_grad for p in key_stem.parameters())
    optimizer.step()
    optimizer.zero_grad()
    query = {n: p.detach().clone() for n, p in stem.named_parameters()}
    key_before = {n: p.detach().clone() for n, p in key_stem.named_parameters()}
    model(x1, x2, momentum=0.7)
    for name, key in key_stem.named_parameters():
        expected = 0.7 * key_before[name] + 0.3 * query[name]
        torch.testing.assert_close(key.detach(), expected, rtol=1e-6, atol=1e-6)
    # BN statistics are not averaged: each encoder's come from its own forward passes
    assert not torch.equal(key_stem[1].running_mean, stem[1].running_mean)
    assert int(key_stem[1].num_batches_tracked) == int(stem[1].num_batches_tracked) == 4
