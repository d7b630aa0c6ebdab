"""Speed settings: each flag does what it says (no silent no-ops) and leaves the maths alone."""

from __future__ import annotations

import torch

from mocov3.config import load_config
from mocov3.models.moco import build_moco
from mocov3.runtime.performance import (
    apply_memory_format,
    compile_backbones,
    set_tf32,
    to_memory_format,
)


def _model(*overrides: str):
    config = load_config("configs/tiny.yaml", ["data.name=synthetic", *overrides])
    torch.manual_seed(0)
    return build_moco(config, in_chans=3), config


def test_channels_last_changes_the_layout_and_not_the_loss():
    plain, config = _model()
    nhwc, config_nhwc = _model("train.channels_last=true")
    apply_memory_format(nhwc, config_nhwc.train)
    weight = nhwc.backbone.patch_embed.proj.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.backbone.patch_embed.proj.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 3, 28, 28), torch.randn(8, 3, 28, 28)
    y1, y2 = to_memory_format(x1, config_nhwc.train), to_memory_format(x2, config_nhwc.train)
    assert y1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(y1, y2, 0.99), plain(x1, x2, 0.99), rtol=1e-5, atol=1e-5)


def test_compile_flag_compiles_both_backbones_in_place_and_keeps_checkpoint_keys():
    model, config = _model()
    assert compile_backbones(model, config.train) == []
    keys = set(model.state_dict())
    model, config = _model("train.compile=true")
    assert compile_backbones(model, config.train) == ["backbone", "momentum_backbone"]
    assert model.backbone._compiled_call_impl is not None
    assert model.momentum_backbone._compiled_call_impl is not None
    assert set(model.state_dict()) == keys  # no "_orig_mod." prefixes


def test_tf32_is_only_switched_on_for_cuda_devices_that_have_it():
    before = torch.backends.cuda.matmul.allow_tf32
    assert set_tf32(True, torch.device("cpu")) is False
    assert torch.backends.cuda.matmul.allow_tf32 == before
