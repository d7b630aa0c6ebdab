"""The evaluation commands at scale: a folder too large for the memory allowed is streamed
and gives the in-memory numbers; two processes under torchrun give one process's numbers
and write one result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mocov3.cli import main
from mocov3.eval.embed import embedding_files, load_embeddings

STREAM = ("--set", "data.memory_limit_gb=0.000001")  # 160 images of 784 bytes exceed it


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mocov3", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def knn_args(tiny_run: Path, fashion_folder: Path) -> list[str]:
    return ["knn", "--checkpoint", str(tiny_run), "--data", f"folder:{fashion_folder}"]


@pytest.fixture(scope="module")
def knn_in_memory(knn_args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(knn_args) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_knn_streamed_equals_knn_in_memory(knn_args, knn_in_memory, capsys):
    assert main([*knn_args, *STREAM]) == 0
    streamed = _json(capsys)
    assert knn_in_memory["streamed"] is False and streamed["streamed"] is True
    assert streamed["train_images"] == knn_in_memory["train_images"] == 160
    assert streamed["test_images"] == knn_in_memory["test_images"] == 40
    for k in (20, 200):
        assert streamed[f"knn_top1_k{k}"] == knn_in_memory[f"knn_top1_k{k}"]
    assert knn_in_memory["knn_top1_k20"] > 50  # 4 classes: chance is 25


def test_knn_on_two_processes_equals_one(knn_args, knn_in_memory):
    done = _torchrun(*knn_args, *STREAM)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # only the first process prints
    two = json.loads(lines[0])
    assert two["processes"] == 2 and two["streamed"] is True
    assert two["train_images"] == 160 and two["test_images"] == 40
    for k in (20, 200):
        assert two[f"knn_top1_k{k}"] == knn_in_memory[f"knn_top1_k{k}"]


def test_embed_writes_shards_and_two_processes_write_the_same_rows(
    tiny_run, fashion_folder, tmp_path, capsys
):
    args = ["embed", "--checkpoint", str(tiny_run), "--data", f"folder:{fashion_folder}",
            "--shard-size", "50"]  # fmt: skip
    one = tmp_path / "one" / "features.safetensors"
    assert main([*args, "--out", str(one)]) == 0
    result = _json(capsys)
    assert result["files"] == 4 and result["count"] == 160 and result["streamed"] is True
    files = embedding_files(one)
    assert [f.name for f in files] == [f"features-0000{i}-of-00004.safetensors" for i in range(4)]
    features, labels, names = load_embeddings(one)
    assert features.shape == (160, 64) and labels.shape == (160,) and len(set(names)) == 160
    assert all(name.startswith("train/") and name.endswith(".png") for name in names)

    # written again as one file: the earlier shards go, so no old rows are read back
    assert main([*args[:-2], "--out", str(one)]) == 0
    assert _json(capsys)["files"] == 1 and embedding_files(one) == [one]
    assert not list(one.parent.glob("features-*")) and load_embeddings(one)[0].shape[0] == 160

    two = tmp_path / "two" / "features.safetensors"
    _torchrun(*args, "--out", str(two))
    features2, labels2, names2 = load_embeddings(two)
    assert names2 == names and torch.equal(labels2, labels)
    torch.testing.assert_close(features2, features, rtol=1e-3, atol=1e-3)


def test_evaluation_refuses_data_without_labels_or_test_split(tiny_run, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("L", (28, 28), 40 * i).save(flat / f"{i}.png")
    code = main(["knn", "--checkpoint", str(tiny_run), "--data", f"folder:{flat}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "kNN needs a labelled test split" in err and "val/" in err


def test_fast_probe_streamed_and_on_two_processes_equals_one_in_memory(
    tiny_run, fashion_folder, capsys
):
    args = ["linear", "--checkpoint", str(tiny_run), "--data", f"folder:{fashion_folder}",
            "--epochs", "5", "--lrs", "0.1", "1.0", "--batch-size", "64"]  # fmt: skip
    assert main(args) == 0
    memory = _json(capsys)
    assert main([*args, *STREAM]) == 0
    streamed = _json(capsys)
    two = json.loads(_torchrun(*args, *STREAM).stdout.strip().splitlines()[-1])
    assert memory["streamed"] is False and streamed["streamed"] is True
    for result in (streamed, two):
        assert result["train_images"] == memory["train_images"] == 144  # 160 less a tenth
        assert result["best_lr"] == memory["best_lr"]
        assert abs(result["linear_top1"] - memory["linear_top1"]) <= 2.5  # one image of 40
        assert result["backbone_unchanged"] is True
    assert memory["linear_top1"] > 50  # 4 classes


def test_report_on_two_processes_writes_one_page(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    done = _torchrun("report", "--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu")
    lines = done.stdout.strip().splitlines()
    assert lines == [json.dumps({"report": str(out)})]  # the first process alone reports
    page = out.read_text()
    assert "confusion" in page.lower() and "data:image/png;base64" in page
