"""``mocov3 shards SOURCE --out DIR``: write a dataset as WebDataset tar shards
(:mod:`mocov3.data.shards`)."""

from __future__ import annotations

import argparse
import json

from mocov3.cli.common import add_data_dir_arg
from mocov3.data.shards import write_shards
from mocov3.errors import require_package


def cmd_shards(args: argparse.Namespace) -> int:
    require_package("webdataset", "shards", "mocov3 shards (webdataset's ShardWriter)")
    summary = write_shards(
        args.source,
        args.out,
        max_count=args.max_count,
        max_bytes=int(args.max_megabytes * 1e6),
        subset=args.subset,
        data_dir=args.data_dir,
        image_size=args.image_size,
    )
    for split, written in summary["splits"].items():
        use = "train with" if split == "train" else "evaluation split:"
        print(
            f"{split}: {written['samples']} samples in {written['shards']} shard(s), "
            f"{written['bytes'] / 1e6:.1f} MB; {use} --data {written['pattern']}"
        )
    print(json.dumps(summary))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 shards``."""
    parser = commands.add_parser(
        "shards",
        help="write a dataset as WebDataset tar shards (train-000000.tar, val-000000.tar, ...)",
        description="Copy every image of SOURCE (folder:PATH, wds:PATTERN, hf:PATH as they are "
        "encoded; fashion-mnist and synthetic as PNG) with its class into tar shards, in the "
        "source's order, so that training on the shards equals training on the source.",
    )
    parser.add_argument("source", metavar="SOURCE", help="the dataset to convert")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument(
        "--max-megabytes", type=float, default=1000.0, help="megabytes per shard at most"
    )
    parser.add_argument(
        "--subset", type=int, help="convert only the first N images per split (default: all)"
    )
    add_data_dir_arg(parser)
    parser.add_argument(
        "--image-size",
        type=int,
        help="fashion-mnist / synthetic only: resize to this side (default: the images' own)",
    )
    parser.set_defaults(handler=cmd_shards)
