"""``mocov3 export``: a checkpoint's backbone as an export directory with a model card.

The card says how the backbone was trained (architecture, data, epochs, optimiser) and what
it scored where the run directory recorded it (kNN in summary.json, linear.json,
finetune.json), because a backbone without its recipe and numbers cannot be judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mocov3.interop.pretrained import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    describe_backbone,
    save_pretrained,
    timm_spec,
)
from mocov3.models.checkpoint import LoadedRun, open_checkpoint

FORMATS = ("timm", "native")


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, encoder: str = "query", fmt: str = "timm"
) -> Path:
    """Write the ``encoder`` backbone of ``checkpoint`` (file or run directory) to ``out``.

    ``fmt`` timm adds ``timm_model_name``/``timm_kwargs`` (verified when timm is
    installed); native leaves them out (e.g. a ResNet small stem timm cannot build). The
    weights are the same either way: our parameter names are timm's and torchvision's."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    run = open_checkpoint(checkpoint)
    backbone = run.backbone(encoder)
    extra = {
        "encoder": encoder,
        "preprocessing": preprocessing(run),
        "training": training_facts(run),
        "results": run_results(run.run_dir),
        "mocov3_config": run.config.to_dict(),
    }
    if "imported" in run.state:
        extra["imported"] = run.state["imported"]
    card = model_card(describe_backbone(backbone), extra, fmt == "timm")
    return save_pretrained(backbone, out, extra=extra, timm_fields=fmt == "timm", card=card)


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
        "data": c.data.name,
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
        "checkpoint": str(run.path),
    }
    return {key: value for key, value in facts.items() if value is not None}


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


def model_card(arch: dict[str, Any], extra: dict[str, Any], with_timm: bool) -> str:
    """README.md of the export directory: architecture, training, results, usage."""
    title = arch.get("arch") or f"ViT {arch['embed_dim']}d/{arch['depth']}L/{arch['num_heads']}H"
    lines = [f"# MoCo v3 backbone: {title} ({extra['encoder']} encoder)", ""]
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
    lines += ["## How it was trained", "", *_bullets(extra["training"])]
    if "imported" in extra:
        lines += [*_bullets({"imported from": extra["imported"]})]
    lines += [
        "",
        "## Results (top-1 %, recorded in the run directory for its final checkpoint)",
        "",
    ]
    lines += _bullets(extra["results"]) or ["- none recorded"]
    lines += ["", "## Preprocessing", "", *_bullets(extra["preprocessing"]), ""]
    lines += _usage(arch, with_timm)
    return "\n".join(lines) + "\n"


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
            "```python",
            "import json, timm",
            "from safetensors.torch import load_file",
            f"config = json.load(open('THIS_DIR/{CONFIG_NAME}'))",
            "model = timm.create_model(config['timm_model_name'], **config['timm_kwargs'])",
            f"model.load_state_dict(load_file('THIS_DIR/{WEIGHTS_NAME}'), strict=True)",
            "```",
            "",
            f"(`{name}` with {json.dumps(kwargs)}; the kwargs are required.)",
        ]
    return [*lines, "", f"Files: {WEIGHTS_NAME}, {CONFIG_NAME}, {CARD_NAME}."]
