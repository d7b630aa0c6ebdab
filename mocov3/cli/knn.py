"""``mocov3 knn``: weighted kNN top-1 of a checkpoint's backbone, or of raw pixels; alone
or under torchrun (each process extracts its share; one JSON line from the first)."""

from __future__ import annotations

import argparse
import json

from torch import nn

from mocov3.cli.common import add_data_args, add_device_arg, add_set_arg, data_overrides
from mocov3.config import load_config
from mocov3.errors import ConfigError
from mocov3.eval.knn import evaluate_knn
from mocov3.eval.splits import labelled_splits
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import launched_processes
from mocov3.runtime.precision import eval_precision


def cmd_knn(args: argparse.Namespace) -> int:
    overrides = [*data_overrides(args), *args.set]
    if args.k:
        overrides.append(f"eval.knn_k={args.k}")
    if args.temperature:
        overrides.append(f"eval.knn_temperature={args.temperature}")
    if args.raw_pixels:
        if not args.config:
            raise ConfigError("--raw-pixels needs --config PRESET for its data (e.g. demo)")
        config = load_config(args.config, overrides)
        backbone: nn.Module = nn.Flatten()
        normalisation, channels = None, config.data.channels
    else:
        run = open_checkpoint(args.checkpoint, overrides)
        config, backbone = run.config, run.backbone(args.encoder)
        normalisation, channels = (run.state["mean"], run.state["std"]), run.in_chans
    with launched_processes(args.device or config.train.device, config.train.threads) as (
        device,
        process,
    ):
        memory, queries = labelled_splits(config, "kNN", channels, normalisation)
        result = evaluate_knn(
            backbone.to(device),
            memory,
            queries,
            config,
            device,
            raw_pixels=args.raw_pixels,
            precision=eval_precision(config.train.precision, device),
        )
        result.update(
            temperature=config.eval.knn_temperature,
            features="raw-pixels" if args.raw_pixels else args.encoder,
            streamed=memory.streamed,
            unreadable_images=len(memory.unreadable) + len(queries.unreadable),
            processes=process.world_size,
        )
        if process.is_main:
            print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    knn = commands.add_parser(
        "knn",
        help="weighted kNN top-1 of a checkpoint's backbone",
        description="Weighted kNN (Wu et al. 2018) on L2-normalised features: the train "
        "split is the memory bank, the test split the queries; top-1 for each k.",
    )
    source = knn.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="what to evaluate (required unless --raw-pixels): a checkpoint file, a run "
        "directory (its newest checkpoint) or an export directory",
    )
    source.add_argument(
        "--raw-pixels",
        action="store_true",
        help="baseline: kNN on raw pixels instead of learned features (needs --config)",
    )
    knn.add_argument(
        "--config",
        metavar="PRESET",
        help="the preset whose data settings --raw-pixels uses, e.g. demo (required with "
        "--raw-pixels; otherwise the checkpoint's config is used)",
    )
    knn.add_argument(
        "--encoder", choices=ENCODERS, default="query", help="which encoder's backbone"
    )
    knn.add_argument(
        "--k", type=int, nargs="+", help="neighbour counts (default: eval.knn_k, 20 and 200)"
    )
    knn.add_argument(
        "--temperature", type=float, help="vote temperature (default: eval.knn_temperature, 0.07)"
    )
    add_device_arg(knn)
    add_data_args(knn)
    add_set_arg(knn)
    knn.set_defaults(handler=cmd_knn)
