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

VERDICT_MARKS = {
    "faster": "faster",
    "slower": "slower",
    "within noise": "~noise",
    "too few steps": "few steps",
}
COLUMNS = (
    ("row", "name", "<34", "{}"),
    ("batch", "batch", ">5", "{}"),
    ("steps", "steps", ">5", "{}"),
    ("img/s", "images_per_second", ">7", "{:.1f}"),
    ("min-max", None, ">13", ""),
    ("step ms", "step_ms", ">8", "{:.0f}"),
    ("aug %", "augmentation_share", ">6", "{:.1%}"),
    ("mem MiB", "peak_memory_mib", ">7", "{:.0f}"),
    ("GFLOP/s", "achieved_gflops", ">7", "{:.1f}"),
    ("MFU", "mfu", ">6", "{:.1%}"),
    ("vs its base", None, ">14", ""),
    ("vs first row", None, ">14", ""),
)


def _cell(row: dict[str, Any], title: str, key: str | None, fmt: str) -> str:
    if title == "min-max":
        return f"{row['images_per_second_min']:.1f}-{row['images_per_second_max']:.1f}"
    if title == "vs its base":
        return _ratio(row["vs_previous_ratio"], row["vs_previous"])
    if title == "vs first row":
        return _ratio(row["speedup_vs_baseline"], row["vs_baseline"])
    value = row[key] if key else None
    return "-" if value is None else fmt.format(value)


def _ratio(ratio: float, standing: str) -> str:
    return f"{ratio:.2f}x {VERDICT_MARKS[standing]}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: machine, peaks, FLOPs, one line per row, the verdicts."""
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
        f"{result['flops_per_image'] / 1e9:.3f} GFLOP, "
        f"{result['flops_per_image_every_token'] / 1e9:.3f} with the last block over every "
        "token (the reference and the rows before 'class token only'); MFU counts each row's",
        f"rows timed in {result['rounds']} interleaved rounds; img/s is the median step, "
        "min-max the range; a row is faster or slower only where the ranges do not overlap",
        f"mem: {result['memory']}; MFU: vs the row's precision peak",
        "",
        " ".join(f"{title:{align}}" for title, _, align, _ in COLUMNS),
    ]
    for row in result["rows"]:
        cells = [f"{_cell(row, title, key, fmt):{align}}" for title, key, align, fmt in COLUMNS]
        lines.append(" ".join(cells) + (f"  [{row['note']}]" if row["note"] else ""))
    best = next(row for row in result["rows"] if row["name"] == result["best_row"])
    low, high = result["speedup_vs_baseline_by_round"]
    lines += [
        "",
        f"best: {result['best_row']}: {result['images_per_second']:.1f} img/s "
        f"({best['images_per_second_min']:.1f}-{best['images_per_second_max']:.1f}), MFU "
        f"{result['mfu']:.1%}, {_ratio(result['speedup_vs_baseline'], result['vs_baseline'])}"
        f" against {result['baseline_row']} (round by round {low:.2f}-{high:.2f}x), "
        f"augmentation {result['augmentation_share']:.1%} of the step",
    ]
    if (pair := result["training_path_vs_straightforward"]) is not None:
        standing = _ratio(pair["ratio"], pair["verdict"])
        lines.append(f"training path vs straightforward step (same math): {standing}")
    lines.append("ranking: " + " > ".join(result["ranking"]))
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
        reference_workers=args.reference_workers,
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
        "--steps",
        type=int,
        help="timed rounds, one step of every row each (default: at least 5, and more while "
        "the rounds took under --seconds per row)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="without --steps: timed seconds per row, on average (default 10)",
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
        help="add a row with torch.compile'd backbones (on top of the fastest precision)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="add a row with channels_last tensors (on top of the row before)",
    )
    parser.add_argument(
        "--reference-workers",
        type=int,
        help="DataLoader workers of the reference row's per-image augmentation (default: "
        "none on a CPU, where its cost then lands in its own step; half the cores, 1 to 4, "
        "with a GPU)",
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
