"""``mocov3 export`` and ``mocov3 import-reference``: the two ways across the library's edge
(:mod:`mocov3.interop`)."""

from __future__ import annotations

import argparse
import json
import sys

from mocov3.cli.common import add_checkpoint_arg
from mocov3.errors import ConfigError, require_package
from mocov3.interop.export import DEFAULT_LICENSE, FORMATS, export_checkpoint
from mocov3.interop.hub import push_to_hub
from mocov3.interop.pretrained import ARCH_KEY, read_pretrained_config
from mocov3.interop.reference import import_reference
from mocov3.models.moco import ENCODERS


def cmd_export(args: argparse.Namespace) -> int:
    if (args.private or args.revision) and not args.push_to_hub:
        raise ConfigError("--private and --revision go with --push-to-hub REPO_ID")
    if args.push_to_hub:  # before the export: a missing package is found in a second
        require_package("huggingface_hub", "hub", "--push-to-hub")
    out = export_checkpoint(
        args.checkpoint, args.out, encoder=args.encoder, fmt=args.format, license_id=args.license
    )
    config = read_pretrained_config(out)
    shown = {k: config[k] for k in ("architecture", "model_args", ARCH_KEY) if k in config}
    if config.get("timm_verified_version", 0) is None:
        print(
            "warning: timm is not installed, so the timm fields were not verified", file=sys.stderr
        )
    if args.push_to_hub:
        shown["hub_url"] = push_to_hub(
            out, args.push_to_hub, private=args.private, revision=args.revision
        )
        print(f"pushed {out} to {shown['hub_url']}", file=sys.stderr)
    print(json.dumps({"out": str(out), **shown}))
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
        "(heads included) and preprocessing in config.json, a model card in README.md. "
        "--format timm makes config.json timm's own Hub config, so "
        "timm.create_model('local-dir:OUT', pretrained=True) loads it (checked when timm is "
        "installed); --push-to-hub publishes it for timm.create_model('hf-hub:REPO_ID').",
    )
    add_checkpoint_arg(export, "export")
    export.add_argument("--out", required=True, metavar="DIR", help="export directory to write")
    export.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="query",
        help="which backbone: the query encoder or its momentum copy (default: query)",
    )
    export.add_argument(
        "--format",
        choices=FORMATS,
        default="timm",
        help="timm: config.json also loads with timm.create_model; native: mocov3 only, for "
        "backbones timm cannot build (ViT-BN, ResNet small stem or narrow width) "
        "(default: timm)",
    )
    export.add_argument(
        "--license",
        default=DEFAULT_LICENSE,
        metavar="ID",
        help="license in the model card's Hub metadata, a Hub license id; set the one the "
        f"training data allows (default: {DEFAULT_LICENSE})",
    )
    export.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload the directory to this Hugging Face model repo (USER/NAME), created "
        "when missing; needs huggingface_hub and a login (huggingface-cli login or HF_TOKEN) "
        "(default: no upload)",
    )
    export.add_argument(
        "--private", action="store_true", help="create the Hub repo private (with --push-to-hub)"
    )
    export.add_argument(
        "--revision",
        metavar="BRANCH",
        help="Hub branch to upload to, created when missing (with --push-to-hub; default: "
        "the repo's main branch)",
    )
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
