"""``mocov3 report RUN_DIR``: one self-contained HTML page about a pretraining run.

The page holds the run's summary (kNN at init and after training, throughput, times, final
loss), linear-probe / fine-tuning / from-scratch results when ``linear.json``,
``finetune.json`` or ``scratch.json`` sit in the run directory, the training and kNN curves,
a 2-D PCA map of the query backbone's test features coloured by class, and the confusion
matrix of the kNN classifier (k = the first ``eval.knn_k``) on the test split. Every image
is a PNG embedded as a base64 data URI, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mocov3.data.records import has_test_split  # noqa: E402
from mocov3.errors import CheckpointError, ConfigError, DatasetError  # noqa: E402
from mocov3.eval.knn import knn_classify  # noqa: E402
from mocov3.eval.splits import labelled_splits  # noqa: E402
from mocov3.models.checkpoint import open_checkpoint  # noqa: E402
from mocov3.runtime.device import resolve_device  # noqa: E402
from mocov3.runtime.distributed import is_main_process, launched_info  # noqa: E402
from mocov3.runtime.logging import format_duration, read_metrics  # noqa: E402
from mocov3.runtime.precision import eval_precision  # noqa: E402
from mocov3.tools.plots import plot_run  # noqa: E402

__all__ = ["EVAL_FILES", "MAX_PCA_POINTS", "SplitAnalysis", "analyse_test_split", "write_report"]

MAX_PCA_POINTS = 2000
EVAL_FILES = {
    "linear": "Linear probe (frozen backbone)",
    "finetune": "Fine-tuning",
    "scratch": "Supervised from scratch (baseline)",
}
CURVES = {
    "loss": "Loss",
    "lr": "Learning rate",
    "momentum": "Momentum",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem;
     margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.7rem; text-align: left; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #666; font-size: 0.9rem; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 0.8rem; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f7f7f7; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
"""


# --------------------------------------------------------------------------- small helpers


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A JSON value as short text: floats to 6 significant digits, containers as JSON."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _pct(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "—"


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{format_duration(value)} ({value:.1f} s)"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(figure: plt.Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _img(data: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{_png_uri(data)}" alt="{_esc(alt)}">{cap}</figure>'


