"""``mocov3 report RUN_DIR``: one self-contained HTML page about a run
(:mod:`mocov3.tools.report`); under torchrun the processes share the kNN's features and
the first writes the page."""

from __future__ import annotations

import argparse
import json

from mocov3.runtime.device import launched_processes
from mocov3.tools.report import write_report


def cmd_report(args: argparse.Namespace) -> int:
    with launched_processes(args.device or "auto") as (_, process):
        path = write_report(args.run_dir, args.out, args.device)
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
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining run directory")
    parser.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    parser.add_argument("--device", help="for the test-split features: auto | cpu | cuda")
    parser.set_defaults(handler=cmd_report)
