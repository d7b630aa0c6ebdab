"""``mocov3 bench``: the pretraining step's speed on this machine, variants side by side
(:mod:`mocov3.tools.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mocov3.cli.common import add_set_arg
from mocov3.tools import bench
from mocov3.tools.bench import DEFAULT_CONFIG, BenchSettings, run_bench
from mocov3.tools.pipeline import run_bench_with_input

COLUMNS = (
    ("row", "name", "<30", "{}"),
    ("batch", "batch", ">5", "{}"),
    ("steps", "steps", ">5", "{}"),
    ("img/s", "images_per_second", ">8", "{:.1f}"),
    ("step ms", "step_ms", ">9", "{:.1f}"),
    ("aug ms", "augmentation_ms", ">8", "{:.1f}"),
    ("aug %", "augmentation_share", ">6", "{:.1%}"),
    ("mem MiB", "peak_memory_mib", ">8", "{:.0f}"),
    ("GFLOP/s", "achieved_gflops", ">8", "{:.1f}"),
    ("MFU", "mfu", ">6", "{:.1%}"),
    ("MFU best", "mfu_vs_best_peak", ">8", "{:.1%}"),
    ("speedup", "speedup_vs_baseline", ">7", "{:.2f}x"),
)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: machine, peaks, FLOPs, one line per row, the headline."""
    machine = result["machine"]
    peaks = ", ".join(
        f"{name} {peak['gflops']:.1f} GFLOP/s ({peak['op']} n={peak['size']})"
        for name, peak in result["peaks"].items()
    )
    lines = [
        f"mocov3 bench: {result['config']}  {result['model']}",
        f"machine: {' + '.join(filter(None, (machine.get('gpu'), machine['cpu'])))}; "
        f"torch {machine['torch']}, "
        f"{machine['threads']} CPU threads, device {machine['device']}",
        f"matmul peak (best of before and after the rows): {peaks}",
        f"FLOPs per image (fwd + bwd, torch.utils.flop_counter): "
        f"{result['flops_per_image'] / 1e9:.3f} GFLOP",
        f"mem: {result['memory']}; MFU: vs the row's precision peak; MFU best: vs the fastest",
        "",
        " ".join(f"{title:{align}}" for title, _, align, _ in COLUMNS),
    ]
    for row in result["rows"]:
        cells = [
            f"{'-' if row[key] is None else fmt.format(row[key]):{align}}"
            for _, key, align, fmt in COLUMNS
        ]
        lines.append(" ".join(cells) + (f"  [{row['note']}]" if row["note"] else ""))
    lines += [
        "",
        f"best: {result['best_row']}: {result['images_per_second']:.1f} img/s, MFU "
        f"{result['mfu']:.1%}, {result['speedup_vs_baseline']:.2f}x the baseline, "
        f"augmentation {result['augmentation_share']:.1%} of the step",
    ]
    if "bound" in result:
        lines += [
            f"input: {result['input_dataset']} ({result['input_images']} images, decode "
            f"{result['input_decode']}): {result['input_images_per_second_per_worker']:.1f} "
            f"img/s per worker, {result['input_images_per_second']:.1f} img/s with "
            f"{result['input_workers']} worker(s); step {result['step_images_per_second']:.1f} "
            f"img/s: bound by the {result['bound']} ({result['bound_ratio']:.2f}x)",
        ]
    return "\n".join(lines)


def _workers(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: 0 decodes in the main process")
    return value


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    settings = BenchSettings(
        config=args.config,
        overrides=tuple(args.set),
        device=args.device,
        precisions=tuple(args.precision) if args.precision else None,
        steps=args.steps,
        seconds=args.seconds,
        warmup=args.warmup,
        max_row_seconds=args.max_row_seconds,
        peak_seconds=args.peak_seconds,
        compile=args.compile,
        channels_last=args.channels_last,
        skip_slow=args.skip_slow,
    )
    progress = (lambda line: None) if args.quiet else _progress
    if args.data:
        result = run_bench_with_input(settings, args.data, args.input_workers, progress)
    else:
        result = run_bench(settings, progress)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    parser = commands.add_parser(
        "bench",
        help="images/s, FLOPs, MFU, memory and augmentation share of the pretraining step, "
        "variants side by side",
        description=bench.__doc__.split("\n\n")[0] if bench.__doc__ else None,
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"preset (default {DEFAULT_CONFIG})"
    )
    add_set_arg(parser, "override any config key, e.g. --set train.batch_size=128")
    parser.add_argument(
        "--steps", type=int, help="timed steps per row (default: as many as fit in --seconds)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="timed seconds per row when --steps is not given (default 10)",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default 1, CUDA 3)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default train.device)")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "fp16"),
        help="precisions to time (default fp32 bf16, plus fp16 on CUDA)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the fastest row again with torch.compile'd backbones",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="add the fastest row again with channels_last tensors",
    )
    parser.add_argument(
        "--skip-slow",
        action="store_true",
        help="leave out precisions whose matmul peak is below fp32's here",
    )
    parser.add_argument(
        "--max-row-seconds",
        type=float,
        default=60.0,
        help="a slow (emulated) precision runs on a batch predicted to fit this (default 60)",
    )
    parser.add_argument(
        "--peak-seconds",
        type=float,
        default=1.0,
        help="seconds spent timing matmuls per precision (default 1)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as one JSON object on the last line"
    )
    parser.add_argument(
        "--data",
        metavar="SOURCE",
        help="also time the streamed input pipeline on this dataset (folder:PATH, "
        "wds:PATTERN, hf:PATH) and say whether it or the step bounds training (default: "
        "the step alone, on random images)",
    )
    parser.add_argument(
        "--input-workers",
        type=_workers,
        help="decode workers for --data (default: data.workers, else the trainer's default "
        "on this device)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=cmd_bench)
