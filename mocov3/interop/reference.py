"""``mocov3 import-reference``: the reference implementation's checkpoints in our format.

Users already hold the released ViT-S, ViT-B and ResNet-50 weights (and may hold the
reference's conv-stem ViTs, ``vit_conv_small`` / ``vit_conv_base``); converting them lets
those be probed, fine-tuned and exported here. Two layouts are recognised, both a dict whose
``state_dict`` has DDP's ``module.`` prefix:

- pretraining (main_moco.py): ``base_encoder.*`` (backbone plus the projector MLP as
  ``head.N`` for ViT, ``fc.N`` for ResNet), ``momentum_encoder.*`` (the same) and
  ``predictor.N``; these map to our ``backbone``, ``projector``, ``momentum_backbone``,
  ``momentum_projector`` and ``predictor``, index for index;
- linear probe (main_lincls.py): the backbone plus a ``head`` (ViT) or ``fc`` (ResNet)
  classifier, which is kept aside under ``reference_classifier``. The probe's backbone is
  the pretraining query encoder; no momentum encoder or heads exist in such a file.

The head count is not in any tensor shape, so it comes from the file's ``arch`` (the
reference's ``vit_small`` has 12 heads, not DeiT's 6) or, without one, from the width.
Anything else is refused with the list of what was expected; nothing is guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mocov3 import __version__
from mocov3.config import VIT_SIZES, Config, apply_overrides
from mocov3.errors import CheckpointError, ConfigError
from mocov3.models.moco import build_backbone, build_moco
from mocov3.models.vit import sincos_position_table
from mocov3.runtime.checkpoint import load_weights_only, save_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_ARCHS = {"vit_small": VIT_SIZES["vit_small"], "vit_base": VIT_SIZES["vit_base"]}
# the reference's conv-stem ViTs: our arch with model.stem conv, which drops one block
CONV_STEM_ARCHS = {"vit_conv_small": "vit_small", "vit_conv_base": "vit_base"}
RESNET50_LAST = "layer4.2.conv3.weight"
EXPECTED = (
    "expected a MoCo v3 reference checkpoint: a dict with 'state_dict' holding either "
    "pretraining keys module.base_encoder.*, module.momentum_encoder.*, module.predictor.N.* "
    "or linear-probe keys module.<backbone> plus the classifier module.head.* (ViT) / "
    "module.fc.* (ResNet-50); backbones: ViT-S/16 or ViT-B/16 (patch_embed.proj, cls_token, "
    "pos_embed, blocks.N, norm), their conv-stem versions vit_conv_small/base "
    "(patch_embed.proj.0-12) or torchvision ResNet-50 (conv1, bn1, layer1-4)"
)
PRETRAIN_GROUPS = ("base_encoder", "momentum_encoder", "predictor")


class ReferenceLayoutError(CheckpointError):
    """A file that is not a reference checkpoint we can convert; says what was expected."""


def import_reference(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Convert ``source`` and write our checkpoint to ``out``; returns what was imported."""
    source, out = Path(source), Path(out)
    raw = _load(source)
    weights = _strip_module(_state_dict(raw, source), source)
    arch_name = raw.get("arch") if isinstance(raw.get("arch"), str) else None
    if any(key.split(".")[0] in PRETRAIN_GROUPS for key in weights):
        state = _convert_pretraining(weights, arch_name, raw, source)
    else:
        state = _convert_probe(weights, arch_name, raw, source)
    save_checkpoint(state, out)
    return state["imported"]


