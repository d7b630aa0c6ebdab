"""The export format: a backbone directory that leaves this library cleanly.

A directory holds ``model.safetensors`` (the backbone's state dict only: no heads, no
momentum copy, no optimizer state) and ``config.json``, which spells out the exact
architecture. Nothing is guessed from a model name, because names lie: the paper's ViT-S has
12 heads where timm's and DeiT's ``vit_small`` have 6, and since the head count changes no
tensor shape, the weights of one load into the other without an error and compute a
different function.

For timm, ``config.json`` is also timm's own Hub config (the fields ``save_for_hf``
writes: ``architecture`` the model name, ``model_args``, ``num_classes``, ``num_features``,
``pretrained_cfg`` with input size and mean/std), so ``timm.create_model('local-dir:DIR',
pretrained=True)`` or ``'hf-hub:USER/REPO'`` rebuilds the same function with no code of
ours; our own description sits under ``mocov3_architecture``. A standard name is used only
when its defaults equal the architecture exactly; otherwise a name whose default width
differs, so that the name used *without* ``model_args`` fails loudly with a shape error
instead of silently building another head count.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mocov3 import __version__
from mocov3.errors import ExportError
from mocov3.models.resnet import build_resnet
from mocov3.models.vit import LAYER_NORM_EPS, VisionTransformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_NAME = "mocov3-backbone"
FORMAT_VERSION = 2  # 1: "architecture" was our dict; 2: timm's fields, ours under ARCH_KEY
ARCH_KEY = "mocov3_architecture"
EVAL_CROP_PCT = 224 / 256  # the reference's validation Resize(256) + CenterCrop(224)
PAPER = {
    "paper_name": "An Empirical Study of Training Self-Supervised Vision Transformers",
    "paper_ids": "arXiv:2104.02057",
}

# timm name: (embed_dim, depth, num_heads, patch_size, img_size) of its defaults (mlp ratio 4)
TIMM_VIT_NAMES: dict[str, tuple[int, int, int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3, 16, 224),
    "vit_small_patch16_224": (384, 12, 6, 16, 224),  # 6 heads: never the paper's ViT-S
    "vit_small_patch8_224": (384, 12, 6, 8, 224),
    "vit_small_patch32_224": (384, 12, 6, 32, 224),
    "vit_base_patch16_224": (768, 12, 12, 16, 224),
    "vit_base_patch8_224": (768, 12, 12, 8, 224),
    "vit_base_patch32_224": (768, 12, 12, 32, 224),
    "vit_large_patch16_224": (1024, 24, 16, 16, 224),
    "vit_huge_patch14_224": (1280, 32, 16, 14, 224),
}

# torchvision layout of each ResNet: (blocks per stage, bottleneck blocks)
RESNET_LAYOUTS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


# --------------------------------------------------------------------------- architecture


def describe_backbone(backbone: nn.Module) -> dict[str, Any]:
    """The architecture of ``backbone`` as plain JSON values, read from the module itself
    (not from a config or a name), so what is written is what computed the features."""
    if isinstance(backbone, VisionTransformer):
        return _describe_vit(backbone)
    if _is_torchvision_resnet(backbone):
        return _describe_resnet(backbone)
    raise ExportError(
        f"cannot export a {type(backbone).__name__}: only mocov3's VisionTransformer and "
        "torchvision-layout ResNets are supported"
    )


def _describe_vit(model: VisionTransformer) -> dict[str, Any]:
    heads = {int(block.attn.num_heads) for block in model.blocks}
    if heads != {int(model.num_heads)}:
        raise ExportError(f"inconsistent head counts {sorted(heads)} across ViT blocks")
    embed_dim = int(model.embed_dim)
    hidden = int(model.blocks[0].mlp.fc1.out_features) if len(model.blocks) else 4 * embed_dim
    return {
        "model_type": "vit",
        "embed_dim": embed_dim,
        "depth": len(model.blocks),
        "num_heads": int(model.num_heads),
        "patch_size": int(model.patch_embed.patch_size),
        "img_size": int(model.patch_embed.img_size),
        "in_chans": int(model.patch_embed.in_chans),
        "stem": model.stem,
        "mlp_ratio": hidden / embed_dim,
        "pos_embed": model.pos_embed_type,
        "mlp_norm": model.mlp_norm,
        "class_token": True,
        "global_pool": "token",
        "qkv_bias": True,
        "layer_norm_eps": LAYER_NORM_EPS,
        "feature_dim": embed_dim,
        "feature": "class token after the final LayerNorm",
    }


def _is_torchvision_resnet(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("conv1", "bn1", "layer1", "layer4", "fc"))


def _describe_resnet(model: nn.Module) -> dict[str, Any]:
    blocks = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    bottleneck = hasattr(model.layer1[0], "conv3")
    arch = next(
        (name for name, layout in RESNET_LAYOUTS.items() if layout == (blocks, bottleneck)),
        None,
    )
    if arch is None:
        raise ExportError(
            f"ResNet with stages {blocks} matches none of {', '.join(RESNET_LAYOUTS)}"
        )
    if not isinstance(model.fc, nn.Identity):
        raise ExportError("the ResNet still has its fc layer; export the backbone (fc = Identity)")
    conv1, last = model.conv1, model.layer4[-1]
    small_stem = tuple(conv1.kernel_size) == (3, 3) and isinstance(model.maxpool, nn.Identity)
    return {
        "model_type": "resnet",
        "arch": arch,
        "in_chans": int(conv1.in_channels),
        "small_stem": small_stem,
        "width": int(model.layer1[0].conv1.in_channels),
        "feature_dim": int((last.conv3 if bottleneck else last.conv2).out_channels),
        "feature": "global average of the last stage (torchvision's avgpool), fc removed",
    }


def build_from_architecture(arch: dict[str, Any]) -> nn.Module:
    """A fresh backbone of the described architecture (the inverse of describe_backbone)."""
    kind = arch.get("model_type")
    if kind == "vit":
        return VisionTransformer(
            img_size=arch["img_size"],
            patch_size=arch["patch_size"],
            in_chans=arch["in_chans"],
            embed_dim=arch["embed_dim"],
            depth=arch["depth"],
            num_heads=arch["num_heads"],
            mlp_ratio=arch["mlp_ratio"],
            pos_embed=arch["pos_embed"],
            mlp_norm=arch.get("mlp_norm", "layernorm"),  # files written before ViT-BN
            stem=arch.get("stem", "patch"),  # files written before the conv stem
        )
    if kind == "resnet":
        return build_resnet(
            arch["arch"],
            arch["in_chans"],
            arch.get("small_stem", False),
            arch.get("width", 64),  # files written before model.resnet_width
        )
    raise ExportError(f"unknown model_type {kind!r} in the architecture (expected vit or resnet)")


# --------------------------------------------------------------------------- timm


def timm_spec(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(timm_model_name, timm_kwargs)`` that build exactly ``arch`` in timm."""
    if arch["model_type"] == "resnet":
        if arch["small_stem"]:
            raise ExportError(
                "timm has no ResNet with a 3x3 stride-1 stem and no max-pool (model.small_stem): "
                "export with --format native"
            )
        if arch.get("width", 64) != 64:
            raise ExportError(
                f"timm's {arch['arch']} has 64 channels in layer1, this one "
                f"{arch['width']} (model.resnet_width): export with --format native"
            )
        return arch["arch"], {"in_chans": arch["in_chans"], "num_classes": 0, "global_pool": "avg"}
    if arch.get("mlp_norm", "layernorm") != "layernorm":
        raise ExportError(
            "timm's VisionTransformer has no BatchNorm before the MLP (model.mlp_norm "
            f"{arch['mlp_norm']}, the paper's ViT-BN): export with --format native"
        )
    if arch.get("stem", "patch") != "patch":
        raise ExportError(
            "timm's VisionTransformer has no conv stem (model.stem conv, the reference's "
            "vit_conv_*; timm could take it only as custom code): export with --format native"
        )
    kwargs: dict[str, Any] = {
        "img_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "in_chans": arch["in_chans"],
        "embed_dim": arch["embed_dim"],
        "depth": arch["depth"],
        "num_heads": arch["num_heads"],
        "mlp_ratio": arch["mlp_ratio"],
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
        "num_classes": 0,
    }
    if arch["pos_embed"] == "none":
        kwargs["pos_embed"] = "none"
    name = timm_vit_name(arch)
    _check_name_alone(name, arch)
    return name, kwargs