def _table(rows: list[tuple[str, str]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{_esc(header[0])}</th><th>{_esc(header[1])}</th></tr>" if header else ""
    body = "".join(f'<tr><th>{_esc(k)}</th><td class="num">{_esc(v)}</td></tr>' for k, v in rows)
    return f"<table>{head}{body}</table>"


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        notes.append(f"{path.name} could not be read ({error}); its section is left out.")
        return None
    return value if isinstance(value, dict) else {"value": value}


# --------------------------------------------------------------------------- summary


def _knn_table(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One row per k: kNN top-1 at random init -> after training (percent)."""
    knn = [r for r in records if r.get("kind") == "knn"]
    init = next((r for r in knn if r.get("step") == 0), {})
    final = knn[-1] if knn and knn[-1].get("step", 0) > 0 else {}
    final = {**final, **{k: v for k, v in summary.items() if k.startswith("knn_top1_k")}}
    ks = sorted(
        {int(k[len("knn_top1_k") :]) for k in [*init, *final] if k.startswith("knn_top1_k")}
    )
    rows = []
    for k in ks:
        before = init.get(f"knn_top1_k{k}")
        if before is None and summary.get("knn_top1_init") is not None and k == ks[0]:
            before = summary["knn_top1_init"]
        rows.append(
            (
                f"kNN top-1 % (k={k}): init → final",
                f"{_pct(before)} → {_pct(final.get(f'knn_top1_k{k}'))}",
            )
        )
    return rows


def _summary_rows(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = _knn_table(summary, records)
    if "knn_top1_init" in summary and not rows:
        rows.append(("kNN top-1 % at init", _pct(summary["knn_top1_init"])))
    if "train_images" in summary or "test_images" in summary:
        rows.append(
            (
                "kNN memory / query images",
                f"{_fmt(summary.get('train_images'))} / {_fmt(summary.get('test_images'))}",
            )
        )
    train = [r for r in records if r.get("kind") == "train"]
    loss = summary.get("final_loss", train[-1].get("loss") if train else None)
    rows += [
        ("epochs", _fmt(summary.get("epochs", train[-1].get("epoch") if train else None))),
        ("steps", _fmt(summary.get("steps", train[-1].get("step") if train else None))),
        ("final loss", f"{loss:.4f}" if isinstance(loss, (int, float)) else "—"),
        ("training throughput (images/s)", _fmt(summary.get("images_per_second"))),
        ("training time", _seconds(summary.get("train_seconds"))),
        ("wall time (incl. kNN)", _seconds(summary.get("wall_seconds"))),
    ]
    return rows


# --------------------------------------------------------------------------- test-split analysis


@dataclass
class SplitAnalysis:
    """kNN predictions and 2-D PCA coordinates of the test split's query features."""

    classes: list[str]
    k: int
    labels: torch.Tensor  # [M] true labels of the kNN queries
    predictions: torch.Tensor  # [M]
    confusion: torch.Tensor  # [C, C] counts, rows = true class, columns = predicted
    pca: torch.Tensor  # [P, 2], P <= MAX_PCA_POINTS
    pca_labels: torch.Tensor  # [P]
    explained: tuple[float, float]  # variance fraction of PC1, PC2
    memory_size: int

    @property
    def accuracy(self) -> float:
        return 100.0 * float((self.predictions == self.labels).float().mean())


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    """Project L2-normalised, centred features on their first two principal axes."""
    x = F.normalize(features.double(), dim=1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:2]
    # Fix each axis's sign (largest loading positive) so the map does not flip between runs.
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs.where(signs != 0, torch.ones_like(signs))
    variance = s.square()
    total = float(variance.sum()) or 1.0
    share = [float(v) / total for v in variance[:2]] + [0.0, 0.0]
    coords = x @ components.T
    if coords.shape[1] < 2:  # a 1-D feature space: pad the second axis
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1])], 1)
    return coords.float(), (share[0], share[1])


def analyse_test_split(run_dir: Path, device: str | None, notes: list[str]) -> SplitAnalysis | None:
    """Features of the train (memory) and test splits from the run's checkpoint; None, with
    a note, when the checkpoint or a labelled test split is missing."""
    skip = "The PCA map and the confusion matrix are left out"
    if not (run_dir / "checkpoint.pt").is_file():
        notes.append(f"{skip}: the run has no checkpoint.pt.")
        return None
    run = open_checkpoint(run_dir / "checkpoint.pt")
    config = run.config
    if not has_test_split(config.data.name):
        notes.append(
            f"{skip}: the data '{config.data.name}' has no labelled test split "
            "(a folder needs val/ or test/ with class sub-folders)."
        )
        return None
    normalisation = (run.state["mean"], run.state["std"])
    try:
        memory, queries = labelled_splits(config, "the report", run.in_chans, normalisation)
    except DatasetError as error:
        notes.append(f"{skip}: {error}.")
        return None
    dev = resolve_device(device or config.train.device, launched_info())
    backbone = run.backbone("query").to(dev)
    precision = eval_precision(config.train.precision, dev)
    result = knn_classify(backbone, memory, queries, config, dev, precision=precision)
    classes = list(queries.classes)
    num_classes = max(len(classes), memory.num_classes, queries.num_classes)
    classes += [str(i) for i in range(len(classes), num_classes)]
    k = config.eval.knn_k[0]
    predictions, labels = result.predictions[k], result.labels
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(
        num_classes, num_classes
    )
    n_pca = min(MAX_PCA_POINTS, len(labels))
    coords, explained = pca_2d(result.query_features[:n_pca].float())
    return SplitAnalysis(
        classes=classes,
        k=k,
        labels=labels,
        predictions=predictions,
        confusion=confusion,
        pca=coords,
        pca_labels=labels[:n_pca],
        explained=explained,
        memory_size=result.memory_images,
    )


