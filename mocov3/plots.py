"""PNG plots of a run, drawn from its ``metrics.jsonl`` (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mocov3.engine.logging import read_metrics  # noqa: E402

TRAIN_SERIES = {"loss": "loss", "lr": "learning rate", "momentum": "momentum m"}


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        if record.get("kind") == kind and key in record:
            xs.append(record["step"])
            ys.append(record[key])
    return xs, ys


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png, momentum.png and knn.png into ``run_dir``; return the paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for key, label in TRAIN_SERIES.items():
        xs, ys = _series(records, "train", key)
        if not xs:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(xs, ys, lw=1.2)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.set_title(f"{label} per step")
        axis.grid(alpha=0.3)
        written.append(_save(figure, run_dir / f"{key}.png"))
    knn_path = _plot_knn(records, run_dir / "knn.png")
    if knn_path is not None:
        written.append(knn_path)
    return written


def _knn_keys(records: list[dict], kind: str) -> list[str]:
    found = {k for r in records if r.get("kind") == kind for k in r if k.startswith("knn_top1_k")}
    return sorted(found, key=lambda k: int(k.removeprefix("knn_top1_k")))


def _plot_knn(records: list[dict], path: Path) -> Path | None:
    """Full-split kNN (init, final) as markers; the in-training monitor (a subset) as lines."""
    full, monitor = _knn_keys(records, "knn"), _knn_keys(records, "knn_monitor")
    if not full and not monitor:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, key in enumerate(full):
        xs, ys = _series(records, "knn", key)
        axis.plot(xs, ys, "o", color=f"C{index}", label=f"{key[9:]} full split")
    for index, key in enumerate(monitor):
        xs, ys = _series(records, "knn_monitor", key)
        axis.plot(xs, ys, "-", lw=1.2, color=f"C{index}", alpha=0.8, label=f"{key[9:]} monitor")
    axis.set_xlabel("step")
    axis.set_ylabel("kNN top-1 (%)")
    axis.set_title("weighted kNN accuracy on the test split")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)