def timm_vit_name(arch: dict[str, Any]) -> str:
    """A standard name when its defaults are exactly ``arch``; else one of another width."""
    dims = (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"])
    for name, default in TIMM_VIT_NAMES.items():
        if default == (*dims, arch["img_size"]) and arch["mlp_ratio"] == 4.0:
            return name
    return "vit_base_patch16_224" if arch["embed_dim"] != 768 else "vit_large_patch16_224"


def _check_name_alone(name: str, arch: dict[str, Any]) -> None:
    """The guard against the 12-vs-6-heads trap: a name whose defaults share our width
    must share our head count too, so even a user who drops the kwargs gets either the
    right function or a shape error, never a silently different attention."""
    dim, _, heads, _, _ = TIMM_VIT_NAMES[name]
    if dim == arch["embed_dim"] and heads != arch["num_heads"]:
        raise ExportError(f"internal: timm name {name} would imply {heads} heads, not {arch}")


def timm_config(
    arch: dict[str, Any],
    preprocessing: dict[str, Any] | None = None,
    license_id: str | None = None,
) -> dict[str, Any]:
    """The config.json fields timm's own loader reads (``local-dir:``, ``hf-hub:``), laid
    out as ``timm.models.save_for_hf`` writes them, so no mocov3 code is needed to load."""
    name, kwargs = timm_spec(arch)
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": arch["feature_dim"],
        "global_pool": kwargs["global_pool"],
        "model_args": kwargs,
        "pretrained_cfg": timm_pretrained_cfg(arch, preprocessing or {}, license_id),
    }


