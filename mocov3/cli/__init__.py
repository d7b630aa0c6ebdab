"""The ``mocov3`` command line: one module per sub-command, argparse only here.

Each module's ``register(subparsers)`` adds its sub-command with a handler; the handler
turns the arguments into library calls. Errors the user can fix are printed as one line
(``error: ...``) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mocov3 import __version__
from mocov3.cli import (
    bench,
    embed,
    export,
    finetune,
    knn,
    linear,
    presets,
    pretrain,
    report,
    shards,
    study,
)
from mocov3.cli.common import Parser
from mocov3.errors import USER_ERRORS

COMMANDS = (
    pretrain, knn, linear, finetune, embed, report, bench, export, study, shards, presets
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mocov3", description="MoCo v3 self-supervised pretraining and evaluation")
    parser.add_argument("--version", action="version", version=f"mocov3 {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser, metavar="COMMAND"
    )
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
