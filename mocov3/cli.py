"""The ``mocov3`` command line. Each sub-command is one small function; errors the user
can fix are printed as one line (``error: ...``) with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mocov3.config import ConfigError, load_config
from mocov3.data.datasets import DatasetError
from mocov3.engine.checkpoint import CheckpointError
from mocov3.eval.common import add_data_args, data_overrides


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mocov3.engine.distributed import launched_info
    from mocov3.engine.train import pretrain

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
        config, out, resume=args.resume, resume_command=command, overwrite=args.overwrite
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


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume auto``."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    program = (
        f"{shlex.quote(sys.executable)} -m mocov3"
        if Path(sys.argv[0]).name == "__main__.py"
        else "mocov3"
    )
    from mocov3.engine.distributed import launched_info

    process = launched_info()
    if process.world_size > 1:  # relaunch the same way, on the same number of processes
        nodes = process.world_size // max(process.local_world_size, 1)
        where = f"--nnodes {nodes} <the same rendezvous flags> " if nodes > 1 else ""
        program = f"torchrun {where}--nproc-per-node {process.local_world_size} -m mocov3"
    return f"{program} {shlex.join([*kept, '--resume', 'auto'])}"


def cmd_knn(args: argparse.Namespace) -> int:
    from torch import nn

    from mocov3.engine.train import evaluate_knn, load_data, resolve_device
    from mocov3.eval.common import open_checkpoint

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocov3", description="MoCo v3 self-supervised pretraining and evaluation"
    )
    commands = parser.add_subparsers(dest="command", required=True)

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
    pre.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set optim.base_lr=5e-4",
    )
    pre.set_defaults(handler=cmd_pretrain)

    knn = commands.add_parser("knn", help="weighted kNN top-1 of a checkpoint's backbone")
    source = knn.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoint.pt (or the run directory)")
    source.add_argument(
        "--raw-pixels",
        action="store_true",
        help="baseline: kNN on raw pixels instead of learned features",
    )
    knn.add_argument("--config", help="preset for --raw-pixels (data settings)")
    knn.add_argument("--encoder", choices=("query", "momentum"), default="query")
    knn.add_argument("--k", type=int, nargs="+", help="neighbour counts (default eval.knn_k)")
    knn.add_argument("--temperature", type=float, help="vote temperature (default 0.07)")
    knn.add_argument("--device")
    add_data_args(knn)
    knn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    knn.set_defaults(handler=cmd_knn)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


# Evaluation commands live beside their code; each module's register(subparsers) adds its
# sub-command with a handler.
COMMAND_MODULES = (
    "mocov3.eval.linear",
    "mocov3.eval.finetune",
    "mocov3.eval.embed",
    "mocov3.report",
    "mocov3.bench",
    "mocov3.interop.cli",
    "mocov3.study",
)

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, CheckpointError)


def main(argv: Sequence[str] | None = None) -> int:
    from mocov3.engine.train import TrainingError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (*USER_ERRORS, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
