"""``mocov3 presets``: the packaged presets and evaluation recipes, one line each
(:mod:`mocov3.presets`)."""

from __future__ import annotations

import argparse

from mocov3 import presets


def cmd_presets(args: argparse.Namespace) -> int:
    kinds = ("config", "recipe") if args.recipes else ("config",)
    for kind in kinds:
        listed = presets.catalogue(kind)
        width = max(len(preset.name) for preset in listed)
        title = (
            "pretraining presets (--config NAME)"
            if kind == "config"
            else ("evaluation recipes (linear/finetune --recipe NAME)")
        )
        print(title)
        for preset in listed:
            print(f"  {preset.name:<{width}}  {preset.summary}")
        if args.paths:
            print(f"  (files in {presets.KINDS[kind]})")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 presets``."""
    parser = commands.add_parser(
        "presets",
        help="list the packaged presets, one line each",
        description="The presets that ship with mocov3: pass a name to --config (pretrain, "
        "bench, knn --raw-pixels); `pretrain --config NAME --print-config` shows one in full.",
    )
    parser.add_argument(
        "--recipes",
        action="store_true",
        help="also list the evaluation recipes (linear/finetune --recipe NAME)",
    )
    parser.add_argument("--paths", action="store_true", help="also say where the files are")
    parser.set_defaults(handler=cmd_presets)
