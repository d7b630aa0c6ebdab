"""Peak resident memory and images/s of an evaluation command on a streamed dataset at
several sizes: the memory must not grow with the images read (a kNN bank grows by its
fp16 features only, 2 bytes x D per image).

    python benchmarks/imagenet_like.py --out /tmp/in-like --train 20000 --val 1000
    python benchmarks/eval_memory.py --sizes 5000 20000 -- knn --checkpoint RUN \
        --data folder:/tmp/in-like --set eval.test_subset=1000
    python benchmarks/eval_memory.py --sizes 5000 20000 -- linear --protocol reference \
        --checkpoint RUN --data folder:/tmp/in-like --epochs 1

Each size runs the command in a fresh process with ``--set data.subset=N`` (the train
split's first N images) and ``--set data.loader=stream``; it prints the command's JSON
result, its wall time, its images/s (train images read / wall time, start-up included:
extraction for kNN, the epochs' training views for the probe, whose own figure, training
alone, is shown beside) and the peak resident memory of the command's process and of its
largest DataLoader worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from input_pipeline import RSS_SCRIPT


def run(size: int, command: list[str]) -> None:
    extra = ["--set", f"data.subset={size}", "--set", "data.loader=stream"]
    tic = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, *command, *extra], capture_output=True, text=True
    )
    wall = time.perf_counter() - tic
    lines = done.stdout.strip().splitlines()
    peak = [line for line in lines if line.startswith("peak_rss_mib")]
    if done.returncode or not peak:
        sys.exit(done.stderr[-3000:])
    result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    main_mib, worker_mib = (float(value) for value in peak[0].split()[1:])
    epochs = result.get("epochs", 1) if command[0] == "linear" else 1
    images = result.get("train_images", size) * epochs
    own = result.get("images_per_second")  # the command's own, start-up excluded
    print(json.dumps(result))
    print(
        f"{command[0]} on {size} train images: {wall:.0f} s wall, {images / wall:,.0f} "
        f"train images/s over the wall time{f' ({own:,.0f} while training)' if own else ''}; "
        f"peak resident memory {main_mib:.0f} MiB (command), {worker_mib:.0f} MiB (largest "
        "worker)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mocov3 command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    for size in args.sizes:
        run(size, command)


if __name__ == "__main__":
    main()
