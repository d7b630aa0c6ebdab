"""Export to timm/safetensors and import of the reference implementation's checkpoints."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from mocov3.cli import main
from mocov3.errors import CheckpointError, ExportError
from mocov3.interop.pretrained import (
    ARCH_KEY,
    TIMM_VIT_NAMES,
    describe_backbone,
    from_pretrained,
    save_pretrained,
    timm_spec,
)
from mocov3.interop.reference import ReferenceLayoutError, import_reference
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.vit import VisionTransformer, sincos_position_table

# --------------------------------------------------------------------------- helpers


def _timm_from_export(directory: Path) -> nn.Module:
    """What a user of the export does: timm's own loader, nothing of ours."""
    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


# --------------------------------------------------------------------------- export to timm


@pytest.mark.parametrize(
    "img, patch, dim, depth, heads, pos_embed, chans",
    [
        (32, 4, 96, 2, 12, "sincos", 3),  # tiny with 12 heads, patch 4
        (28, 4, 64, 2, 4, "learned", 1),
        (32, 4, 48, 1, 12, "none", 3),
        (224, 16, 384, 12, 12, "sincos", 3),  # the paper's ViT-S/16: 12 heads
    ],
)
def test_export_loads_into_timm_strictly_with_identical_features(
    tmp_path, img, patch, dim, depth, heads, pos_embed, chans
):
    torch.manual_seed(0)
    ours = VisionTransformer(img, patch, chans, dim, depth, heads, pos_embed=pos_embed)
    save_pretrained(ours, tmp_path)
    theirs = _timm_from_export(tmp_path)
    assert theirs.blocks[0].attn.num_heads == heads
    images = torch.randn(3, chans, img, img)
    torch.testing.assert_close(_features(theirs, images), _features(ours, images))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["num_heads"] == heads and config["num_features"] == dim
    arch = config[ARCH_KEY]
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"]) == (dim, depth, heads)
    assert (arch["patch_size"], arch["img_size"], arch["pos_embed"]) == (patch, img, pos_embed)
    assert arch["class_token"] is True and config["timm_verified_version"] == timm.__version__


def test_vit_small_with_12_heads_never_becomes_timm_vit_small():
    arch = describe_backbone(VisionTransformer(224, 16, 3, 384, 12, 12))
    name, kwargs = timm_spec(arch)
    assert name != "vit_small_patch16_224" and kwargs["num_heads"] == 12
    # the name alone (kwargs dropped) must fail loudly, not build 6 heads of width 384
    with torch.device("meta"):
        alone = timm.create_model(name, pretrained=False)
    assert alone.embed_dim != 384


def test_standard_name_only_when_its_defaults_match_exactly():
    six_heads = describe_backbone(VisionTransformer(224, 16, 3, 384, 12, 6))
    assert timm_spec(six_heads)[0] == "vit_small_patch16_224"
    base = describe_backbone(VisionTransformer(224, 16, 3, 768, 2, 12))  # depth differs
    assert timm_spec(base)[0] == "vit_large_patch16_224"  # another width: loud if kwargs lost


@pytest.mark.parametrize("name", sorted(TIMM_VIT_NAMES))
def test_name_table_matches_timm_defaults(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    dim, depth, heads, patch, img = TIMM_VIT_NAMES[name]
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (
        dim,
        depth,
        heads,
    )
    assert model.patch_embed.patch_size == (patch, patch)
    assert model.patch_embed.img_size == (img, img)


def test_export_directory_round_trips_and_refuses_mismatched_weights(tmp_path):
    torch.manual_seed(0)
    ours = VisionTransformer(32, 4, 3, 96, 2, 12)
    save_pretrained(ours, tmp_path, timm_fields=False)
    back = from_pretrained(tmp_path)
    assert back.num_heads == 12 and not back.training
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(back, images), _features(ours, images))
    config = json.loads((tmp_path / "config.json").read_text())
    config[ARCH_KEY]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not match"):
        from_pretrained(tmp_path)


