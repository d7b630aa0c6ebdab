"""kNN top-1 against wall-clock minutes for time-budgeted runs, with the raw-pixel line.

Usage:
    python docs/experiments/scripts/accuracy_at_budget.py RUN_DIR [RUN_DIR ...] \
        --out docs/budget.png \
        [--labels "tuned recipe" "paper defaults, scaled down"]

Each run must have been trained with ``--budget-minutes`` (its ``budget`` record gives the
run's start). The kNN monitor (a subset of memory and queries, dense) is drawn as a line,
the full-split evaluations before and after training as markers. The raw-pixel kNN is
computed here on the full splits and on each monitor subset the runs used (runs can size
their monitors differently), with the first run's kNN settings, and drawn across.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mocov3.config import config_from_dict  # noqa: E402
from mocov3.data.sources import load_data  # noqa: E402
from mocov3.eval.knn import evaluate_knn  # noqa: E402
from mocov3.runtime.logging import read_metrics  # noqa: E402


def run_start(records: list[dict]) -> float:
    """Unix time the run's budget clock started (the budget record was written
    ``planned_after_seconds`` into the run)."""
    for record in records:
        if record.get("kind") == "budget":
            return float(record["time"]) - float(record["planned_after_seconds"])
    raise SystemExit("not a budgeted run: no budget record in metrics.jsonl")


def curve(run_dir: Path) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    start = run_start(records)
    minutes = lambda r: (float(r["time"]) - start) / 60  # noqa: E731
    monitor = [(minutes(r), r["knn_top1"]) for r in records if r.get("kind") == "knn_monitor"]
    full = [(minutes(r), r["knn_top1"]) for r in records if r.get("kind") == "knn"]
    summary = json.loads((run_dir / "summary.json").read_text())
    monitor_size = None
    first = next((r for r in records if r.get("kind") == "knn_monitor"), None)
    if first is not None:
        monitor_size = (first["train_images"], first["test_images"])
    return {
        "monitor": monitor,
        "full": full,
        "end": summary["budget"]["run_wall_seconds"] / 60,
        "minutes": summary["budget"]["minutes"],
        "monitor_size": monitor_size,
    }


def raw_pixel_knn(run_dir: Path, sizes: tuple[int, int] | None) -> float:
    config = config_from_dict(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    train_set, test_set = load_data(config)
    assert test_set is not None
    result = evaluate_knn(
        nn.Flatten(),
        train_set,
        test_set,
        config,
        torch.device("cpu"),
        raw_pixels=True,
        sizes=sizes or (None, None),
    )
    return float(result["knn_top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [str(run) for run in args.runs]
    curves = [curve(run) for run in args.runs]
    raw_full = raw_pixel_knn(args.runs[0], None)
    sizes = sorted({c["monitor_size"] for c in curves if c["monitor_size"] is not None})
    raw_monitor = {size: raw_pixel_knn(args.runs[0], size) for size in sizes}
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, (label, data) in enumerate(zip(labels, curves, strict=True)):
        colour = f"C{index}"
        if data["monitor"]:
            xs, ys = zip(*data["monitor"], strict=True)
            memory, queries = data["monitor_size"]
            subset = f"kNN monitor ({memory}/{queries})"
            axis.plot(xs, ys, "-", color=colour, lw=1.2, label=f"{label}: {subset}")
        if data["full"]:
            xs, ys = zip(*data["full"], strict=True)
            axis.plot(xs, ys, "o", color=colour, ms=7, label=f"{label}: full split")
    axis.axhline(
        raw_full, color="black", ls="--", lw=1, label=f"raw pixels, full split ({raw_full:.2f})"
    )
    for (memory, queries), value in raw_monitor.items():
        axis.axhline(
            value,
            color="grey",
            ls=":",
            lw=1,
            label=f"raw pixels, monitor subset {memory}/{queries} ({value:.2f})",
        )
    top = max([raw_full] + [y for c in curves for _, y in c["monitor"] + c["full"]])
    axis.set_ylim(top=top + 1.0)  # the raw-pixel line stays inside the frame
    axis.set_xlabel("wall-clock minutes since the run started")
    axis.set_ylabel("kNN top-1 (%), k = 20")
    axis.set_title("accuracy at budget (Fashion-MNIST, 2-core CPU)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "raw_pixels_full": raw_full,
                "raw_pixels_monitor_subsets": {f"{m}/{q}": v for (m, q), v in raw_monitor.items()},
                "runs": {
                    label: {
                        "final": c["full"][-1] if c["full"] else None,
                        "end_minutes": round(c["end"], 2),
                    }
                    for label, c in zip(labels, curves, strict=True)
                },
            }
        )
    )


if __name__ == "__main__":
    main()
