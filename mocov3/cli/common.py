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


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--data-dir``, shared by every command that reads a dataset."""
    parser.add_argument(
        "--data", help="fashion-mnist | folder:PATH | wds:PATTERN | hf:PATH | synthetic"
    )
    parser.add_argument("--data-dir", help="folder holding the Fashion-MNIST idx files")


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


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