def _colours(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def plot_pca(analysis: SplitAnalysis) -> bytes:
    classes = analysis.classes
    figure, axis = plt.subplots(figsize=(8.5, 6))
    colours = _colours(len(classes))
    xy = analysis.pca.numpy()
    labels = analysis.pca_labels.numpy()
    for index, name in enumerate(classes):
        chosen = labels == index
        if chosen.any():
            axis.scatter(
                xy[chosen, 0],
                xy[chosen, 1],
                s=9,
                alpha=0.75,
                color=colours[index],
                label=name,
                linewidths=0,
            )
    p1, p2 = analysis.explained
    axis.set_xlabel(f"PC1 ({100 * p1:.1f}% of variance)")
    axis.set_ylabel(f"PC2 ({100 * p2:.1f}% of variance)")
    axis.set_title(f"PCA of L2-normalised query-backbone features, {len(labels)} test images")
    axis.grid(alpha=0.25)
    if len(classes) <= 40:
        axis.legend(
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            markerscale=2.5,
            frameon=False,
            fontsize=9 if len(classes) <= 20 else 7,
        )
    return _figure_png(figure)


def plot_confusion(analysis: SplitAnalysis) -> bytes:
    classes = analysis.classes
    n = len(classes)
    matrix = analysis.confusion.numpy()
    side = min(max(5.5, 0.5 * n + 2.0), 24)
    figure, axis = plt.subplots(figsize=(side + 1.2, side))
    image = axis.imshow(matrix, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="images")
    axis.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=9 if n <= 20 else 6)
    axis.set_yticks(range(n), classes, fontsize=9 if n <= 20 else 6)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(
        f"kNN (k={analysis.k}) on {int(matrix.sum())} test images: top-1 {analysis.accuracy:.2f}%"
    )
    if n <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for row in range(n):
            for col in range(n):
                axis.text(
                    col,
                    row,
                    str(int(matrix[row, col])),
                    ha="center",
                    va="center",
                    fontsize=8 if n <= 15 else 6,
                    color="white" if matrix[row, col] > threshold else "#222",
                )
    return _figure_png(figure)