def timm_pretrained_cfg(
    arch: dict[str, Any], preprocessing: dict[str, Any], license_id: str | None
) -> dict[str, Any]:
    """What timm's ``resolve_data_config`` hands ``create_transform``: the input size and
    the mean/std the backbone was trained with (timm's defaults when they are unknown, as
    for a bare ``save_pretrained``); only fields timm's ``PretrainedCfg`` accepts."""
    vit = arch["model_type"] == "vit"
    size = int(arch["img_size"] if vit else preprocessing.get("image_size") or 224)
    cfg: dict[str, Any] = {
        "tag": "mocov3",
        "custom_load": False,
        "input_size": [arch["in_chans"], size, size],
        "fixed_input_size": vit,
        "interpolation": "bilinear",  # mocov3 resizes bilinear, antialiased
        "crop_pct": EVAL_CROP_PCT,
        "crop_mode": "center",
        "num_classes": 0,
        "first_conv": "patch_embed.proj" if vit else "conv1",
        "classifier": "head" if vit else "fc",
        **PAPER,
    }
    if preprocessing.get("mean") and preprocessing.get("std"):
        cfg["mean"] = [float(v) for v in preprocessing["mean"]]
        cfg["std"] = [float(v) for v in preprocessing["std"]]
    if license_id:
        cfg["license"] = license_id
    return cfg


def verify_with_timm(directory: Path, backbone: nn.Module) -> str | None:
    """Load ``directory`` the way a timm user does and compare features on random images.
    Returns timm's version, or None when timm is not installed (not verified)."""
    try:
        import timm
    except ImportError:
        return None
    name = read_pretrained_config(directory)["architecture"]
    try:
        theirs = _timm_from_directory(timm, directory)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"timm {name} cannot load the export: {first[:200]}") from None
    ours_heads = getattr(backbone, "num_heads", None)
    if ours_heads is not None and theirs.blocks[0].attn.num_heads != ours_heads:
        built = theirs.blocks[0].attn.num_heads
        raise ExportError(f"timm {name} built {built} heads where the backbone has {ours_heads}")
    _compare_features(backbone, theirs, name)
    return str(timm.__version__)


