"""``mocov3 export`` and ``mocov3 import-reference``: the two ways across the library's edge
(:mod:`mocov3.interop`)."""

from __future__ import annotations

import argparse
import json
import sys

from mocov3.interop.export import FORMATS, export_checkpoint
from mocov3.interop.pretrained import read_pretrained_config
from mocov3.interop.reference import import_reference
from mocov3.models.moco import ENCODERS


def cmd_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, encoder=args.encoder, fmt=args.format)
    config = read_pretrained_config(out)
    shown = {
        k: config[k] for k in ("architecture", "timm_model_name", "timm_kwargs") if k in config
    }
    print(json.dumps({"out": str(out), **shown}))
    if config.get("timm_verified_version", 0) is None:
        print(
            "warning: timm is not installed, so the timm fields were not verified", file=sys.stderr
        )
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    imported = import_reference(args.file, args.out)
    print(json.dumps({"out": args.out, **imported}))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 export`` and ``mocov3 import-reference``."""
    export = commands.add_parser(
        "export",
        help="write a checkpoint's backbone as model.safetensors + config.json + README.md",
        description="Backbone only (no heads): weights as safetensors, the exact architecture "
        "(heads included) in config.json, a model card in README.md. --format timm adds "
        "timm_model_name and timm_kwargs for timm.create_model, checked when timm is installed.",
    )
    export.add_argument("checkpoint", help="a run's checkpoint.pt (or the run directory)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--encoder", choices=ENCODERS, default="query")
    export.add_argument("--format", choices=FORMATS, default="timm")
    export.set_defaults(handler=cmd_export)

    imp = commands.add_parser(
        "import-reference",
        help="convert a checkpoint of the reference implementation (ViT-S/B, ResNet-50)",
        description="Convert a MoCo v3 reference checkpoint (pretraining: module.base_encoder, "
        "module.momentum_encoder, module.predictor; linear probe: backbone + head/fc) into a "
        "mocov3 checkpoint for knn, linear, finetune, embed and export.",
    )
    imp.add_argument("file", help="reference checkpoint, e.g. vit-s-300ep.pth.tar")
    imp.add_argument("--out", required=True, help="mocov3 checkpoint to write, e.g. vit-s.pt")
    imp.set_defaults(handler=cmd_import_reference)