def _per_class_table(analysis: SplitAnalysis) -> str:
    """Per-class kNN accuracy (recall) and the class each one is most confused with."""
    matrix = analysis.confusion
    rows = []
    for index, name in enumerate(analysis.classes):
        total = int(matrix[index].sum())
        if total == 0:
            continue
        off = matrix[index].clone()
        off[index] = -1
        worst = int(off.argmax())
        confused = f"{analysis.classes[worst]} ({int(off[worst])})" if off[worst] > 0 else "—"
        rows.append(
            f'<tr><td>{_esc(name)}</td><td class="num">{total}</td>'
            f'<td class="num">{100.0 * int(matrix[index, index]) / total:.1f}</td>'
            f"<td>{_esc(confused)}</td></tr>"
        )
    head = (
        "<tr><th>class</th><th>test images</th><th>kNN accuracy %</th>"
        "<th>most often predicted instead</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


# --------------------------------------------------------------------------- page


def _curve_images(run_dir: Path, notes: list[str]) -> dict[str, bytes]:
    """The run's loss/lr/momentum/knn PNGs, redrawn from metrics.jsonl when possible."""
    if (run_dir / "metrics.jsonl").is_file():
        try:
            plot_run(run_dir)
        except OSError as error:  # e.g. a read-only run directory: use the PNGs already there
            notes.append(f"could not redraw the curves ({error}); showing the saved PNGs.")
    return {
        key: (run_dir / f"{key}.png").read_bytes()
        for key in [*CURVES, "knn"]
        if (run_dir / f"{key}.png").is_file()
    }


def _overview(summary: dict[str, Any], evals: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    if "knn_top1" in summary:
        rows.append(("kNN (frozen features)", _pct(summary["knn_top1"])))
    for name, title in EVAL_FILES.items():
        values = evals.get(name, {})
        key = f"{name}_top1" if f"{name}_top1" in values else "top1"
        if key in values:
            rows.append((title, _pct(values[key])))
    return rows


def render_html(run_dir: Path, device: str | None = None) -> str:
    """The report page of ``run_dir`` as one HTML string."""
    notes: list[str] = []
    summary = _read_json(run_dir / "summary.json", notes)
    if summary is None:
        notes.append("summary.json is missing (run not finished?): the summary is partial.")
        summary = {}
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = {n: v for n in EVAL_FILES if (v := _read_json(run_dir / f"{n}.json", notes))}
    curves = _curve_images(run_dir, notes)
    analysis = None
    try:
        analysis = analyse_test_split(run_dir, device, notes)
    except (DatasetError, CheckpointError, ConfigError) as error:
        notes.append(f"The PCA map and the confusion matrix are left out: {error}")
        print(f"warning: {error}", file=sys.stderr)
    if not is_main_process():  # under torchrun the others only share the kNN's work
        return ""

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>MoCo v3 run report: {_esc(run_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>MoCo v3 run report: {_esc(run_dir.name)}</h1>",
        f'<p class="muted">{_esc(run_dir.resolve())} · generated '
        f"{_esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
    ]
    parts += [f'<p class="note">{_esc(note)}</p>' for note in notes]

    parts.append("<h2>Summary</h2>")
    parts.append(_table(_summary_rows(summary, records)))
    overview = _overview(summary, evals)
    if overview:
        parts.append("<h2>Accuracy overview (top-1 %, test split)</h2>")
        parts.append(_table(overview, ("evaluation", "top-1 %")))
    for name, title in EVAL_FILES.items():
        if name in evals:
            parts.append(f"<h2>{_esc(title)}</h2>")
            parts.append(f'<p class="muted">from {_esc(name)}.json</p>')
            parts.append(_table([(k, _fmt(v)) for k, v in evals[name].items()]))

    parts.append("<h2>Training curves</h2>")
    figures = [_img(curves[k], title) for k, title in CURVES.items() if k in curves]
    parts.append(
        f'<div class="grid">{"".join(figures)}</div>'
        if figures
        else '<p class="note">No training curves: metrics.jsonl has no train records.</p>'
    )
    parts.append("<h2>kNN accuracy during training</h2>")
    parts.append(
        _img(curves["knn"], "kNN top-1 per step")
        if "knn" in curves
        else '<p class="note">No kNN evaluations were logged.</p>'
    )

    parts.append("<h2>PCA map of test features</h2>")
    if analysis is not None:
        parts.append(
            _img(
                plot_pca(analysis),
                "PCA map of test features",
                f"{len(analysis.pca_labels)} test images, query backbone of "
                "checkpoint.pt, coloured by true class.",
            )
        )
        parts.append("<h2>Confusion matrix of kNN on the test split</h2>")
        parts.append(
            _img(
                plot_confusion(analysis),
                "Confusion matrix",
                f"k={analysis.k}, memory: {analysis.memory_size} training images; "
                f"queries: {len(analysis.labels)} test images; top-1 "
                f"{analysis.accuracy:.2f}%. Rows: true class, columns: predicted.",
            )
        )
        parts.append(_per_class_table(analysis))
    else:
        parts.append('<p class="note">Skipped (see the note at the top).</p>')
        parts.append("<h2>Confusion matrix of kNN on the test split</h2>")
        parts.append('<p class="note">Skipped (see the note at the top).</p>')

    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        parts.append("<h2>Configuration</h2>")
        parts.append(
            f"<details><summary>config.yaml</summary><pre>"
            f"{_esc(config_file.read_text())}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    run_dir: str | Path, out: str | Path | None = None, device: str | None = None
) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``); return its path."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist: pass a pretraining run's --out folder"
        )
    if not any((run_dir / n).is_file() for n in ("summary.json", "metrics.jsonl", "checkpoint.pt")):
        raise ConfigError(
            f"{run_dir} is not a run directory (no summary.json, metrics.jsonl or checkpoint.pt)"
        )
    page = render_html(run_dir, device)
    path = Path(out).expanduser() if out else run_dir / "report.html"
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return path