# --------------------------------------------------------------------------- mocov3 export


def test_cli_export_writes_backbone_config_and_card(write_run, tmp_path, capsys):
    run = write_run(tmp_path, ["model.num_heads=8"])
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    weights = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("projector", "predictor", "momentum", "head")) for k in weights)
    loaded = open_checkpoint(run)
    images = torch.randn(2, 1, 28, 28)
    expected = _features(loaded.backbone("query"), images)
    torch.testing.assert_close(_features(_timm_from_export(out), images), expected)
    config = json.loads((out / "config.json").read_text())
    assert config[ARCH_KEY]["num_heads"] == 8 and config["encoder"] == "query"
    assert config["preprocessing"]["mean"] == [0.286]
    card = (out / "README.md").read_text()
    assert "71.25" in card and "77.5" in card and "8 attention heads" in card
    assert "fashion-mnist" in card and "epochs_trained: 2.0" in card
    front = card.split("---\n")[1]  # the Hub's metadata: shown there as a timm model
    assert "library_name: timm" in front and "license: mit" in front
    assert "- mocov3\n- self-supervised\n- image-feature-extraction" in front
    assert json.loads(capsys.readouterr().out)["model_args"]["num_heads"] == 8


def test_cli_export_momentum_encoder_native_format(write_run, tmp_path):
    run = write_run(tmp_path, [])
    out = tmp_path / "momentum"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--encoder", "momentum"]
    assert main([*argv, "--format", "native"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "architecture" not in config and "model_args" not in config
    assert config["encoder"] == "momentum" and config[ARCH_KEY]["model_type"] == "vit"
    assert "library_name" not in (out / "README.md").read_text()
    momentum = open_checkpoint(run).model.momentum_backbone.state_dict()
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == momentum.keys()
    assert all(torch.equal(weights[k], momentum[k]) for k in weights)


def test_cli_export_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- reference layout


def _reference_mlp(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True):
    """The reference's _build_mlp: bias-free Linear, BN+ReLU between, affine-free last BN."""
    modules: list[nn.Module] = []
    for index in range(layers):
        first, last = index == 0, index == layers - 1
        modules.append(nn.Linear(in_dim if first else hidden, out_dim if last else hidden, False))
        if not last:
            modules += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class _ReferenceMoCo(nn.Module):
    """Attribute names of the reference's MoCo: base_encoder (with its head/fc MLP),
    momentum_encoder, predictor."""

    def __init__(self, base: nn.Module, momentum: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.base_encoder, self.momentum_encoder, self.predictor = base, momentum, predictor


class _DDP(nn.Module):
    """Gives every key the ``module.`` prefix, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class _ReferenceConvStem(nn.Module):
    """The reference's ``vits.ConvStem`` in its key names (``proj.0`` .. ``proj.12``),
    written from its description for timm's ``embed_layer``: four conv3x3(stride 2, no
    bias)-BN-ReLU layers from 3 channels to dim/8, doubling, then a 1x1 conv with bias."""

    def __init__(self, img_size: tuple, patch_size: int, embed_dim: int, **_: object) -> None:
        super().__init__()
        self.num_patches = (img_size[0] // patch_size) ** 2  # timm passes the size as a pair
        layers: list[nn.Module] = []
        width_in, width_out = 3, embed_dim // 8
        for _layer in range(4):
            layers += [
                nn.Conv2d(width_in, width_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(width_out),
                nn.ReLU(inplace=True),
            ]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def _reference_vit(dim: int, heads: int = 12, conv_stem: bool = False) -> nn.Module:
    stem = {"embed_layer": _ReferenceConvStem, "depth": 11} if conv_stem else {}
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        embed_dim=dim,
        num_heads=heads,
        num_classes=0,
        **stem,
    )
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_position_table(14, dim))
    return vit


def _reference_resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None, zero_init_residual=True)


def _randomise_bn(module: nn.Module) -> None:
    """Non-trivial BN statistics, so a lost or swapped buffer shows in the features."""
    generator = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            if bn.affine:
                bn.weight.data.uniform_(0.5, 1.5, generator=generator)


def _reference_pretraining(kind: str, tmp_path: Path) -> tuple[Path, _ReferenceMoCo]:
    torch.manual_seed(0)
    if kind.startswith("vit"):
        bases = [_reference_vit(384, conv_stem=kind == "vit_conv_small") for _ in range(2)]
        head, dim, last_bn = "head", 384, True
    else:
        bases = [_reference_resnet50() for _ in range(2)]
        head, dim, last_bn = "fc", 2048, False
    for base in bases:  # small heads keep the files small; the converter reads the widths
        setattr(base, head, _reference_mlp(3 if kind != "resnet50" else 2, dim, 64, 32))
    predictor = _reference_mlp(2, 32, 48, 32, last_bn=last_bn)
    reference = _ReferenceMoCo(bases[0], bases[1], predictor)
    with torch.no_grad():
        _randomise_bn(reference)
        for parameter in reference.momentum_encoder.parameters():
            parameter.add_(0.01)
    file = tmp_path / f"{kind}.pth.tar"
    torch.save({"epoch": 300, "arch": kind, "state_dict": _DDP(reference).state_dict()}, file)
    return file, reference.eval()


@pytest.mark.parametrize("kind", ["vit_small", "vit_conv_small", "resnet50"])
def test_reference_pretraining_checkpoint_converts_and_loads_strictly(tmp_path, kind):
    file, reference = _reference_pretraining(kind, tmp_path)
    out = tmp_path / "ours.pt"
    assert main(["import-reference", str(file), "--out", str(out)]) == 0
    torch.load(out, map_location="cpu", weights_only=True)  # plain tensors and values only
    run = open_checkpoint(out)  # strict load into the model its config describes
    vit = kind.startswith("vit")
    size = 224 if vit else 64
    images = torch.randn(2, 3, size, size)
    head = "head" if vit else "fc"
    with torch.no_grad():
        for ours, theirs in [
            (run.backbone("query"), reference.base_encoder),
            (run.backbone("momentum"), reference.momentum_encoder),
        ]:
            mlp = getattr(theirs, head)
            setattr(theirs, head, nn.Identity())
            expected = theirs(images)
            torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-4)
            setattr(theirs, head, mlp)
        projected = run.model.projector.eval()(run.backbone("query")(images))
        expected = reference.base_encoder(images)
        torch.testing.assert_close(projected, expected, atol=1e-5, rtol=1e-4)
        q = run.model.predictor.eval()(projected)
        torch.testing.assert_close(q, reference.predictor(expected), atol=1e-5, rtol=1e-4)
    if vit:
        assert run.model.backbone.num_heads == 12  # the reference's ViT-S, not DeiT's 6
        assert run.config.model.pos_embed == "sincos"
        conv = kind == "vit_conv_small"
        assert run.config.model.stem == ("conv" if conv else "patch")
        assert len(run.model.backbone.blocks) == (11 if conv else 12)
        assert run.config.model.freeze_patch_embed is not conv
    else:
        assert run.config.model.pred_last_bn is False and run.config.optim.name == "lars"


def test_imported_vit_small_exports_with_12_heads(tmp_path):
    file, _ = _reference_pretraining("vit_small", tmp_path)
    import_reference(file, tmp_path / "ours.pt")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tmp_path / "ours.pt"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] != "vit_small_patch16_224"
    assert config["model_args"]["num_heads"] == 12
    assert _timm_from_export(out).blocks[0].attn.num_heads == 12
    assert "reference" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["vit_small", "vit_base", "resnet50"])
def test_reference_linear_probe_checkpoint_converts(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "resnet50":
        model, size = _reference_resnet50(), 64
        model.fc = nn.Linear(2048, 1000)
    else:
        dim = 384 if kind == "vit_small" else 768
        model, size = _reference_vit(dim), 224
        model.head = nn.Linear(dim, 1000)
    file = tmp_path / "linear.pth.tar"
    torch.save({"epoch": 90, "arch": kind, "state_dict": _DDP(model).state_dict()}, file)
    out = tmp_path / "ours.pt"
    imported = import_reference(file, out)
    assert imported["layout"] == "linear-probe"
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["reference_classifier"]["weight"].shape[0] == 1000
    run = open_checkpoint(out)
    classifier = "fc" if kind == "resnet50" else "head"
    setattr(model, classifier, nn.Identity())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.eval()(images)
        torch.testing.assert_close(run.backbone()(images), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match="only the query backbone"):
        run.backbone("momentum")


@pytest.fixture(scope="module")
def vit_small_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One reference ViT-S checkpoint (~175 MB) for the tests that mangle a copy of it,
    removed after the module (the retention policy only clears per-test folders)."""
    folder = tmp_path_factory.mktemp("reference")
    file, _ = _reference_pretraining("vit_small", folder)
    yield file
    shutil.rmtree(folder, ignore_errors=True)


def _mangle(source: Path, tmp_path: Path, change) -> Path:
    raw = torch.load(source, weights_only=True)
    change(raw)
    file = tmp_path / source.name
    torch.save(raw, file)
    return file


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["state_dict"].pop("module.base_encoder.norm.weight"), "missing"),
        (lambda raw: raw["state_dict"].pop("module.predictor.0.weight"), "missing"),
        (lambda raw: raw["state_dict"].pop("module.momentum_encoder.pos_embed"), "missing"),
        (lambda raw: raw["state_dict"].pop("module.base_encoder.pos_embed"), "ViT without"),
        (
            lambda raw: raw["state_dict"].update(
                {"module.base_encoder.head.extra.weight": torch.zeros(2, 2)}
            ),
            "unexpected",
        ),
        (lambda raw: raw.pop("state_dict"), "no 'state_dict'"),
        (lambda raw: raw.update(arch="deit_small"), "not the reference's"),
        (
            lambda raw: raw.update(state_dict={k[7:]: v for k, v in raw["state_dict"].items()}),
            "lacks 'module.'",
        ),
        (
            lambda raw: raw["state_dict"].update({"module.queue": torch.zeros(3)}),
            "pretraining groups",
        ),
    ],
)
def test_mangled_reference_checkpoint_is_refused_listing_the_layout(
    vit_small_reference, tmp_path, change, message
):
    file = _mangle(vit_small_reference, tmp_path, change)
    with pytest.raises(ReferenceLayoutError, match=message) as caught:
        import_reference(file, tmp_path / "ours.pt")
    assert "expected a MoCo v3 reference checkpoint" in str(caught.value)
    assert not (tmp_path / "ours.pt").exists()


