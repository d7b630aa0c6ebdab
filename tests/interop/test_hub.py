"""Hub-ready exports: timm's own loader reads an export directory as is (``local-dir:``, and
``hf-hub:`` once pushed), exports in the previous layout still load, and ``--push-to-hub``
hands the directory to huggingface_hub (its network calls recorded, nothing sent)."""

import json
import shutil
import sys
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError

import mocov3
from mocov3.cli import main
from mocov3.errors import ExportError
from mocov3.interop.hub import push_to_hub
from mocov3.interop.pretrained import ARCH_KEY, FORMAT_NAME

REPO = "someone/tiny-mocov3"


def _export(run: Path, out: Path, *flags: str) -> int:
    return main(["export", "--checkpoint", str(run), "--out", str(out), *flags])


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def _timm_matches_load_backbone(directory: Path, images: torch.Tensor) -> torch.nn.Module:
    theirs = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    expected = _features(mocov3.load_backbone(directory), images)
    torch.testing.assert_close(_features(theirs, images), expected, atol=1e-5, rtol=1e-4)
    return theirs


@pytest.fixture
def vit_export(write_run, tmp_path) -> Path:
    assert _export(write_run(tmp_path, ["model.num_heads=8"]), tmp_path / "export") == 0
    return tmp_path / "export"


# --------------------------------------------------------------------------- timm reads it


