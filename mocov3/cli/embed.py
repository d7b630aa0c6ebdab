"""``mocov3 embed``: backbone features of images or a dataset split, saved as safetensors
shards (:mod:`mocov3.eval.embed`); alone or under torchrun."""

from __future__ import annotations

import argparse
import json

from mocov3.cli.common import add_data_args, add_set_arg, data_overrides
from mocov3.eval.embed import SHARD_ROWS, embed
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import launched_processes


def cmd_embed(args: argparse.Namespace) -> int:
    run = open_checkpoint(args.checkpoint, [*data_overrides(args), *args.set])
    config = run.config
    device_name = args.device or config.train.device
    with launched_processes(device_name, config.train.threads) as (device, process):
        result = embed(
            run, args.out, device, args.images, args.split, args.encoder, args.shard_size
        )
        if process.is_main:
            print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 embed``."""
    parser = commands.add_parser(
        "embed",
        help="save backbone features of images or a dataset split (safetensors)",
        description="Backbone features of a folder of images (--images) or of a split of the "
        "checkpoint's data, saved as safetensors: 'features' [N, D], 'indices', 'labels' "
        "when labelled, file names in the metadata; a split larger than --shard-size is "
        "written as OUT-00000-of-0000N shards, one at a time.",
    )
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (or its dir)")
    parser.add_argument("--out", required=True, help="output file, e.g. features.safetensors")
    parser.add_argument(
        "--images", help="embed every image under this folder (recursively) instead of a split"
    )
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="dataset split to embed (default train; data.subset applies to it)",
    )
    parser.add_argument("--encoder", choices=ENCODERS, default="query")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=SHARD_ROWS,
        help=f"images per output file (default {SHARD_ROWS})",
    )
    add_data_args(parser)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    add_set_arg(parser)
    parser.set_defaults(handler=cmd_embed)
