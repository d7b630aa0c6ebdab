"""A study report's over-seeds and frozen-vs-learned tables and the clearest pair's plot
(mocov3/tools/study_tables.py), on hand-written metrics files."""

from __future__ import annotations

import json
from pathlib import Path

from mocov3.config import StabilityConfig
from mocov3.tools.study_tables import (
    clearest_pair_plot,
    pairs_table,
    peak_ratio,
    run_instability,
    seeds_table,
)

VARIED = ["train.seed", "model.freeze_patch_embed", "optim.base_lr"]
FREEZE = "model.freeze_patch_embed"


def _write_run(folder: Path, first: str, spikes: dict[str, list[int]], dips: list[int]) -> Path:
    """A metrics.jsonl with gradient norms of ``first`` and the last block every step, the
    given spike and dip events, and a kNN monitor point every 50 steps."""
    folder.mkdir(parents=True)
    records = []
    for step in range(1, 301):
        records.append({"kind": "grad", "step": step, first: 1.0, "blocks.last": 0.5})
        if step % 50 == 0:
            records.append({"kind": "knn_monitor", "step": step, "knn_top1_k20": 70.0})
    for series, steps in spikes.items():
        for step in steps:
            records.append(
                {
                    "kind": "instability",
                    "step": step,
                    "event": "grad_spike",
                    "series": series,
                    "value": 9.0,
                    "reference": 1.0,
                    "ratio": 9.0,
                }
            )
    for step in dips:
        records.append(
            {
                "kind": "instability",
                "step": step,
                "event": "knn_dip",
                "series": "knn",
                "value": 60.0,
                "reference": 70.0,
                "ratio": 10.0,
            }
        )
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_run_instability_counts_ordered_spikes_and_the_dips_after_them(tmp_path):
    # 100 -> 130: ordered, a dip at 150 follows within 100 steps; 200 -> 270: 70 steps, not
    # within merge_steps 50; 250 and the last block's 270 pair instead (20 later), no dip
    run = _write_run(
        tmp_path / "learned",
        "patch_embed",
        {"patch_embed": [100, 200, 250], "blocks.last": [130, 270], "blocks.first": [101]},
        dips=[150],
    )
    found = run_instability(run, StabilityConfig(merge_steps=50))
    assert found == {
        "first_layer": "patch_embed",
        "first_layer_spikes": 3,
        "last_layer_spikes": 2,
        "ordered_spikes": 2,
        "ordered_spike_leads": [30, 20],
        "ordered_spikes_then_dip": 1,
        "first_layer_peak": 1.0,  # the logged norms are flat: the peak is the median
        "last_layer_peak": 1.0,
    }
    # a frozen projection logs no patch_embed norm: the first block is the first layer
    frozen = _write_run(tmp_path / "frozen", "blocks.first", {"blocks.first": [120]}, [])
    assert run_instability(frozen, StabilityConfig())["first_layer"] == "blocks.first"
    assert run_instability(frozen, StabilityConfig())["ordered_spikes"] == 0


def test_peak_ratio_is_the_largest_norm_over_its_running_median_after_the_warmup():
    norms = [1.0] * 30 + [4.0] + [1.0] * 10 + [3.0]
    records = [{"kind": "grad", "step": i + 1, "g": v} for i, v in enumerate(norms)]
    records.insert(5, {"kind": "train", "step": 5, "loss": 1.0})  # other records are skipped
    assert peak_ratio(records, "g", StabilityConfig(window=100, warmup=20)) == 4.0
    early = [{"kind": "grad", "step": 1, "g": 1.0}, {"kind": "grad", "step": 2, "g": 9.0}]
    assert peak_ratio(early, "g", StabilityConfig(window=100, warmup=20)) is None  # too few


def _row(seed: int, frozen: bool, lr: float, knn: float, linear: float, ordered: int) -> dict:
    name = f"seed-{seed}_freeze-{str(frozen).lower()}_lr-{lr:g}"
    return {
        "run": name,
        "train.seed": seed,
        "model.freeze_patch_embed": frozen,
        "optim.base_lr": lr,
        "knn_top1": knn,
        "linear_top1": linear,
        "ordered_spikes": ordered,
        "ordered_spikes_then_dip": 0,
        "grad_spikes": ordered,
        "knn_dips": 0,
    }


ROWS = [
    _row(0, False, 0.003, 70.0, 75.0, 2),
    _row(0, True, 0.003, 71.0, 76.0, 0),
    _row(1, False, 0.003, 72.0, 77.0, 1),
    _row(1, True, 0.003, 72.0, 76.0, 0),
    _row(0, False, 0.001, 74.0, 78.0, 0),  # no frozen twin: left out of the pairs
]


def test_seeds_table_gives_mean_and_range_per_setting():
    table = seeds_table(ROWS, VARIED)
    lines = table.splitlines()
    assert lines[0].startswith("| freeze_patch_embed | base_lr | seeds | kNN top-1")
    assert "| false | 0.003 | 2 | 71.00 (70.00 to 72.00) | 76.00 (75.00 to 77.00) | 2/1 |" in table
    assert "| true | 0.003 | 2 | 71.50 (71.00 to 72.00) | 76.00 (76.00 to 76.00) | 0/0 |" in table
    assert "| false | 0.001 | 1 | 74.00 | 78.00 | 0 |" in table
    assert seeds_table(ROWS, ["optim.base_lr"]) is None  # no seeds varied: no table
    assert seeds_table(ROWS[:1] + ROWS[-1:], VARIED) is None  # one seed per setting


def test_pairs_table_gives_the_gain_of_freezing_over_seeds():
    table = pairs_table(ROWS, VARIED)
    # gains frozen - learned: kNN +1 and 0, linear +1 and -1
    assert (
        "| 0.003 | 2 | 2/0, 1/0 | 0/0, 0/0 | 0.50 (0.00 to 1.00) | 0.00 (-1.00 to 1.00) |" in table
    )
    assert "0.001" not in table
    assert pairs_table(ROWS, ["train.seed", "optim.base_lr"]) is None
    assert pairs_table([row for row in ROWS if not row[FREEZE]], VARIED) is None  # no twins


def test_the_clearest_pair_is_the_learned_run_with_most_ordered_spikes(tmp_path):
    runs = tmp_path / "runs"
    for row in ROWS:
        first = "blocks.first" if row["model.freeze_patch_embed"] else "patch_embed"
        _write_run(runs / row["run"], first, {first: [100], "blocks.last": [120]}, [])
    plot = clearest_pair_plot(ROWS, VARIED, runs, tmp_path)
    assert plot == tmp_path / "instability_pair.png" and plot.stat().st_size > 10_000
    # without any spike the pair is still drawn: the most unstable by its first-layer peak
    calm = [dict(row, ordered_spikes=0, grad_spikes=0, first_layer_peak=2.0) for row in ROWS]
    assert clearest_pair_plot(calm, VARIED, runs, tmp_path) == tmp_path / "instability_pair.png"
    assert clearest_pair_plot(calm, ["optim.base_lr"], runs, tmp_path) is None  # no pairs
