"""Arguments several commands share, and how they become config overrides."""

from __future__ import annotations

import argparse


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
