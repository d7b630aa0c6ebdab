"""``mocov3 pretrain``: MoCo v3 pretraining into a run directory (:mod:`mocov3.train`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mocov3 import presets
from mocov3.cli.common import (
    add_data_args,
    add_device_arg,
    add_set_arg,
    data_overrides,
    resume_command,
)
from mocov3.config import load_config, parse_override
from mocov3.errors import ConfigError, has_package
from mocov3.runtime.distributed import launched_info
from mocov3.train.trainer import PlotRun, pretrain


def length_overrides(args: argparse.Namespace) -> list[str]:
    """The run's length from the flags, by one rule: ``--epochs N`` trains N epochs and turns
    the preset's time budget off, unless ``--budget-minutes`` is also given (then the budget
    sizes the run and N only sets the warmup's share). ``--set train.epochs=N`` counts as
    ``--epochs N``."""
    overrides = []
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.budget_minutes is not None:
        overrides.append(f"train.budget_minutes={args.budget_minutes}")
    keys = [parse_override(text)[0] for text in [*overrides, *args.set]]
    if "train.epochs" in keys and "train.budget_minutes" not in keys:
        overrides.append("train.budget_minutes=null")
    return overrides


def require_config(args: argparse.Namespace) -> str:
    """``--config``, or a one-line error that names the presets: without one the defaults
    are the paper's ImageNet recipe (ViT-S, batch 4096, 300 epochs), no first try."""
    if args.config:
        return args.config
    raise ConfigError(
        "pretrain needs --config: a preset name (demo for a first run on a CPU; "
        f"{', '.join(presets.names())}; `mocov3 presets` says what each is) or a YAML file"
    )


def plotter() -> PlotRun | None:
    """The run's plots when matplotlib is installed (the run's last line says when not)."""
    if not has_package("matplotlib"):
        return None
    from mocov3.tools.plots import plot_run

    return plot_run


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = [*data_overrides(args), *length_overrides(args)]
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.strict_data:
        overrides.append("data.strict=true")
    config_name = require_config(args)
    config = load_config(config_name, [*overrides, *args.set])
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    out = Path(args.out) if args.out else Path("runs") / Path(config_name).stem
    argv = getattr(args, "argv", None)
    command = resume_command(argv) if argv is not None else None
    summary = pretrain(
        config,
        out,
        resume=args.resume,
        resume_command=command,
        overwrite=args.overwrite,
        plot=plotter(),
    )
    if launched_info().rank != 0:  # under torchrun only the main process reports
        return 0
    if not summary.get("preempted"):
        plots = ", ".join(Path(p).name for p in summary.get("plots", [])) or (
            "none (matplotlib is not installed: pip install 'mocov3[plots]')"
        )
        print(f"run directory: {out}  plots: {plots}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "plots"}))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    pre = commands.add_parser(
        "pretrain",
        help="pretrain a backbone with MoCo v3",
        description="Pretrain with MoCo v3 into a run directory: checkpoints, config.yaml, "
        "metrics.jsonl, summary.json, plots. The run's length: the preset's train.epochs, or "
        "its time budget (train.budget_minutes) when it has one; --epochs N trains exactly N "
        "epochs and turns the budget off, unless --budget-minutes is also given. The first "
        "line the run prints states which.",
    )
    pre.add_argument(
        "--config",
        metavar="PRESET",
        help="a packaged preset's name (demo, hour, tiny, vit_small_imagenet, ...: `mocov3 "
        "presets` lists them) or a YAML file (required: no default)",
    )
    pre.add_argument("--out", help="run directory (default: runs/<preset name>)")
    pre.add_argument(
        "--epochs",
        type=float,
        metavar="N",
        help="train exactly N epochs (train.epochs); turns the preset's time budget off "
        "unless --budget-minutes is also given (default: the preset's length)",
    )
    pre.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="size the run to M wall-clock minutes, final evaluation included "
        "(train.budget_minutes): the step time is measured and the schedules laid over it "
        "(default: the preset's)",
    )
    add_device_arg(pre)
    pre.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' from the newest usable checkpoint in --out (none: start "
        "afresh), or from the checkpoint file PATH (default: a new run)",
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
    pre.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset + flags + --set) as YAML and exit",
    )
    add_set_arg(
        pre, "override any config key, read as YAML, e.g. --set optim.base_lr=5e-4; repeatable"
    )
    pre.set_defaults(handler=cmd_pretrain)
