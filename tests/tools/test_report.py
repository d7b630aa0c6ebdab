"""mocov3 report: a self-contained HTML page with summary, curves, PCA and confusion."""

import base64
import json
import re
import shutil

import numpy as np
from PIL import Image

from mocov3.cli import main

PNG_URI = '<img src="data:image/png;base64,'
EVAL_FILES = ("linear.json", "finetune.json", "scratch.json")


def _copy_run(tiny_run, dest, **kwargs):
    """A private copy of the shared run, without results other tests may have added."""
    shutil.copytree(tiny_run, dest, **kwargs)
    for name in EVAL_FILES:
        (dest / name).unlink(missing_ok=True)
    return dest


def _report(capsys, *args: str) -> str:
    assert main(["report", "--checkpoint", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]


def test_report_from_tiny_run(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "linear.json").write_text(json.dumps({"linear_top1": 61.37, "best_lr": 0.3}))
    path = _report(capsys, str(run))
    assert path == str(run / "report.html")
    page = (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())

    assert page.count(PNG_URI) >= 6  # loss, lr, momentum, knn, PCA, confusion
    assert "PCA" in page and "Confusion" in page
    assert re.search(r"<h2>[^<]*PCA[^<]*</h2>", page)
    assert re.search(r"<h2>[^<]*Confusion[^<]*</h2>", page)
    for key in ("knn_top1_k20", "knn_top1_k200"):
        assert f"{summary[key]:.2f}" in page
    assert "61.37" in page and "Linear probe" in page
    assert "Fine-tuning" not in page  # no finetune.json
    assert "T-shirt/top" in page and "Ankle boot" in page  # per-class table
    assert "http://" not in page and "https://" not in page  # no external assets

    # Confusion accuracy matches the training-time kNN (same memory, queries and k).
    match = re.search(r"top-1 (\d+\.\d\d)%\. Rows: true class", page)
    assert match and abs(float(match.group(1)) - summary["knn_top1"]) <= 0.5

    # Every embedded image decodes as a PNG.
    for blob in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        assert base64.b64decode(blob)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_test_split_or_eval_files(tiny_run, tmp_path, capsys):
    run = _copy_run(
        tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.png", "tensorboard")
    )
    # Point the checkpoint's data at an unlabelled folder: no test split to analyse.
    import torch

    images = tmp_path / "unlabelled"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(images / f"{i}.png")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["data"]["name"] = f"folder:{images}"
    torch.save(state, run / "checkpoint.pt")
    out = tmp_path / "out" / "page.html"
    assert _report(capsys, str(run), "--out", str(out)) == str(out)
    page = out.read_text()
    assert "no labelled test split" in page
    assert page.count(PNG_URI) == 4  # curves redrawn from metrics.jsonl, no PCA/confusion
    assert "Linear probe" not in page and "Fine-tuning" not in page


def test_report_of_missing_dir_is_one_line_error(tmp_path, capsys):
    assert main(["report", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
