"""The tables a study report adds when its grid allows them.

- **Over seeds** (``train.seed`` varied): each setting's kNN and linear top-1 as the mean
  and range over its seeds, with its instability counts; one seed's number is not a result.
- **Frozen vs learned** (``model.freeze_patch_embed`` varied): the paper's comparison
  (Chen, Xie, He, ICCV 2021, Sec. 5.1, Table 5): each learned run beside its frozen twin
  (same other settings), the *ordered* spikes of each (a first-layer gradient spike followed
  within ``stability.merge_steps`` by a last-block spike, :func:`ordered_spike_pairs`),
  and the linear gain of freezing, per setting over seeds.

The ordered spikes are read back from a run's ``metrics.jsonl`` (its logged spikes), so a
study of runs made before the detector counted them reports them too.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mocov3.config import StabilityConfig
from mocov3.runtime.logging import read_metrics
from mocov3.tools.plots import grad_groups, plot_stability_pair
from mocov3.train.stability import (
    LAST_LAYER_GROUP,
    RunningMedian,
    first_layer_group,
    ordered_spike_pairs,
)

SEED_KEY = "train.seed"
FREEZE_KEY = "model.freeze_patch_embed"
# a kNN dip "follows" an ordered spike when it comes within this many steps of the
# first-layer spike (the kNN monitor runs every few tens of steps)
DIP_WINDOW = 100


def peak_ratio(records: list[dict], group: str, settings: StabilityConfig) -> float | None:
    """The largest ratio of ``group``'s gradient norm to its running median (the detector's
    window and warm-up): how close the run came to a spike, which is this above
    ``stability.spike_factor``."""
    history, peak = RunningMedian(settings.window), None
    for record in records:
        value = record.get(group) if record.get("kind") == "grad" else None
        if value is None or value != value:
            continue
        if len(history) >= settings.warmup and history.median() > 0:
            ratio = value / history.median()
            peak = ratio if peak is None else max(peak, ratio)
        history.add(value)
    return None if peak is None else round(peak, 2)


def run_instability(run_dir: Path, settings: StabilityConfig) -> dict[str, Any]:
    """A run's ordered spikes, how many a kNN dip followed, and the first layer's and last
    block's peak ratios, from its metrics.jsonl (``settings``: its stability section)."""
    merge_steps = settings.merge_steps
    records = read_metrics(run_dir / "metrics.jsonl")
    events = [r for r in records if r.get("kind") == "instability"]
    spikes: dict[str, list[int]] = {}
    for event in events:
        if event.get("event") == "grad_spike":
            spikes.setdefault(event["series"], []).append(int(event["step"]))
    first = first_layer_group(grad_groups(records))
    pairs = ordered_spike_pairs(
        spikes.get(first or "", []), spikes.get(LAST_LAYER_GROUP, []), merge_steps
    )
    dips = [int(e["step"]) for e in events if e.get("event") == "knn_dip"]
    followed = [f for f, _ in pairs if any(f <= dip <= f + DIP_WINDOW for dip in dips)]
    return {
        "first_layer": first,
        "first_layer_spikes": len(spikes.get(first or "", [])),
        "last_layer_spikes": len(spikes.get(LAST_LAYER_GROUP, [])),
        "ordered_spikes": len(pairs),
        "ordered_spike_leads": [last - first_step for first_step, last in pairs],
        "ordered_spikes_then_dip": len(followed),
        "first_layer_peak": peak_ratio(records, first, settings) if first else None,
        "last_layer_peak": peak_ratio(records, LAST_LAYER_GROUP, settings),
    }


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.2f}"
    return f"{statistics.fmean(known):.2f} ({min(known):.2f} to {max(known):.2f})"


