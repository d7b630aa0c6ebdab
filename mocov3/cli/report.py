"""``mocov3 report --checkpoint RUN``: one self-contained HTML page about a run
(:mod:`mocov3.tools.report`); under torchrun the processes share the kNN's features and
the first writes the page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mocov3.cli.common import add_device_arg
from mocov3.errors import require_package
from mocov3.runtime.device import launched_processes


def run_directory(path: str) -> Path:
    """The run a ``--checkpoint`` names: the directory itself, or a checkpoint's folder."""
    given = Path(path).expanduser()
    return given.parent if given.is_file() else given


def cmd_report(args: argparse.Namespace) -> int:
    require_package("matplotlib", "plots", "mocov3 report")
    from mocov3.tools.report import write_report

    with launched_processes(args.device or "auto") as (_, process):
        path = write_report(run_directory(args.checkpoint), args.out, args.device)
    if process.is_main:  # under torchrun the others shared the kNN's feature extraction
        print(json.dumps({"report": str(path)}))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 report``."""
    parser = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a run",
        description="One HTML file with the run's summary, curves, evaluation results, a PCA "
        "map of test features and the kNN confusion matrix; images are embedded.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="the pretraining run: its directory, or a checkpoint file in it",
    )
    parser.add_argument("--out", help="output file (default: RUN/report.html)")
    add_device_arg(parser)
    parser.set_defaults(handler=cmd_report)