def _timm_from_directory(timm: Any, directory: Path) -> nn.Module:
    """``timm.create_model('local-dir:DIR', pretrained=True)``; a timm too old for local
    directories gets what its Hub loader would do: name + model_args, strict load."""
    if _reads_local_dirs():
        return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    config = json.loads((directory / CONFIG_NAME).read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    return model.eval()


def _reads_local_dirs() -> bool:
    from timm.models import parse_model_name

    try:
        return parse_model_name("local-dir:x")[0] == "local-dir"
    except (AssertionError, ValueError):
        return False


def _compare_features(ours: nn.Module, theirs: nn.Module, name: str) -> None:
    arch = describe_backbone(ours)
    size = arch.get("img_size", 64)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, arch["in_chans"], size, size, generator=generator)
    was_training = ours.training
    ours.eval()
    with torch.no_grad():
        expected, got = ours(images), theirs(images)
    ours.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-4, rtol=1e-3):
        raise ExportError(f"timm {name} loads the weights but computes different features")


# --------------------------------------------------------------------------- directories


def save_pretrained(
    backbone: nn.Module,
    directory: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    timm_fields: bool = True,
    card: str | None = None,
    preprocessing: dict[str, Any] | None = None,
    license_id: str | None = None,
) -> Path:
    """Write ``backbone`` as an export directory; returns the directory.

    ``extra`` adds JSON entries to config.json (encoder, training...); ``timm_fields``
    adds timm's own config fields (see :func:`timm_config`) and, when timm is installed,
    loads the result through ``local-dir:`` to check its features; ``preprocessing``
    (image_size, mean, std) fills timm's ``pretrained_cfg``; ``card`` is the README.md
    text. The files are staged in a hidden folder and moved in once checked, so a refused
    export leaves an earlier one in ``directory`` intact."""
    directory = Path(directory)
    arch = describe_backbone(backbone)
    config = timm_config(arch, preprocessing, license_id) if timm_fields else {}
    config.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        library="mocov3",
        library_version=__version__,
    )
    config[ARCH_KEY] = arch
    if preprocessing is not None:
        config["preprocessing"] = preprocessing
    config.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=directory) as tmp:
        staging = Path(tmp)
        _write_files(staging, backbone, config, card)
        if timm_fields:
            config["timm_verified_version"] = verify_with_timm(staging, backbone)
            _write_json(staging / CONFIG_NAME, config)
        for file in staging.iterdir():
            os.replace(file, directory / file.name)
    return directory


def _write_files(
    directory: Path, backbone: nn.Module, config: dict[str, Any], card: str | None
) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    save_file(
        state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "mocov3": FORMAT_NAME}
    )
    _write_json(directory / CONFIG_NAME, config)
    if card is not None:
        (directory / CARD_NAME).write_text(card)


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n")


def is_export_directory(path: str | Path) -> bool:
    """A directory with a config.json: what every command that takes ``--checkpoint``
    reads as an export rather than a run directory."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_pretrained_config(directory: str | Path) -> dict[str, Any]:
    """config.json of an export directory, checked to be this format."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(f"{directory} is not an export directory (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ExportError(f"{path} is not a {FORMAT_NAME} config (no format: {FORMAT_NAME})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{path} has format_version {config['format_version']}: upgrade mocov3")
    return config


def architecture_of(config: dict[str, Any]) -> dict[str, Any]:
    """Our architecture description: under ``mocov3_architecture``, or under
    ``architecture`` in directories written before format 2 (kept readable so existing
    exports still load; there ``architecture`` was our dict, not timm's model name)."""
    arch = config.get(ARCH_KEY)
    if arch is None and isinstance(config.get("architecture"), dict):
        arch = config["architecture"]
    if not isinstance(arch, dict):
        raise ExportError(f"{CONFIG_NAME} has no {ARCH_KEY}: not written by mocov3 export")
    return arch


def from_pretrained(directory: str | Path) -> nn.Module:
    """The backbone of an export directory, weights loaded strictly, in eval mode."""
    directory = Path(directory)
    config = read_pretrained_config(directory)
    backbone = build_from_architecture(architecture_of(config))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        backbone.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as error:
        first = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        raise ExportError(f"{weights} does not match its {CONFIG_NAME} ({first[:160]})") from None
    return backbone.eval()
