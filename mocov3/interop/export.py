"""``mocov3 export``: a checkpoint's backbone as an export directory with a model card.

The card says how the backbone was trained (architecture, data, epochs, optimiser) and what
it scored where the run directory recorded it (kNN in summary.json, linear.json,
finetune.json), because a backbone without its recipe and numbers cannot be judged. It
opens with the Hugging Face Hub's metadata (``library_name: timm``, tags, license), so a
pushed directory (:mod:`mocov3.interop.hub`) shows on the Hub as a timm model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mocov3.errors import ExportError
from mocov3.interop.pretrained import (
    ARCH_KEY,
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    describe_backbone,
    from_pretrained,
    is_export_directory,
    read_pretrained_config,
    save_pretrained,
    timm_spec,
)
from mocov3.models.checkpoint import LoadedRun, open_checkpoint

FORMATS = ("timm", "native")
DEFAULT_LICENSE = "mit"  # this library's; weights trained on licensed data may need another
HUB_TAGS = ("mocov3", "self-supervised", "image-feature-extraction")
REPO_PLACEHOLDER = "USER/REPO"  # in the card's hf-hub: line until a push fills it in
# config.json entries an export carries over when it is exported again
CARRIED = ("encoder", "preprocessing", "training", "results", "mocov3_config", "imported")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    encoder: str = "query",
    fmt: str = "timm",
    license_id: str = DEFAULT_LICENSE,
) -> Path:
    """Write the ``encoder`` backbone of ``checkpoint`` (file, run directory or export
    directory) to ``out``.

    ``fmt`` timm makes config.json timm's own Hub config too (checked through
    ``timm.create_model('local-dir:OUT')`` when timm is installed); native leaves timm's
    fields out, for backbones timm cannot build (a ViT-BN, a ResNet small stem or narrow
    width). The weights are the same either way: our parameter names are timm's and
    torchvision's. Exporting an export directory again rewrites it in today's layout."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if is_export_directory(checkpoint):
        backbone, extra = _from_export(Path(checkpoint), encoder)
    else:
        backbone, extra = _from_checkpoint(checkpoint, encoder)
    prep = extra.pop("preprocessing", None)
    card = model_card(describe_backbone(backbone), extra, prep, fmt == "timm", license_id)
    return save_pretrained(
        backbone,
        out,
        extra=extra,
        timm_fields=fmt == "timm",
        card=card,
        preprocessing=prep,
        license_id=license_id,
    )


def _from_checkpoint(checkpoint: str | Path, encoder: str) -> tuple[nn.Module, dict[str, Any]]:
    run = open_checkpoint(checkpoint)
    extra = {
        "encoder": encoder,
        "preprocessing": preprocessing(run),
        "training": training_facts(run),
        "results": run_results(run.run_dir),
        "mocov3_config": _public_config(run.config.to_dict()),
    }
    if "imported" in run.state:
        extra["imported"] = run.state["imported"]
    return run.backbone(encoder), extra


def _from_export(directory: Path, encoder: str) -> tuple[nn.Module, dict[str, Any]]:
    """An export directory again, e.g. one written before timm's layout, keeping what it
    recorded about its training (an export holds one encoder: ask for another, an error)."""
    config = read_pretrained_config(directory)
    held = config.get("encoder", "query")
    if held != encoder:
        raise ExportError(f"{directory} holds the {held} encoder; pass --encoder {held}")
    extra = {key: config[key] for key in CARRIED if key in config}
    return from_pretrained(directory), {**extra, "encoder": held}


def preprocessing(run: LoadedRun) -> dict[str, Any]:
    """What an input image must look like: the statistics the backbone was trained with."""
    return {
        "image_size": run.config.data.image_size,
        "channels": run.in_chans,
        "mean": [float(v) for v in run.state.get("mean", [])],
        "std": [float(v) for v in run.state.get("std", [])],
        "value_range": "pixels scaled to [0, 1], then (x - mean) / std",
    }


def training_facts(run: LoadedRun) -> dict[str, Any]:
    """The recipe in a few numbers (the full config is ``mocov3_config``)."""
    c = run.config
    facts = {
        "method": "MoCo v3 (Chen, Xie, He, ICCV 2021)",
        "arch": c.model.arch,
        "data": _public_name(c.data.name),
        "image_size": c.data.image_size,
        "epochs_configured": c.train.epochs,
        "epochs_trained": _rounded(run.state.get("epoch")),
        "batch_size": c.train.batch_size,
        "optimizer": c.optim.name,
        "base_lr": c.optim.base_lr,
        "weight_decay": c.optim.weight_decay,
        "warmup_epochs": c.optim.warmup_epochs,
        "momentum_start": c.moco.momentum,
        "temperature": c.moco.temperature,
        "checkpoint": f"{run.path.parent.name}/{run.path.name}",
    }
    return {key: value for key, value in facts.items() if value is not None}


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's config without its local folders (data.name's path, data.data_dir)."""
    data = {**config["data"], "name": _public_name(config["data"]["name"]), "data_dir": None}
    return {**config, "data": data}


def _public_name(spec: str) -> str:
    """A dataset spec without its local folders (``folder:/home/me/photos`` ->
    ``folder:photos``): the card and config.json may be published on the Hub."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in ("folder", "wds", "hf"):
        return spec
    return f"{kind}:{Path(where.rstrip('/')).name or where}"


