"""``mocov3 linear``: linear probe of a checkpoint's frozen backbone (:mod:`mocov3.eval.linear`)."""

from __future__ import annotations

import argparse
import json
import sys

from mocov3.cli.common import add_data_args, add_set_arg, data_overrides
from mocov3.eval import linear
from mocov3.eval.features import FEATURE_KINDS
from mocov3.eval.linear import (
    AUG_SCALE,
    DEFAULT_LRS_BN,
    DEFAULT_LRS_NO_BN,
    ProbeSettings,
    probe_run,
    write_result,
)
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS


def cmd_linear(args: argparse.Namespace) -> int:
    batchnorm = not args.no_batchnorm
    default_lrs = DEFAULT_LRS_BN if batchnorm else DEFAULT_LRS_NO_BN
    settings = ProbeSettings(
        base_lrs=tuple(args.lrs) if args.lrs else default_lrs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        batchnorm=batchnorm,
        augmented=args.augmented,
        crop_scale=tuple(args.crop_scale) if args.crop_scale else None,
        features=args.features,
        encoder=args.encoder,
        device=args.device,
    )
    settings.check()  # before the checkpoint is read
    run = open_checkpoint(args.checkpoint, [*data_overrides(args), *args.set])
    summary = probe_run(run, settings)
    write_result(run, settings, summary)
    lrs = settings.base_lrs
    if len(lrs) > 1 and summary["best_lr"] in (min(lrs), max(lrs)):
        # the val optimum may lie beyond the sweep: say so rather than report it silently
        print(
            f"note: the best lr {summary['best_lr']} is at the edge of the sweep "
            f"{sorted(lrs)}; widen --lrs past it to be sure it is the optimum",
            file=sys.stderr,
        )
    print(json.dumps(summary))
    if not summary["backbone_unchanged"]:
        print("error: a backbone tensor changed during linear probing", file=sys.stderr)
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``linear`` sub-command."""

    parser = commands.add_parser(
        "linear",
        help="linear probe top-1 of a frozen checkpoint backbone (lr swept in one pass)",
        description=linear.__doc__.split("\n\n")[0] if linear.__doc__ else None,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run directory")
    add_data_args(parser)
    parser.add_argument("--encoder", choices=ENCODERS, default="query")
    parser.add_argument(
        "--features",
        choices=FEATURE_KINDS,
        default="cls",
        help="what the probe reads: the class token (the paper's probe, default), or, for "
        "comparison with DINO-style results, the class token + mean patch token "
        "(cls+avgpool), the class tokens of the last 4 blocks (last4), or those and the "
        "last block's mean patch token (last4+avgpool)",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="base lrs to sweep, each scaled by batch/256 (default "
        f"{' '.join(map(str, DEFAULT_LRS_BN))}; without BatchNorm "
        f"{' '.join(map(str, DEFAULT_LRS_NO_BN))})",
    )
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--no-batchnorm",
        action="store_true",
        help="drop the parameter-free BatchNorm before the classifier (the paper's ViT probe)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="part of the train split held out to choose the lr (default 0.1)",
    )
    parser.add_argument(
        "--augmented",
        action="store_true",
        help="recompute features every epoch from RandomResizedCrop + flip views "
        "(the reference probe; for GPUs, slow on a CPU)",
    )
    parser.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help=f"the augmented probe's crop area range (default {AUG_SCALE[0]} {AUG_SCALE[1]}, "
        "the reference's; e.g. the pretraining preset's augment.crop_scale)",
    )
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default train.device)")
    add_set_arg(parser)
    parser.set_defaults(handler=cmd_linear)
