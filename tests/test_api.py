"""The Python API: build_model, load_backbone, save_pretrained / from_pretrained."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mocov3
from mocov3.config import load_config
from mocov3.errors import CheckpointError, ExportError
from mocov3.models.moco import MoCo
from mocov3.runtime.checkpoint import save_checkpoint


def _checkpoint(tmp_path: Path) -> Path:
    """A run directory whose checkpoint.pt has distinct query and momentum backbones."""
    config = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    model = mocov3.build_model(config.to_dict(), in_chans=1)
    with torch.no_grad():
        for parameter in model.momentum_parameters():
            parameter.mul_(1.1)
    state = {"model": model.state_dict(), "config": config.to_dict(), "in_chans": 1}
    save_checkpoint(
        {**state, "mean": [0.5], "std": [0.25], "version": "0.1.0"},
        tmp_path / "run" / "checkpoint.pt",
    )
    return tmp_path / "run"


def _features(backbone: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return backbone(torch.ones(2, 1, 28, 28) * torch.linspace(0, 1, 28))


def test_public_names_and_version():
    assert mocov3.__version__ == "0.1.0"
    for name in ("build_model", "load_backbone", "save_pretrained", "from_pretrained"):
        assert callable(getattr(mocov3, name))
    with pytest.raises(AttributeError):
        mocov3.no_such_name  # noqa: B018


def test_build_model_from_preset_path_config_and_dict():
    from_path = mocov3.build_model("configs/tiny.yaml")
    assert isinstance(from_path, MoCo) and from_path.backbone.num_heads == 4
    config = load_config("configs/tiny.yaml", ["model.num_heads=8"])
    assert mocov3.build_model(config).backbone.num_heads == 8
    assert (
        mocov3.build_model(config.to_dict(), in_chans=1).backbone.patch_embed.proj.in_channels == 1
    )


@pytest.mark.parametrize("encoder", ["query", "momentum"])
def test_load_backbone_from_checkpoint_run_dir_and_export_dir(tmp_path, encoder):
    run = _checkpoint(tmp_path)
    from_file = mocov3.load_backbone(run / "checkpoint.pt", encoder=encoder)
    from_dir = mocov3.load_backbone(run, encoder=encoder)
    assert not from_file.training
    assert torch.equal(_features(from_file), _features(from_dir))
    exported = mocov3.save_pretrained(from_file, tmp_path / "export", encoder=encoder)
    from_export = mocov3.load_backbone(exported, encoder=encoder)
    assert not from_export.training and from_export.num_heads == 4
    assert torch.equal(_features(from_export), _features(from_file))
    assert torch.equal(_features(mocov3.from_pretrained(exported)), _features(from_file))


def test_query_and_momentum_differ_and_export_refuses_the_other_encoder(tmp_path):
    run = _checkpoint(tmp_path)
    query, momentum = (mocov3.load_backbone(run, e) for e in ("query", "momentum"))
    assert not torch.equal(_features(query), _features(momentum))
    exported = mocov3.save_pretrained(
        mocov3.build_model("configs/tiny.yaml"), tmp_path / "m", "momentum"
    )
    with pytest.raises(ExportError, match="momentum encoder"):
        mocov3.load_backbone(exported)
    with pytest.raises(ValueError, match="encoder"):
        mocov3.load_backbone(run, encoder="key")


def test_save_pretrained_of_a_moco_writes_only_its_backbone(tmp_path):
    model = mocov3.build_model("configs/tiny.yaml")
    out = mocov3.save_pretrained(model, tmp_path / "export")
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == model.backbone.state_dict().keys()
    config = json.loads((out / "config.json").read_text())
    assert config["mocov3_architecture"]["num_heads"] == 4
    assert config["model_args"]["num_heads"] == 4  # timm's fields: architecture is its name
    assert config["architecture"] == "vit_base_patch16_224"


def test_load_backbone_of_a_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        mocov3.load_backbone(tmp_path / "nothing")
