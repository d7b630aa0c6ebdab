"""``mocov3 study FILE.yaml --out DIR``: a declared grid of short runs and one report
comparing them (:mod:`mocov3.tools.study`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mocov3.cli.common import add_set_arg
from mocov3.errors import ConfigError, require_package


def cmd_study(args: argparse.Namespace) -> int:
    require_package("matplotlib", "plots", "mocov3 study (its report's plots)")
    from mocov3.tools.study import load_study, run_study, write_report

    study = load_study(args.file, args.set)
    out_dir = Path(args.out)
    shard = _parse_shard(args.shard)
    sharded = ["--shard", args.shard] if args.shard else []
    command = "mocov3 " + shlex.join(
        ["study", str(args.file), "--out", str(out_dir), *(f"--set={s}" for s in args.set)]
        + sharded
    )
    if args.dry_run:
        for run in study.runs:
            print(f"{run.name}: {' '.join(run.overrides)}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = args.report or run_study(study, out_dir, command, shard)
    if sharded and finished:  # the shards share report.md: one call writes it at the end
        print(
            f"shard {args.shard} done; then: mocov3 study {args.file} --out {out_dir} --report",
            file=sys.stderr,
        )
        return 0
    report = write_report(study, out_dir, command.replace(f" --shard {args.shard}", ""))
    if not finished:
        print(f"study stopped; continue it with: {command}", file=sys.stderr)
        return 0
    print(f"report: {report}", file=sys.stderr)
    print(json.dumps(json.loads((out_dir / "results.json").read_text())))
    return 0


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard '{text}' must look like I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return index, count


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "study",
        help="run a declared grid of short pretraining runs and write a comparison report",
    )
    parser.add_argument("file", help="study YAML, e.g. studies/patch_projection.yaml")
    parser.add_argument("--out", required=True, help="study directory (runs/ and report.md)")
    add_set_arg(parser, "override a config key in every run (after the study's own settings)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs and their settings, run nothing"
    )
    parser.add_argument(
        "--report", action="store_true", help="only write the report from the finished runs"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run only runs I, I+N, I+2N, ... (0-based), to share a study between N "
        "processes or machines on one --out; then one call with --report writes the report "
        "(default: every run)",
    )
    parser.set_defaults(handler=cmd_study)