def _rounded(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def run_results(run_dir: Path) -> dict[str, Any]:
    """kNN, linear and fine-tuning top-1 recorded in the run directory, where present."""
    results: dict[str, Any] = {}
    summary = _read_json(run_dir / "summary.json")
    for key in ("knn_top1", "knn_top1_init"):
        if key in summary:
            results[key] = summary[key]
    for name in ("linear", "finetune"):
        values = _read_json(run_dir / f"{name}.json")
        top1 = values.get(f"{name}_top1", values.get("top1"))
        if top1 is not None:
            results[f"{name}_top1"] = top1
    return results


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def model_card(
    arch: dict[str, Any],
    extra: dict[str, Any],
    prep: dict[str, Any] | None,
    with_timm: bool,
    license_id: str = DEFAULT_LICENSE,
) -> str:
    """README.md of the export directory: Hub metadata, architecture, training, results,
    preprocessing, usage."""
    title = arch.get("arch") or f"ViT {arch['embed_dim']}d/{arch['depth']}L/{arch['num_heads']}H"
    lines = [*hub_metadata(with_timm, license_id), ""]
    lines += [f"# MoCo v3 backbone: {title} ({extra.get('encoder', 'query')} encoder)", ""]
    lines += ["## Architecture", "", *_bullets(arch), ""]
    if arch["model_type"] == "vit":
        lines += [
            f"This ViT has **{arch['num_heads']} attention heads**. The paper's ViT-S has 12; "
            "timm's and DeiT's `vit_small` have 6 and would load these weights without an "
            "error but compute another function: build it from `config.json`, not a name.",
            "",
        ]
    if arch.get("pos_embed") == "sincos":
        lines += [
            "The position embedding is the paper's fixed 2-D sin-cos table; timm holds it "
            "as a learnable `pos_embed`, so freeze that to fine-tune as the paper did.",
            "",
        ]
    lines += ["## How it was trained", "", *(_bullets(extra.get("training", {})) or ["- unknown"])]
    if "imported" in extra:
        lines += [*_bullets({"imported from": extra["imported"]})]
    lines += [
        "",
        "## Results (top-1 %, recorded in the run directory for its final checkpoint)",
        "",
    ]
    lines += _bullets(extra.get("results", {})) or ["- none recorded"]
    lines += ["", "## Preprocessing", "", *(_bullets(prep or {}) or ["- unknown"]), ""]
    lines += _usage(arch, with_timm)
    return "\n".join(lines) + "\n"


def hub_metadata(with_timm: bool, license_id: str = DEFAULT_LICENSE) -> list[str]:
    """The YAML front matter the Hugging Face Hub reads: ``library_name: timm`` makes it
    show the timm loading snippet (a native export has no timm model, so no library)."""
    lines = ["---", *(["library_name: timm"] if with_timm else []), f"license: {license_id}"]
    lines += ["tags:", *(f"- {tag}" for tag in HUB_TAGS)]
    return [*lines, "pipeline_tag: image-feature-extraction", "---"]


def _bullets(values: dict[str, Any]) -> list[str]:
    return [
        f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}"
        for key, value in values.items()
    ]


def _usage(arch: dict[str, Any], with_timm: bool) -> list[str]:
    lines = [
        "## Usage",
        "",
        "```python",
        "import mocov3",
        "backbone = mocov3.from_pretrained('THIS_DIR')  # eval mode; returns features",
        "```",
    ]
    if with_timm:
        name, kwargs = timm_spec(arch)
        lines += [
            "",
            "With timm alone (no mocov3 needed):",
            "",
            "```python",
            "import timm",
            f"model = timm.create_model('hf-hub:{REPO_PLACEHOLDER}', pretrained=True).eval()",
            "# or, from this directory: timm.create_model('local-dir:THIS_DIR', pretrained=True)",
            "config = timm.data.resolve_data_config({}, model=model)  # size, mean/std it knows",
            "transform = timm.data.create_transform(**config)",
            "features = model(transform(image).unsqueeze(0))  # image: a PIL image",
            "```",
            "",
            f"`{CONFIG_NAME}` names `{name}` with `model_args` {json.dumps(kwargs)}; timm's "
            "loader applies them. Never build the name without them: its defaults are "
            "another model.",
        ]
    else:
        lines += ["", "timm has no model of this architecture: load it with mocov3."]
    return [
        *lines,
        "",
        f"Files: {WEIGHTS_NAME}, {CONFIG_NAME} (ours under `{ARCH_KEY}`), {CARD_NAME}.",
    ]
