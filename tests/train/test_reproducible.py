"""A fixed-seed tiny run reproduces, bit for bit, the recorded run (golden_tiny_run.json,
whose ``recorded`` says when and why): the same loss at every step, the same final weights,
the same checkpoint layout, resolved config, summary keys and metric kinds. A refactor that
changes what training computes fails here; a change meant to (a faster kernel's rounding)
re-records it with docs/experiments/scripts/record_golden_tiny_run.py, which prints the old
and new losses side by side.

The run goes through the real command in a subprocess with one thread, fp32 and the CPU
kernels pinned to AVX2 (PyTorch's own kernels, MKL and oneDNN), so that the bits do not
depend on which x86 CPU runs the test: on an AVX-512 machine the unpinned kernels round
differently (seen: the third loss differs in its 7th digit).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((Path(__file__).parent / "golden_tiny_run.json").read_text())
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
SETTINGS = [
    "data.subset=256",
    "train.epochs=4",
    "train.log_every=1",
    "train.precision=fp32",
    "train.threads=1",
    "eval.knn_init=false",
    "eval.knn_final=false",
]


def model_sha256(model: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_tiny_run_is_bit_identical_to_the_recorded_one(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mocov3", "pretrain", "--config", "configs/tiny.yaml"]
    command += ["--out", str(out), *[arg for item in SETTINGS for arg in ("--set", item)]]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **PINNED}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["kind"] == "train"]
    assert losses == GOLDEN["losses"]  # exact: floats round-trip through JSON
    assert sorted({record["kind"] for record in records}) == GOLDEN["metric_kinds"]

    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert list(state) == GOLDEN["checkpoint_keys"]
    assert list(state["progress"]) == GOLDEN["progress_keys"]
    assert list(state["rng"]) == GOLDEN["rng_keys"]
    assert state["step"] == GOLDEN["step"] == len(losses)
    shapes = {name: list(tensor.shape) for name, tensor in state["model"].items()}
    assert shapes == GOLDEN["model_tensors"]
    assert model_sha256(state["model"]) == GOLDEN["model_sha256"]

    assert yaml.safe_load((out / "config.yaml").read_text()) == GOLDEN["config"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary) == GOLDEN["summary_keys"]