def test_intermediate_reference_checkpoint_records_its_epoch(vit_small_reference, tmp_path):
    file = _mangle(vit_small_reference, tmp_path, lambda raw: raw.update(epoch=10))
    import_reference(file, tmp_path / "ours.pt")
    run = open_checkpoint(tmp_path / "ours.pt")
    assert run.state["epoch"] == 10.0 and run.config.train.epochs == 300.0


@pytest.mark.parametrize("content", [b"e.", b"", b"PK\x03\x04 cut short"])
def test_damaged_reference_file_is_unreadable_not_a_traceback(tmp_path, content):
    file = tmp_path / "damaged.pth.tar"
    file.write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        import_reference(file, tmp_path / "ours.pt")
    assert not (tmp_path / "ours.pt").exists()


def test_cli_import_reference_refusal_is_one_line(tmp_path, capsys):
    file = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, file)
    assert main(["import-reference", str(file), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "module.base_encoder" in err


def test_library_never_unpickles_arbitrary_objects():
    """Every torch.load in the package passes weights_only=True."""
    for path in Path("mocov3").rglob("*.py"):
        text = path.read_text()
        for chunk in text.split("torch.load(")[1:]:
            assert "weights_only=True" in chunk.split(")")[0], path


# --------------------------------------------------------------------------- ResNet export


def test_resnet50_export_loads_into_timm_with_identical_features(tmp_path):
    from mocov3.models.resnet import build_resnet

    torch.manual_seed(0)
    ours = build_resnet("resnet50").eval()
    _randomise_bn(ours)
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet50" and config[ARCH_KEY]["feature_dim"] == 2048
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(
        _features(_timm_from_export(tmp_path), images), _features(ours, images)
    )
    assert torch.equal(_features(from_pretrained(tmp_path), images), _features(ours, images))


def test_resnet_small_stem_exports_natively_and_refuses_timm(tmp_path):
    from mocov3.models.resnet import build_resnet

    ours = build_resnet("resnet18", in_chans=1, small_stem=True).eval()
    with pytest.raises(ExportError, match="--format native"):
        save_pretrained(ours, tmp_path / "timm")
    save_pretrained(ours, tmp_path / "native", timm_fields=False)
    back = from_pretrained(tmp_path / "native")
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(_features(back, images), _features(ours, images))


def test_narrow_resnet_exports_natively_with_its_width_and_refuses_timm(tmp_path):
    from mocov3.models.resnet import build_resnet

    ours = build_resnet("resnet18", in_chans=1, width=16).eval()
    with pytest.raises(ExportError, match="resnet_width"):
        save_pretrained(ours, tmp_path / "timm")
    save_pretrained(ours, tmp_path / "native", timm_fields=False)
    back = from_pretrained(tmp_path / "native")
    assert back.layer4[-1].conv2.out_channels == 128
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(_features(back, images), _features(ours, images))
    # files written before model.resnet_width carry no "width": they are torchvision's 64
    wide = build_resnet("resnet18", in_chans=1).eval()
    save_pretrained(wide, tmp_path / "old", timm_fields=False)
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    assert meta[ARCH_KEY].pop("width") == 64
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert torch.equal(
        _features(from_pretrained(tmp_path / "old"), images), _features(wide, images)
    )


def test_vit_bn_exports_natively_with_its_running_statistics_and_refuses_timm(tmp_path):
    torch.manual_seed(0)
    ours = VisionTransformer(28, 14, 1, 32, 2, 2, mlp_norm="batchnorm")
    ours(torch.randn(8, 1, 28, 28) * 2 + 1)  # running statistics away from their init
    ours.eval()
    with pytest.raises(ExportError, match="--format native"):
        save_pretrained(ours, tmp_path / "timm")
    save_pretrained(ours, tmp_path / "native", timm_fields=False)
    back = from_pretrained(tmp_path / "native")
    assert back.mlp_norm == "batchnorm"
    torch.testing.assert_close(back.blocks[0].norm2.running_var, ours.blocks[0].norm2.running_var)
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(_features(back, images), _features(ours, images))


def test_conv_stem_vit_exports_natively_with_its_stem_statistics_and_refuses_timm(tmp_path):
    torch.manual_seed(0)
    ours = VisionTransformer(32, 16, 1, 32, 2, 2, stem="conv")
    ours(torch.randn(8, 1, 32, 32) * 2 + 1)  # the stem's BN statistics away from their init
    ours.eval()
    with pytest.raises(ExportError, match="conv stem.*--format native"):
        save_pretrained(ours, tmp_path / "timm")
    save_pretrained(ours, tmp_path / "native", timm_fields=False)
    back = from_pretrained(tmp_path / "native")
    assert back.stem == "conv" and len(back.blocks) == 2
    torch.testing.assert_close(
        back.patch_embed.proj[1].running_mean, ours.patch_embed.proj[1].running_mean
    )
    images = torch.randn(2, 1, 32, 32)
    assert torch.equal(_features(back, images), _features(ours, images))
