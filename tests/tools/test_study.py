"""``mocov3 study``: a declared grid of short runs, resumable, with a report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.errors import ConfigError
from mocov3.tools.study import _claim, linear_probe_run, load_study, run_name

ROOT = Path(__file__).resolve().parents[2]

TINY_STUDY = f"""
title: two tiny runs
question: does the lr matter?
budget: seconds
base: {ROOT / "configs/tiny.yaml"}
set:
  data.subset: 256
  train.epochs: 2
  train.batch_size: 64
  eval.knn_init: false
  eval.train_subset: 256
  eval.test_subset: 100
  eval.monitor_every: 4
grid:
  optim.base_lr: [1.0e-3, 1.0e-2]
linear: {{epochs: 2, train_subset: 256, test_subset: 100}}
paper: a quote
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_study_runs_resumes_without_redoing_and_reports(tmp_path, capsys):
    study = write(tmp_path, TINY_STUDY)
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 0
    names = ["base_lr-0.001", "base_lr-0.01"]
    for name in names:
        run = out / "runs" / name
        assert (run / "summary.json").is_file() and (run / "linear.json").is_file()
    rows = json.loads((out / "results.json").read_text())
    assert [row["run"] for row in rows] == names
    assert [row["optim.base_lr"] for row in rows] == [0.001, 0.01]
    for row in rows:
        assert 0 < row["knn_top1"] <= 100 and 0 < row["linear_top1"] <= 100
        assert row["instability_events"] is not None and row["wall_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "| run | base_lr | kNN init | kNN top-1 | linear top-1 | events" in report
    assert "![curves](curves.png)" in report and "![gradients](gradients.png)" in report
    assert (out / "curves.png").is_file() and (out / "gradients.png").is_file()
    assert "a quote" in report and "does the lr matter?" in report

    # a second call finds both runs done: nothing is trained or probed again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".pt", ".json")}
    stamps = {p: t for p, t in stamps.items() if p.name != "results.json"}
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert capsys.readouterr().err.count(": done") == 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # a run whose probe is missing gets only the probe; a removed run is trained again
    (out / "runs" / names[0] / "linear.json").unlink()
    summary_time = (out / "runs" / names[0] / "summary.json").stat().st_mtime_ns
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert (out / "runs" / names[0] / "linear.json").is_file()
    assert (out / "runs" / names[0] / "summary.json").stat().st_mtime_ns == summary_time


def test_shards_share_a_study_and_report_only_runs_nothing(tmp_path, capsys):
    study = str(write(tmp_path, TINY_STUDY))
    out = str(tmp_path / "out")
    assert main(["study", study, "--out", out, "--shard", "1/2"]) == 0
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert runs == ["base_lr-0.01"]  # the second run only
    assert not (tmp_path / "out" / "report.md").exists()  # a shard leaves the report alone
    assert "--report" in capsys.readouterr().err
    assert main(["study", study, "--out", out, "--report"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == runs
    assert "Runs finished: 1 of 2" in (tmp_path / "out" / "report.md").read_text()
    assert main(["study", study, "--out", out, "--shard", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err


def test_a_diverging_run_is_recorded_as_failed_and_the_study_goes_on(tmp_path, capsys):
    text = TINY_STUDY.split("grid:")[0] + (
        "runs:\n  - {name: diverges, optim.base_lr: 1.0e30}\n  - {name: fine}\nlinear: false\n"
    )
    study, out = str(write(tmp_path, text)), tmp_path / "out"
    assert main(["study", study, "--out", str(out)]) == 0
    assert (
        "lower optim.base_lr"
        in json.loads((out / "runs/diverges/failed.json").read_text())["error"]
    )
    assert (out / "runs/fine/summary.json").is_file()
    report = (out / "report.md").read_text()
    assert "Runs finished: 1 of 2, 1 failed" in report and "- `diverges`:" in report
    capsys.readouterr()
    assert main(["study", study, "--out", str(out)]) == 0  # not retried: delete it to retry
    assert "diverges: failed before" in capsys.readouterr().err


def test_a_changed_study_refuses_to_reuse_a_run_directory(tmp_path, capsys):
    out = tmp_path / "out"
    run = out / "runs" / "base_lr-0.001"
    run.mkdir(parents=True)
    (run / "study_run.json").write_text(json.dumps({"config": {"train": {"epochs": 1}}}))
    code = main(["study", str(write(tmp_path, TINY_STUDY)), "--out", str(out)])
    assert code == 2
    assert "made with other settings" in capsys.readouterr().err


def test_a_run_recorded_before_a_key_was_added_is_still_this_studys(tmp_path, capsys):
    study = load_study(write(tmp_path, TINY_STUDY))
    run = study.runs[0]
    config = load_config(study.base, run.overrides).to_dict()
    older = json.loads(json.dumps(config))
    del older["model"]["stem"]  # written by a version without model.stem
    run_dir = tmp_path / "out" / "runs" / run.name
    run_dir.mkdir(parents=True)
    (run_dir / "study_run.json").write_text(json.dumps({"config": older}))
    assert main(["study", str(study.path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    _claim(run_dir, config)  # the missing key at its default: the same run
    older["model"]["depth"] = config["model"]["depth"] + 1
    (run_dir / "study_run.json").write_text(json.dumps({"config": older}))
    with pytest.raises(ConfigError, match="made with other settings"):
        _claim(run_dir, config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid: {optim.base_lr: [1]}\nrunz: 1\n", "unknown key"),
        ("title: x\n", "either 'grid' or 'runs'"),
        ("grid: {optim.base_lr: 1}\n", "must list one or more values"),
        ("grid: {optim.nope: [1, 2]}\n", "unknown config key 'optim.nope'"),
        ("grid: {optim.base_lr: [-1]}\n", "optim.base_lr -1"),
        ("runs: [{name: a}, {name: a}]\n", "share a name"),
        ("base: missing.yaml\nruns: [{}]\n", "not found"),
        ("grid: {optim.base_lr: [1]}\nlinear: {epochs: 0}\n", "positive integers"),
        ("grid: {optim.base_lr: [1]}\nlinear: {features: last5}\n", "features must be one of"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_study(write(tmp_path, text))
    assert "\n" not in str(error.value)


def test_run_names_and_the_shipped_studies():
    assert run_name({"model.freeze_patch_embed": False, "optim.base_lr": 0.01}) == (
        "freeze_patch_embed-false_base_lr-0.01"
    )
    assert run_name({"augment.crop_scale": [0.2, 1.0]}) == "crop_scale-0.2-1.0"
    shipped = sorted((ROOT / "studies").glob("*.yaml"))
    assert [p.stem for p in shipped] == [
        "batch_size",
        "hour_backbone",
        "hour_heads",
        "hour_heads2",
        "hour_lr",
        "hour_search",
        "instability",
        "instability_conv_stem",
        "instability_search",
        "momentum",
        "patch_projection",
        "position_embedding",
        "predictor",
        "recipe_combos",
        "recipe_search",
    ]
    for path in shipped:  # every run's config builds; each file states its budget
        study = load_study(path)
        assert study.text.get("budget") and study.text.get("paper") and study.runs


def test_the_study_probe_is_mocov3_linear_reading_the_features_asked(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", run / "checkpoint.pt")
    settings = {"epochs": 2, "train_subset": 512, "test_subset": 200, "features": "cls+avgpool"}
    summary = linear_probe_run(run, settings)
    assert summary["features"] == "cls+avgpool" and summary["feature_dim"] == 128  # 2 x dim 64
    assert summary["train_images"] + summary["val_images"] == 512
    assert summary["test_images"] == 200 and summary["batch_size"] == 256
    assert summary["backbone_unchanged"] is True
    # written where `mocov3 linear --features cls+avgpool` writes, never over linear.json
    assert json.loads((run / "linear-cls-avgpool.json").read_text()) == summary
    assert not (run / "linear.json").exists()

    # the same probe through the command gives the same numbers
    argv = [
        "linear",
        "--checkpoint",
        str(run),
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--features",
        "cls+avgpool",
        "--set",
        "data.subset=512",
        "--set",
        "eval.test_subset=200",
    ]
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("linear_top1", "best_lr", "val_top1_per_lr", "train_images", "feature_dim"):
        assert cli[key] == summary[key], key


def test_probe_features_the_backbone_cannot_give_are_refused_before_any_run(tmp_path):
    text = TINY_STUDY.replace("test_subset: 100}", "test_subset: 100, features: last4}")
    with pytest.raises(ConfigError, match="at least 4 blocks, this one has 2") as error:
        load_study(write(tmp_path, text))  # configs/tiny.yaml's ViT has 2 blocks
    assert "\n" not in str(error.value)
    text = text.replace("features: last4", "features: cls+avgpool")
    assert load_study(write(tmp_path, text)).linear["features"] == "cls+avgpool"
