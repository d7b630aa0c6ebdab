"""``mocov3 pretrain``: MoCo v3 pretraining into a run directory (:mod:`mocov3.train`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mocov3.cli.common import add_data_args, add_set_arg, data_overrides, resume_command
from mocov3.config import load_config
from mocov3.runtime.distributed import launched_info
from mocov3.tools.plots import plot_run
from mocov3.train.trainer import pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = data_overrides(args)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.budget_minutes is not None:
        overrides.append(f"train.budget_minutes={args.budget_minutes}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.strict_data:
        overrides.append("data.strict=true")
    config = load_config(args.config, [*overrides, *args.set])
    out = Path(args.out) if args.out else Path("runs") / Path(args.config or "default").stem
    argv = getattr(args, "argv", None)
    command = resume_command(argv) if argv is not None else None
    summary = pretrain(
        config,
        out,
        resume=args.resume,
        resume_command=command,
        overwrite=args.overwrite,
        plot=plot_run,
    )
    if launched_info().rank != 0:  # under torchrun only the main process reports
        return 0
    if not summary.get("preempted"):
        print(
            f"run directory: {out}  plots: {', '.join(Path(p).name for p in summary['plots'])}",
            file=sys.stderr,
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "plots"}))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    pre = commands.add_parser("pretrain", help="pretrain a backbone with MoCo v3")
    pre.add_argument("--config", help="YAML preset, e.g. configs/demo.yaml")
    pre.add_argument("--out", help="run directory (default runs/<preset name>)")
    pre.add_argument("--epochs", type=float)
    pre.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="size the run to M wall-clock minutes, final evaluation included "
        "(train.budget_minutes): the step time is measured and the schedules laid over it",
    )
    pre.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    pre.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' from the newest usable checkpoint in --out (none: start "
        "afresh), or from the checkpoint file PATH",
    )
    pre.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in --out even if an earlier run left checkpoints there "
        "(they are removed); without it such a directory is refused",
    )
    add_data_args(pre)
    pre.add_argument(
        "--strict-data",
        action="store_true",
        help="stop on an unreadable image file instead of skipping it (data.strict)",
    )
    add_set_arg(pre, "override any config key, e.g. --set optim.base_lr=5e-4")
    pre.set_defaults(handler=cmd_pretrain)
