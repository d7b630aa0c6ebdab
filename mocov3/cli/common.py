"""Arguments several commands share, and how they become config overrides."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mocov3.runtime.distributed import launched_info


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default after its help, ``(default: X)``, unless the help
    already says it or there is none to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == []) and (
            default is not argparse.SUPPRESS
        )  # identity, not equality: a default of 0 is shown
        if shown and "default" not in text and (action.option_strings or action.nargs):
            if isinstance(default, (list, tuple)):
                default = " ".join(map(str, default))
            text += f" (default: {default})"
        return text


class Parser(argparse.ArgumentParser):
    """The parser of ``mocov3`` and each of its commands: defaults shown in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_checkpoint_arg(parser: argparse.ArgumentParser, what: str = "probe") -> None:
    """``--checkpoint PATH``: how every command names the model or run it works on."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help=f"what to {what}: a checkpoint file, a run directory (its newest checkpoint) "
        "or an export directory",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="auto | cpu | cuda | cuda:N (default: the config's train.device, auto: a GPU "
        "when there is one)",
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--data-dir``, shared by every command that reads a dataset."""
    parser.add_argument(
        "--data",
        metavar="SOURCE",
        help="fashion-mnist | folder:PATH | wds:PATTERN | hf:PATH | synthetic (default: the "
        "config's data.name)",
    )
    add_data_dir_arg(parser)


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding the Fashion-MNIST idx files (default: $FASHION_MNIST_DIR, then "
        "the Debian package's folder, then the download cache)",
    )


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``--data``/``--data-dir`` as config overrides (``data.name=...``)."""
    overrides = []
    if args.data:
        overrides.append(f"data.name={args.data}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return overrides


def add_set_arg(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--set KEY=VALUE``, repeatable: any config key, applied after the preset."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help
        or "override any config key, read as YAML, e.g. --set eval.batch_size=256; repeatable",
    )


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
    process = launched_info()
    if process.world_size > 1:  # relaunch the same way, on the same number of processes
        nodes = process.world_size // max(process.local_world_size, 1)
        where = f"--nnodes {nodes} <the same rendezvous flags> " if nodes > 1 else ""
        program = f"torchrun {where}--nproc-per-node {process.local_world_size} -m mocov3"
    return f"{program} {shlex.join([*kept, '--resume', 'auto'])}"


def report_preempted(summary: dict[str, Any], argv: Sequence[str] | None) -> int:
    """A long command stopped by a signal (``summary`` from
    :func:`~mocov3.runtime.signals.preempted_summary`): say where it stopped and how to
    continue, print its JSON line; exit status 0."""
    command = resume_command(argv) if argv is not None else "the same command + --resume auto"
    summary["resume_command"] = command
    print(
        f"stopped by {summary['signal'] or 'request'} after step "
        f"{summary['step']}/{summary['total_steps']}; checkpoint "
        f"{summary['checkpoint']}; resume with: {command}",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0