def _load(path: Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: the reference's files hold only tensors,
    numbers and strings, so nothing in them needs (or is allowed) to run."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    raw = load_weights_only(path)
    if not isinstance(raw, dict):
        raise ReferenceLayoutError(f"{path} holds a {type(raw).__name__}; {EXPECTED}")
    return raw


def _state_dict(raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    weights = raw.get("state_dict")
    if not isinstance(weights, dict) or not weights:
        raise ReferenceLayoutError(f"{path} has no 'state_dict' entry; {EXPECTED}")
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ReferenceLayoutError(f"{path}: 'state_dict' holds non-tensor values; {EXPECTED}")
    return weights


def _strip_module(weights: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` prefix; every key must carry it."""
    missing = [key for key in weights if not key.startswith("module.")]
    if missing:
        raise ReferenceLayoutError(f"{path}: key {missing[0]!r} lacks 'module.'; {EXPECTED}")
    return {key.removeprefix("module."): value for key, value in weights.items()}


def _group(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- backbones


VIT_KEYS = ("cls_token", "pos_embed", "blocks.0.mlp.fc1.weight")
PATCH_KEY = "patch_embed.proj.weight"  # the patch projection
CONV_STEM_KEY = "patch_embed.proj.12.weight"  # the conv stem's closing 1x1 conv


def _backbone_kind(backbone: dict[str, torch.Tensor], path: Path) -> str:
    if "cls_token" in backbone and (PATCH_KEY in backbone or CONV_STEM_KEY in backbone):
        missing = [key for key in VIT_KEYS if key not in backbone]
        if missing:
            raise ReferenceLayoutError(f"{path}: ViT without {missing}; {EXPECTED}")
        return "vit"
    if "conv1.weight" in backbone and RESNET50_LAST in backbone:
        return "resnet50"
    raise ReferenceLayoutError(f"{path}: backbone is neither ViT-S/B nor ResNet-50; {EXPECTED}")


def _vit_overrides(backbone: dict[str, torch.Tensor], arch: str | None, path: Path) -> list[str]:
    """Config keys of a reference ViT, its shapes checked against ``arch``'s sizes (a
    conv-stem ViT has one block fewer than its patch-projection sibling)."""
    dim = int(backbone["cls_token"].shape[-1])
    depth = len({key.split(".")[1] for key in backbone if key.startswith("blocks.")})
    conv_stem = CONV_STEM_KEY in backbone
    patch = 16 if conv_stem else int(backbone[PATCH_KEY].shape[-1])
    if arch in CONV_STEM_ARCHS and not conv_stem:
        raise ReferenceLayoutError(f"{path}: arch {arch!r} but no conv stem; {EXPECTED}")
    name = CONV_STEM_ARCHS.get(arch, arch) if arch else None
    name = name or next((n for n, size in VIT_ARCHS.items() if size[0] == dim), None)
    expected_depth = VIT_ARCHS[name][1] - int(conv_stem) if name in VIT_ARCHS else None
    if name not in VIT_ARCHS or (VIT_ARCHS[name][0], expected_depth) != (dim, depth):
        raise ReferenceLayoutError(
            f"{path}: arch {arch!r} with width {dim}, depth {depth} is not the reference's "
            f"vit_small (384, 12, 12 heads), vit_base (768, 12, 12 heads) or their conv-stem "
            f"versions (11 blocks); {EXPECTED}"
        )
    tokens = int(backbone["pos_embed"].shape[1]) - 1
    grid = round(tokens**0.5)
    if grid * grid != tokens or int(backbone["blocks.0.mlp.fc1.weight"].shape[0]) != 4 * dim:
        raise ReferenceLayoutError(f"{path}: unexpected position table or MLP width; {EXPECTED}")
    table = sincos_position_table(grid, dim)
    sincos = torch.allclose(backbone["pos_embed"].float(), table, atol=1e-5)
    stem = ["model.stem=conv", "model.freeze_patch_embed=false", "moco.concat_views=false"]
    return [
        f"model.arch={name}",
        f"model.patch_size={patch}",
        f"model.pos_embed={'sincos' if sincos else 'learned'}",
        f"data.image_size={grid * patch}",
        *(stem if conv_stem else ["model.freeze_patch_embed=true"]),
    ]


RESNET_RECIPE = [  # the paper's ResNet-50 settings (the epoch count picks lr and m)
    "model.arch=resnet50",
    "model.freeze_patch_embed=false",
    "moco.concat_views=false",
    "moco.temperature=1.0",
    "optim.name=lars",
    "optim.warmup_epochs=10",
    "augment.crop_scale=[0.2, 1.0]",
]


def _resnet_overrides(epochs: float) -> list[str]:
    long_run = epochs >= 1000
    return [
        *RESNET_RECIPE,
        f"optim.base_lr={0.6 if epochs <= 100 else 0.3}",
        f"optim.weight_decay={1.5e-6 if long_run else 1e-6}",
        f"moco.momentum={0.996 if long_run else 0.99}",
    ]


# --------------------------------------------------------------------------- heads


def _mlp_overrides(layers: dict[str, torch.Tensor], name: str) -> list[str]:
    """Depth and widths of a reference MLP (Linear at indices 0, 3, 6...; BN between)."""
    linear = sorted(
        int(k.split(".")[0])
        for k, v in layers.items()
        if k.split(".")[0].isdigit() and k.endswith(".weight") and v.ndim == 2
    )
    if not linear:
        raise ReferenceLayoutError(f"the {name} MLP has no Linear layers; {EXPECTED}")
    first, last = layers[f"{linear[0]}.weight"], layers[f"{linear[-1]}.weight"]
    prefix = "proj" if name == "projector" else "pred"
    found = [f"model.{prefix}_layers={len(linear)}", f"model.out_dim={int(last.shape[0])}"]
    if len(linear) > 1:
        found.append(f"model.{prefix}_hidden_dim={int(first.shape[0])}")
    if name == "predictor":
        last_bn = f"{linear[-1] + 1}.running_mean" in layers
        found.append(f"model.pred_last_bn={str(last_bn).lower()}")
    return found


# --------------------------------------------------------------------------- conversions


def _base_config(
    raw: dict[str, Any], kind: str, backbone: dict, arch: str | None, path: Path
) -> list[str]:
    # the file records epochs trained so far, not the run's length: at least the recipe's
    epochs = max(_trained_epochs(raw), 300.0 if kind == "vit" else 100.0)
    common = [
        "data.name=folder:/path/to/imagenet",
        "data.channels=3",
        f"train.epochs={epochs}",
        "train.batch_size=4096",
    ]
    if kind == "vit":
        return [*common, *_vit_overrides(backbone, arch, path)]
    if arch not in (None, "resnet50"):
        raise ReferenceLayoutError(f"{path}: arch {arch!r} but a ResNet-50 backbone; {EXPECTED}")
    return [*common, "data.image_size=224", *_resnet_overrides(epochs)]


def _trained_epochs(raw: dict[str, Any]) -> float:
    epoch = raw.get("epoch")
    return float(epoch) if isinstance(epoch, (int, float)) and epoch >= 0 else 0.0


def _make_config(overrides: list[str], path: Path) -> Config:
    try:
        return apply_overrides(Config(), overrides)
    except ConfigError as error:
        raise ReferenceLayoutError(
            f"{path}: cannot describe it as a mocov3 config ({error})"
        ) from None


def _convert_pretraining(
    weights: dict[str, torch.Tensor], arch: str | None, raw: dict[str, Any], path: Path
) -> dict[str, Any]:
    stray = sorted({k.split(".")[0] for k in weights} - set(PRETRAIN_GROUPS))
    groups = {g: _group(weights, f"{g}.") for g in PRETRAIN_GROUPS}
    if stray or not all(groups.values()):
        raise ReferenceLayoutError(
            f"{path}: pretraining groups {sorted(groups)} + {stray}; {EXPECTED}"
        )
    query = groups["base_encoder"]
    kind = _backbone_kind(query, path)
    head = "head." if kind == "vit" else "fc."
    ours = {}
    for group, (backbone_name, projector_name) in {
        "base_encoder": ("backbone", "projector"),
        "momentum_encoder": ("momentum_backbone", "momentum_projector"),
    }.items():
        for key, value in groups[group].items():
            target = projector_name if key.startswith(head) else backbone_name
            ours[f"{target}.{key.removeprefix(head)}"] = value
    ours.update({f"predictor.{k}": v for k, v in groups["predictor"].items()})
    overrides = _base_config(raw, kind, query, arch, path)
    overrides += _mlp_overrides(_group(query, head), "projector")
    overrides += _mlp_overrides(groups["predictor"], "predictor")
    config = _make_config(overrides, path)
    _strict_load(build_moco(config, 3), ours, path)
    return _our_state(ours, config, raw, path, "pretraining", kind)


def _convert_probe(
    weights: dict[str, torch.Tensor], arch: str | None, raw: dict[str, Any], path: Path
) -> dict[str, Any]:
    classifier = "head" if "cls_token" in weights else "fc"
    kept = {k: v for k, v in weights.items() if k.split(".")[0] != classifier}
    found = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".")[0] == classifier}
    if set(found) != {"weight", "bias"}:
        raise ReferenceLayoutError(f"{path}: no linear classifier '{classifier}'; {EXPECTED}")
    kind = _backbone_kind(kept, path)
    config = _make_config(_base_config(raw, kind, kept, arch, path), path)
    _strict_load(build_backbone(config, 3), kept, path)
    state = _our_state(
        {f"backbone.{k}": v for k, v in kept.items()}, config, raw, path, "linear-probe", kind
    )
    state["backbone_only"] = True
    state["reference_classifier"] = found
    return state


def _strict_load(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Every key and shape must match the model the derived config builds; a difference
    is named (first few of each kind) together with the expected layout."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        found = {"missing": missing, "unexpected": unexpected, "wrong shape": shapes}
        listed = "; ".join(f"{kind} {keys[:3]}" for kind, keys in found.items() if keys)
        raise ReferenceLayoutError(f"{path}: {listed} (our names); {EXPECTED}")
    module.load_state_dict(weights, strict=True)


def _our_state(
    model: dict[str, torch.Tensor],
    config: Config,
    raw: dict[str, Any],
    path: Path,
    layout: str,
    kind: str,
) -> dict[str, Any]:
    """A checkpoint ``open_checkpoint`` reads: weights, config, channels and statistics."""
    imported = {
        "file": str(path),
        "layout": layout,
        "arch": config.model.arch,
        "reference_arch": raw.get("arch") if isinstance(raw.get("arch"), str) else None,
        "reference_epoch": raw.get("epoch") if isinstance(raw.get("epoch"), int) else None,
        "backbone": kind,
    }
    return {
        "model": model,
        "config": config.to_dict(),
        "in_chans": 3,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "epoch": _trained_epochs(raw) or None,
        "version": __version__,
        "imported": imported,
    }
