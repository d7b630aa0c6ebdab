"""``mocov3 finetune``: fine-tune a checkpoint's backbone end to end, or train the same
network from random init (:mod:`mocov3.eval.finetune`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mocov3.cli.common import add_data_args, add_set_arg, data_overrides
from mocov3.errors import ConfigError
from mocov3.eval.finetune import (
    FineTuneSettings,
    check_overrides,
    default_drop_path,
    finetune,
)
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import resolve_device


def cmd_finetune(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.from_scratch and args.encoder is not None:
        raise ConfigError(
            "--encoder picks the pretrained weights; it means nothing with --from-scratch"
        )
    check_overrides(args.set)
    run = open_checkpoint(args.checkpoint, [*args.set, *data_overrides(args)])
    device = resolve_device(args.device or run.config.train.device)
    settings = FineTuneSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        base_lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        drop_path=default_drop_path(run) if args.drop_path is None else args.drop_path,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        crop_min=args.crop_min,
        seed=args.seed,
        from_scratch=args.from_scratch,
        encoder=args.encoder or "query",
    )
    result, _ = finetune(run, settings, device)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    name = "scratch.json" if settings.from_scratch else "finetune.json"
    out = Path(run.run_dir) / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 finetune``."""
    d = FineTuneSettings()
    p = commands.add_parser(
        "finetune",
        help="fine-tune the whole network (or, --from-scratch, train it from random init)",
        description="DeiT-style end-to-end fine-tuning: AdamW, layer-wise lr decay, drop "
        "path, label smoothing, RandomResizedCrop + flip. Prints one JSON line "
        "(finetune_top1 or scratch_top1) and writes finetune.json / scratch.json beside the "
        "checkpoint.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run's checkpoint.pt (or the run directory); --from-scratch uses "
        "its architecture and data only",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="same architecture and recipe from random init (the baseline)",
    )
    p.add_argument(
        "--encoder",
        choices=ENCODERS,
        default=None,
        help="pretrained backbone to start from (default query)",
    )
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--lr",
        type=float,
        default=d.base_lr,
        help=f"base lr; the lr is base * batch / 256 (default {d.base_lr})",
    )
    p.add_argument(
        "--layer-decay",
        type=float,
        default=d.layer_decay,
        help=f"layer-wise lr decay (default {d.layer_decay}; 1 turns it off)",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--drop-path",
        type=float,
        default=None,
        help=f"stochastic depth rate of the last block (default {d.drop_path}; 0 for ResNet)",
    )
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument(
        "--crop-min",
        type=float,
        default=d.crop_min,
        help=f"RandomResizedCrop scale lower bound (default {d.crop_min}: flip only)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="data order, augmentation, drop path, head init (and the scratch init)",
    )
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default train.device)")
    add_data_args(p)
    add_set_arg(
        p,
        "config overrides: data.*, train.precision|device|threads, eval.batch_size|test_subset",
    )
    p.set_defaults(handler=cmd_finetune)