def test_timm_local_dir_loads_a_vit_export_with_its_preprocessing(vit_export):
    theirs = _timm_matches_load_backbone(vit_export, torch.randn(4, 1, 28, 28))
    assert theirs.blocks[0].attn.num_heads == 8 and theirs.num_classes == 0
    data = timm.data.resolve_data_config({}, model=theirs)
    assert data["input_size"] == (1, 28, 28)
    assert list(data["mean"]) == [0.286] and list(data["std"]) == [0.353]
    config = json.loads((vit_export / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"  # another width: loud without args
    assert (config["num_classes"], config["num_features"]) == (0, 64)
    assert config["model_args"]["num_heads"] == 8 and config[ARCH_KEY]["num_heads"] == 8
    assert config["pretrained_cfg"]["license"] == "mit" and config["format_version"] == 2


def test_timm_local_dir_loads_a_resnet_export(write_run, tmp_path):
    heads = ["model.proj_hidden_dim=64", "model.pred_hidden_dim=64", "model.out_dim=32"]
    run = write_run(tmp_path, ["model.small_stem=false", *heads], "configs/resnet18_demo.yaml")
    assert _export(run, tmp_path / "export") == 0
    theirs = _timm_matches_load_backbone(tmp_path / "export", torch.randn(2, 1, 64, 64))
    assert type(theirs).__name__ == "ResNet" and theirs.num_features == 512
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["global_pool"] == "avg"
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]


# --------------------------------------------------------------------------- previous layout


def _as_previous_layout(directory: Path, old: Path) -> None:
    """The export as format 1 wrote it: our dict under "architecture", timm_model_name
    and timm_kwargs beside it, none of timm's own fields."""
    config = json.loads((directory / "config.json").read_text())
    kept = ("encoder", "preprocessing", "training", "results", "mocov3_config")
    previous = {
        "format": FORMAT_NAME,
        "format_version": 1,
        "library": "mocov3",
        "library_version": "0.1.0",
        "architecture": config[ARCH_KEY],
        **{key: config[key] for key in kept},
        "timm_model_name": config["architecture"],
        "timm_kwargs": config["model_args"],
        "timm_verified_version": config["timm_verified_version"],
    }
    old.mkdir()
    shutil.copy(directory / "model.safetensors", old)
    (old / "config.json").write_text(json.dumps(previous, indent=2))


def test_previous_layout_still_loads_and_exports_again_in_place(vit_export, tmp_path, capsys):
    old = tmp_path / "old"
    _as_previous_layout(vit_export, old)
    images = torch.randn(3, 1, 28, 28)
    expected = _features(mocov3.load_backbone(vit_export), images)
    assert torch.equal(_features(mocov3.load_backbone(old), images), expected)
    assert torch.equal(_features(mocov3.from_pretrained(old), images), expected)
    with pytest.raises((AttributeError, KeyError, TypeError)):  # why the layout changed
        timm.create_model(f"local-dir:{old}", pretrained=True)
    assert _export(old, old) == 0  # rewritten in today's layout, its record kept
    _timm_matches_load_backbone(old, images)
    config = json.loads((old / "config.json").read_text())
    assert config["training"]["epochs_trained"] == 2.0 and config["results"]["knn_top1"] == 71.25
    assert "71.25" in (old / "README.md").read_text() and "timm_kwargs" not in config
    assert sorted(p.name for p in old.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert _export(old, tmp_path / "m", "--encoder", "momentum") == 2
    assert "holds the query encoder" in capsys.readouterr().err


# --------------------------------------------------------------------------- push


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """HfApi's three network calls, recorded instead of sent (what upload_folder would
    send is read from the folder at call time)."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        sent = {p.name: p.read_bytes() for p in folder.iterdir()}
        calls.append(("upload_folder", {**kwargs, "sent": sent}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_cli_push_uploads_the_export_directory(write_run, tmp_path, hub_calls, capsys):
    out = tmp_path / "export"
    flags = ["--push-to-hub", REPO, "--private", "--revision", "v1"]
    assert _export(write_run(tmp_path, []), out, *flags) == 0
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in hub_calls)
    assert create == {"repo_id": REPO, "private": True, "exist_ok": True}
    assert branch == {"repo_id": REPO, "branch": "v1", "exist_ok": True}
    assert upload["repo_id"] == REPO and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == out
    assert sorted(upload["sent"]) == ["README.md", "config.json", "model.safetensors"]
    assert upload["sent"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = upload["sent"]["README.md"].decode()
    assert card.startswith("---\nlibrary_name: timm\n") and f"'hf-hub:{REPO}'" in card
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1])["hub_url"] == (
        f"https://huggingface.co/{REPO}/tree/v1"
    )
    assert f"pushed {out} to https://huggingface.co/{REPO}/tree/v1" in printed.err


def test_push_to_hub_returns_the_repo_url(vit_export, hub_calls):
    assert push_to_hub(vit_export, REPO) == f"https://huggingface.co/{REPO}"
    assert hub_calls[0][1]["private"] is False and len(hub_calls) == 2  # no branch made
    assert push_to_hub(vit_export, "other/name").endswith("/other/name")
    assert "'hf-hub:other/name'" in (vit_export / "README.md").read_text()


def test_push_without_huggingface_hub_is_one_line(write_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if missing
    assert _export(write_run(tmp_path, []), tmp_path / "export", "--push-to-hub", REPO) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'mocov3[hub]'" in err
    assert not (tmp_path / "export").exists()  # said before any work


def _unauthorised() -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError("401 Client Error", response=httpx.Response(401, request=request))


@pytest.mark.parametrize("error", [LocalTokenNotFoundError("no token"), _unauthorised()])
def test_push_when_not_logged_in_says_how_to_log_in(vit_export, monkeypatch, error):
    def create_repo(self, repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(ExportError, match="run huggingface-cli login or set HF_TOKEN"):
        push_to_hub(vit_export, REPO)


def test_push_refuses_what_is_not_an_export(tmp_path, hub_calls):
    with pytest.raises(ExportError, match="not an export directory"):
        push_to_hub(tmp_path, REPO)
    assert hub_calls == []


def test_hub_flags_need_push_to_hub(tmp_path, capsys):
    assert _export(tmp_path / "nope", tmp_path / "x", "--private") == 2
    assert "--push-to-hub" in capsys.readouterr().err and not (tmp_path / "x").exists()
