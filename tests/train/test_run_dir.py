"""The run directory on its own: retention, resume lookup, the checks before a restore, and
what a resumed run keeps of metrics.jsonl. Small dictionaries stand in for checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mocov3.config import load_config
from mocov3.errors import CheckpointError, TrainingError
from mocov3.runtime.checkpoint import save_checkpoint
from mocov3.train.run_dir import (
    RunDirectory,
    check_architecture,
    check_restorable,
    config_changes,
    numbered_checkpoints,
    truncate_metrics,
)

TINY = "configs/tiny.yaml"


def resumable(step: int, **extra: object) -> dict[str, object]:
    config = load_config(TINY).to_dict()
    keys = dict(model={}, optimizer={}, scaler={}, rng={}, steps_per_epoch=8, in_chans=1)
    return {**keys, "step": step, "config": config, **extra}


def test_save_keeps_the_newest_k_links_latest_and_keeps_milestones(tmp_path):
    run = RunDirectory(tmp_path)
    for step in (2, 4, 6, 8):
        run.save(resumable(step), step, keep=2, milestone=1 if step == 4 else None)
    assert [step for step, _ in numbered_checkpoints(tmp_path)] == [6, 8]
    assert (tmp_path / "checkpoint.pt").samefile(tmp_path / "checkpoint-8.pt")
    assert (tmp_path / "milestone-epoch1.pt").is_file()  # kept although checkpoint-4 went


def test_resume_auto_takes_the_newest_usable_checkpoint(tmp_path, capsys):
    run = RunDirectory(tmp_path)
    config = load_config(TINY)
    assert run.find_resume(None, config) is None
    assert run.find_resume("auto", config) is None  # nothing yet: start at step 0
    assert "no checkpoint" in capsys.readouterr().err
    for step in (2, 4):
        run.save(resumable(step), step, keep=3)
    (tmp_path / "checkpoint-6.pt").write_bytes(b"cut short by a kill")
    state, path = run.find_resume("auto", config)
    assert state["step"] == 4 and path.name == "checkpoint-4.pt"
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "checkpoint-6.pt" in err
    state, path = run.find_resume(tmp_path / "checkpoint-2.pt", config)
    assert state["step"] == 2
    other = load_config(TINY, ["model.embed_dim=32"])
    with pytest.raises(CheckpointError, match="another architecture.*model.embed_dim 64"):
        run.find_resume("auto", other)


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.prepare(resume=None, overwrite=False)  # creates it
    save_checkpoint(resumable(2), tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(TrainingError, match="already holds a run"):
        run.prepare(resume=None, overwrite=False)
    run.prepare(resume=None, overwrite=True)
    run.prepare(resume="auto", overwrite=False)


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / ".checkpoint-4.pt.x1.tmp").write_bytes(b"half")
    (tmp_path / ".metrics.jsonl.x2.tmp").write_text("{")
    (tmp_path / "notes.tmp").write_text("not ours")
    RunDirectory(tmp_path).prepare(resume="auto", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]
    RunDirectory(tmp_path, is_main=False).prepare(resume="auto", overwrite=False)


def test_later_checkpoints_of_a_replaced_run_are_removed(tmp_path, capsys):
    run = RunDirectory(tmp_path)
    for step in (2, 4, 6):
        run.save(resumable(step), step, keep=3, milestone=3 if step == 6 else None)
    run.remove_later_checkpoints(4, tmp_path / "checkpoint-4.pt")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-2.pt", "checkpoint-4.pt", "milestone-epoch3.pt"]
    assert "removed 2 checkpoint file(s)" in capsys.readouterr().err


def test_restore_checks_name_the_mismatch_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = resumable(16)
    check_restorable(state, path, channels=1, steps_per_epoch=8, total_steps=16)
    for args, words in [
        ((3, 8, 16), "1-channel images, the data gives 3"),
        ((1, 7, 16), "8 steps per epoch, this data and train.batch_size give 7"),
        ((1, 8, 10), "at step 16, beyond the 10 steps"),
    ]:
        with pytest.raises(CheckpointError, match=words) as error:
            check_restorable(state, path, *args)
        assert "\n" not in str(error.value)
    check_architecture(state, load_config(TINY), path)


def test_config_changes_leave_out_where_the_run_computes():
    state = resumable(0)
    changed = load_config(TINY, ["train.threads=1", "train.device=cpu", "optim.base_lr=0.5"])
    assert config_changes(state, changed) == ["optim.base_lr 0.01 -> 0.5"]


def test_a_resumed_run_keeps_what_its_checkpoint_step_had_made(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "step": 3},
        {"kind": "grad", "step": 4},
        {"kind": "train", "step": 4},
        {"kind": "knn_monitor", "step": 4},  # made after the step: evaluated again
        {"kind": "instability", "step": 4, "series": "knn"},  # the monitor's dip: again
        {"kind": "instability", "step": 4, "series": "loss"},
        {"kind": "train", "step": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    truncate_metrics(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [records[i] for i in (0, 1, 2, 5)]
    truncate_metrics(path, None)  # a new run starts an empty file
    assert path.read_text() == ""
    truncate_metrics(Path(tmp_path / "missing.jsonl"), 3)  # nothing to keep, nothing made
    assert not (tmp_path / "missing.jsonl").exists()
