"""``mocov3 knn``: weighted kNN top-1 of a checkpoint's backbone, or of raw pixels."""

from __future__ import annotations

import argparse
import json

from torch import nn

from mocov3.cli.common import add_data_args, add_set_arg, data_overrides
from mocov3.config import load_config
from mocov3.data.sources import load_data
from mocov3.errors import DatasetError
from mocov3.eval.knn import evaluate_knn
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import resolve_device


def cmd_knn(args: argparse.Namespace) -> int:
    overrides = [*data_overrides(args), *args.set]
    if args.k:
        overrides.append(f"eval.knn_k={args.k}")
    if args.temperature:
        overrides.append(f"eval.knn_temperature={args.temperature}")
    if args.raw_pixels:
        config = load_config(args.config, overrides)
        backbone: nn.Module = nn.Flatten()
    else:
        run = open_checkpoint(args.checkpoint, overrides)
        config, backbone = run.config, run.backbone(args.encoder)
    device = resolve_device(args.device or config.train.device)
    train_set, test_set = load_data(config)
    if test_set is None:
        raise DatasetError(f"data '{config.data.name}' has no labelled test split for kNN")
    result = evaluate_knn(
        backbone.to(device), train_set, test_set, config, device, raw_pixels=args.raw_pixels
    )
    result.update(
        temperature=config.eval.knn_temperature,
        features="raw-pixels" if args.raw_pixels else args.encoder,
    )
    print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    knn = commands.add_parser("knn", help="weighted kNN top-1 of a checkpoint's backbone")
    source = knn.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoint.pt (or the run directory)")
    source.add_argument(
        "--raw-pixels",
        action="store_true",
        help="baseline: kNN on raw pixels instead of learned features",
    )
    knn.add_argument("--config", help="preset for --raw-pixels (data settings)")
    knn.add_argument("--encoder", choices=ENCODERS, default="query")
    knn.add_argument("--k", type=int, nargs="+", help="neighbour counts (default eval.knn_k)")
    knn.add_argument("--temperature", type=float, help="vote temperature (default 0.07)")
    knn.add_argument("--device")
    add_data_args(knn)
    add_set_arg(knn)
    knn.set_defaults(handler=cmd_knn)