def _value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # as the study file writes it
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings(row: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(row.get(key) for key in keys)


def _grouped(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_settings(row, keys), []).append(row)
    return groups


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def seeds_table(rows: list[dict[str, Any]], varied: list[str]) -> str | None:
    """Mean (range) over seeds of each setting; None unless some setting ran with two
    seeds or more."""
    keys = [key for key in varied if key != SEED_KEY]
    if SEED_KEY not in varied or max(map(len, _grouped(rows, keys).values()), default=0) < 2:
        return None
    header = [key.rsplit(".", 1)[-1] for key in keys]
    header += ["seeds", "kNN top-1", "linear top-1", "ordered spikes", "spike episodes"]
    body = []
    for setting, group in _grouped(rows, keys).items():
        counts = [
            "/".join(_value_text(row.get(name)) for row in group)
            for name in ("ordered_spikes", "grad_spikes", "knn_dips")
        ]
        body.append(
            [
                *(_value_text(value) for value in setting),
                str(len(group)),
                _spread([row.get("knn_top1") for row in group]),
                _spread([row.get("linear_top1") for row in group]),
                *counts,
            ]
        )
    return _markdown([*header, "kNN dips"], body)


def pairs_table(rows: list[dict[str, Any]], varied: list[str]) -> str | None:
    """Frozen minus learned, per setting over seeds; None without a learned run and its
    frozen twin."""
    if FREEZE_KEY not in varied or not _pairs(rows, varied):
        return None
    keys = [key for key in varied if key not in (FREEZE_KEY, SEED_KEY)]
    header = [key.rsplit(".", 1)[-1] for key in keys]
    header += ["pairs", "ordered spikes learned / frozen", "kNN dips learned / frozen"]
    header += ["kNN gain of freezing", "linear gain of freezing"]
    body = []
    for setting, group in _grouped(rows, keys).items():
        pairs = _pairs(group, varied)
        if not pairs:
            continue
        ordered = [f"{a.get('ordered_spikes')}/{b.get('ordered_spikes')}" for a, b in pairs]
        dips = [f"{a.get('knn_dips')}/{b.get('knn_dips')}" for a, b in pairs]
        body.append(
            [
                *(_value_text(value) for value in setting),
                str(len(pairs)),
                ", ".join(ordered),
                ", ".join(dips),
                _spread([_gain(learned, frozen, "knn_top1") for learned, frozen in pairs]),
                _spread([_gain(learned, frozen, "linear_top1") for learned, frozen in pairs]),
            ]
        )
    return _markdown(header, body)


def _gain(learned: dict[str, Any], frozen: dict[str, Any], key: str) -> float | None:
    if learned.get(key) is None or frozen.get(key) is None:
        return None
    return float(frozen[key]) - float(learned[key])


def _pairs(rows: list[dict[str, Any]], varied: list[str]) -> list[tuple[dict, dict]]:
    """(learned, frozen) rows that agree on every other varied key."""
    others = [key for key in varied if key != FREEZE_KEY]
    frozen = {_settings(r, others): r for r in rows if r.get(FREEZE_KEY) is True}
    return [
        (row, frozen[_settings(row, others)])
        for row in rows
        if row.get(FREEZE_KEY) is False and _settings(row, others) in frozen
    ]


def clearest_pair_plot(
    rows: list[dict[str, Any]], varied: list[str], runs_dir: Path, out_dir: Path
) -> Path | None:
    """``instability_pair.png``: the learned run with the most ordered spikes (then the most
    followed by a kNN dip, spike episodes, kNN dips, the highest first-layer peak) beside
    its frozen twin, in the paper's Fig. 4 style; None without a pair."""
    if FREEZE_KEY not in varied:
        return None
    pairs = _pairs(rows, varied)
    rank = lambda pair: (  # noqa: E731
        pair[0].get("ordered_spikes") or 0,
        pair[0].get("ordered_spikes_then_dip") or 0,
        pair[0].get("grad_spikes") or 0,
        pair[0].get("knn_dips") or 0,
        pair[0].get("first_layer_peak") or 0.0,
    )
    if not pairs:
        return None
    learned, frozen = max(pairs, key=rank)
    runs = [
        (
            f"learned projection: {learned['run']}",
            read_metrics(runs_dir / learned["run"] / "metrics.jsonl"),
        ),
        (
            f"frozen projection: {frozen['run']}",
            read_metrics(runs_dir / frozen["run"] / "metrics.jsonl"),
        ),
    ]
    title = (
        f"ordered spikes (first layer, then last block): {learned.get('ordered_spikes')} "
        f"learned, {frozen.get('ordered_spikes')} frozen; first-layer peak "
        f"{learned.get('first_layer_peak')}x / {frozen.get('first_layer_peak')}x its running median"
    )
    return plot_stability_pair(runs, out_dir / "instability_pair.png", title)
