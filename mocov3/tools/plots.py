"""PNG plots of a run, drawn from its ``metrics.jsonl`` (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mocov3.runtime.logging import read_metrics  # noqa: E402
from mocov3.train.stability import first_layer_group  # noqa: E402

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


EVENT_STYLE = {
    "grad_spike": ("tab:red", "gradient spike"),
    "loss_rise": ("tab:orange", "loss rise"),
    "knn_dip": ("tab:purple", "kNN dip"),
}


def _events(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "instability"]


def _mark_events(axis: plt.Axes, events: list[dict], label: bool = True) -> None:
    """A thin vertical line per event, coloured by kind (one legend entry per kind)."""
    labelled: set[str] = set()
    for event in events:
        colour, name = EVENT_STYLE.get(event.get("event", ""), ("grey", "event"))
        show = label and name not in labelled
        labelled.add(name)
        axis.axvline(
            event["step"], color=colour, lw=0.8, ls="--", alpha=0.6, label=name if show else None
        )


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png, momentum.png, knn.png, and (when gradient norms were logged)
    grad_norms.png and stability.png into ``run_dir``; return the paths. Instability events
    are marked as dashed vertical lines on the loss, kNN and stability plots."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for key, label in TRAIN_SERIES.items():
        xs, ys = _series(records, "train", key)
        if not xs:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(xs, ys, lw=1.2)
        if key == "loss" and _events(records):
            _mark_events(axis, _events(records))
            axis.legend(fontsize=8)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.set_title(f"{label} per step")
        axis.grid(alpha=0.3)
        written.append(_save(figure, run_dir / f"{key}.png"))
    for path in (
        _plot_knn(records, run_dir / "knn.png"),
        _plot_grad_norms(records, run_dir / "grad_norms.png"),
        _plot_stability(records, run_dir / "stability.png"),
    ):
        if path is not None:
            written.append(path)
    return written


def grad_groups(records: list[dict]) -> list[str]:
    """The gradient groups logged in ``grad`` records, in their logged order."""
    names: dict[str, None] = {}
    for record in records:
        if record.get("kind") == "grad":
            names.update(dict.fromkeys(k for k in record if k not in ("kind", "step", "time")))
    return list(names)


def _plot_grad_norms(records: list[dict], path: Path) -> Path | None:
    groups = [g for g in grad_groups(records) if g != "total"]
    if not groups:
        return None
    figure, axis = plt.subplots(figsize=(7, 3.8))
    for index, group in enumerate(groups):
        xs, ys = _series(records, "grad", group)
        axis.plot(xs, ys, lw=0.8, color=f"C{index}", label=group)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("gradient L2 norm")
    axis.set_title("gradient norm per layer group")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _plot_stability(records: list[dict], path: Path) -> Path | None:
    """The paper's Fig. 4 at run scale: first-layer and last-block gradient norms over
    iterations, the kNN curve under them, instability events marked on both."""
    if _stability_groups(records) is None:
        return None
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    _draw_stability(top, bottom, records)
    top.set_title("gradient norms (triangles: spikes) and kNN; dashed: instability events")
    return _save(figure, path)


def plot_stability_pair(
    runs: list[tuple[str, list[dict]]], path: Path, title: str = ""
) -> Path | None:
    """Runs side by side in the paper's Fig. 4 style (e.g. a learned and a frozen patch
    projection at one lr): per run, first-layer and last-block gradient norms over
    iterations above its kNN curve, on shared axes so the spikes compare at a glance."""
    runs = [(name, records) for name, records in runs if _stability_groups(records)]
    if not runs:
        return None
    figure, axes = plt.subplots(
        2, len(runs), figsize=(5.5 * len(runs), 5.5), sharex=True, sharey="row", squeeze=False
    )
    for column, (name, records) in enumerate(runs):
        _draw_stability(axes[0][column], axes[1][column], records)
        axes[0][column].set_title(name, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _stability_groups(records: list[dict]) -> tuple[str | None, list[str]] | None:
    """(first-layer group, the groups to draw) or None when no gradient norms were logged."""
    groups = grad_groups(records)
    first = first_layer_group(groups)
    shown = [g for g in (first, "blocks.last") if g is not None and g in groups]
    return (first, shown) if shown else None


def _draw_stability(top: plt.Axes, bottom: plt.Axes, records: list[dict]) -> None:
    first, shown = _stability_groups(records) or (None, [])
    events = _events(records)
    for index, group in enumerate(shown):
        xs, ys = _series(records, "grad", group)
        label = f"first layer ({group})" if group == first else f"last layer ({group})"
        top.plot(xs, ys, lw=0.8, color=f"C{index}", label=label)
    spikes = [e for e in events if e.get("event") == "grad_spike" and e.get("series") in shown]
    for event in spikes:
        index = shown.index(event["series"])
        top.plot(event["step"], event["value"], "v", color=f"C{index}", ms=6)
    top.set_yscale("log")
    top.set_ylabel("gradient L2 norm")
    _mark_events(top, events)
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    for index, key in enumerate(_knn_keys(records, "knn_monitor")[:1]):
        xs, ys = _series(records, "knn_monitor", key)
        bottom.plot(xs, ys, "-", lw=1.2, color=f"C{index + 2}", label=f"{key[9:]} monitor")
    for key in _knn_keys(records, "knn")[:1]:
        xs, ys = _series(records, "knn", key)
        bottom.plot(xs, ys, "o", color="C2", label=f"{key[9:]} full split")
    _mark_events(bottom, events, label=False)
    bottom.set_xlabel("step")
    bottom.set_ylabel("kNN top-1 (%)")
    if any(not line.get_label().startswith("_") for line in bottom.lines):
        bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3)


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
    _mark_events(axis, [e for e in _events(records) if e.get("event") == "knn_dip"])
    axis.set_xlabel("step")
    axis.set_ylabel("kNN top-1 (%)")
    axis.set_title("weighted kNN accuracy on the test split")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _epochs_per_step(records: list[dict]) -> float:
    """From the train records (epoch / step): lets runs with other batch sizes share an
    x axis in epochs."""
    for record in records:
        if record.get("kind") == "train" and record.get("step"):
            return float(record["epoch"]) / float(record["step"])
    return 1.0


def plot_study(runs: list[tuple[str, Path]], out_dir: Path) -> list[Path]:
    """Curves of all of a study's runs overlaid, against epochs: ``curves.png`` (kNN
    monitor and loss) and ``gradients.png`` (first-layer and last-block gradient norms)."""
    loaded = [(name, read_metrics(run_dir / "metrics.jsonl")) for name, run_dir in runs]
    loaded = [(name, records) for name, records in loaded if records]
    if not loaded:
        return []
    written = []
    figure, (knn_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, (name, records) in enumerate(loaded):
        scale, colour = _epochs_per_step(records), f"C{index % 10}"
        key = next(iter(_knn_keys(records, "knn_monitor") or _knn_keys(records, "knn")), None)
        if key is not None:
            kind = "knn_monitor" if _knn_keys(records, "knn_monitor") else "knn"
            xs, ys = _series(records, kind, key)
            knn_axis.plot([x * scale for x in xs], ys, lw=1.2, color=colour, label=name)
            dips = [e for e in _events(records) if e.get("event") == "knn_dip"]
            knn_axis.plot(
                [e["step"] * scale for e in dips],
                [e["value"] for e in dips],
                "v",
                color=colour,
                ms=6,
            )
        xs, ys = _series(records, "train", "loss")
        loss_axis.plot([x * scale for x in xs], ys, lw=1.0, color=colour, label=name)
    knn_axis.set_title("kNN monitor top-1 (triangles: dips)")
    knn_axis.set_ylabel("kNN top-1 (%)")
    loss_axis.set_title("training loss")
    loss_axis.set_ylabel("loss")
    for axis in (knn_axis, loss_axis):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    knn_axis.legend(fontsize=7)
    written.append(_save(figure, out_dir / "curves.png"))
    with_grads = [(name, records) for name, records in loaded if grad_groups(records)]
    if with_grads:
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for index, (name, records) in enumerate(loaded):
            groups = grad_groups(records)
            scale, colour = _epochs_per_step(records), f"C{index % 10}"
            for axis, group in zip(axes, (first_layer_group(groups), "blocks.last"), strict=True):
                if group is None or group not in groups:
                    continue
                xs, ys = _series(records, "grad", group)
                axis.plot(
                    [x * scale for x in xs], ys, lw=0.7, color=colour, label=f"{name} ({group})"
                )
        axes[0].set_title("first layer: patch projection if learned, else first block")
        axes[1].set_title("last block")
        for axis in axes:
            axis.set_yscale("log")
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6)
        axes[0].set_ylabel("gradient L2 norm")
        written.append(_save(figure, out_dir / "gradients.png"))
    return written
