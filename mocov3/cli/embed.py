"""``mocov3 embed``: backbone features of images or a dataset split, saved as safetensors
shards (:mod:`mocov3.eval.embed`); alone or under torchrun."""

from __future__ import annotations

import argparse
import json

from mocov3.cli.common import (
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_set_arg,
    data_overrides,
)
from mocov3.data.folders import folder_root
from mocov3.errors import ConfigError
from mocov3.eval.embed import SHARD_ROWS, embed
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import launched_processes


def image_folder(args: argparse.Namespace) -> str | None:
    """``--split all``'s folder: every image file under ``--data folder:PATH``."""
    if args.split != "all":
        return None
    root = folder_root(args.data or "")
    if root is None:
        raise ConfigError(
            "--split all embeds every image file under a folder: give --data folder:PATH "
            "(or --split train/test for a split of a dataset)"
        )
    return str(root)


def cmd_embed(args: argparse.Namespace) -> int:
    images = image_folder(args)
    overrides = data_overrides(args) if images is None else []
    run = open_checkpoint(args.checkpoint, [*overrides, *args.set])
    config = run.config
    device_name = args.device or config.train.device
    with launched_processes(device_name, config.train.threads) as (device, process):
        split = "train" if images else args.split
        result = embed(run, args.out, device, images, split, args.encoder, args.shard_size)
        if process.is_main:
            print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 embed``."""
    parser = commands.add_parser(
        "embed",
        help="save backbone features of images or a dataset split (safetensors)",
        description="Backbone features of a split of a dataset (the checkpoint's, or "
        "--data's), or of every image file under a folder (--data folder:PATH --split all), "
        "saved as safetensors: 'features' [N, D], 'indices', 'labels' when labelled, file "
        "names in the metadata; more than --shard-size images are written as "
        "OUT-00000-of-0000N shards, one at a time.",
    )
    add_checkpoint_arg(parser, "embed with")
    parser.add_argument("--out", required=True, help="output file, e.g. features.safetensors")
    add_data_args(parser)
    parser.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default="train",
        help="the dataset split to embed (data.subset applies to train); all: every image "
        "file under --data folder:PATH, recursively, named in the metadata",
    )
    parser.add_argument(
        "--encoder", choices=ENCODERS, default="query", help="which encoder's backbone"
    )
    parser.add_argument("--shard-size", type=int, default=SHARD_ROWS, help="images per output file")
    add_device_arg(parser)
    add_set_arg(parser)
    parser.set_defaults(handler=cmd_embed)
