"""Re-record tests/train/golden_tiny_run.json after a change that is meant to change what
training computes (to rounding): the run of tests/train/test_reproducible.py, its losses
compared with the old record first, then the new record written.

Usage: python docs/experiments/scripts/record_golden_tiny_run.py "why it changed"
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_reproducible import PINNED, SETTINGS, model_sha256  # noqa: E402

GOLDEN = ROOT / "tests" / "train" / "golden_tiny_run.json"


def main() -> None:
    reason = sys.argv[1]
    old = json.loads(GOLDEN.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "mocov3", "pretrain", "--config", "configs/tiny.yaml"]
        command += ["--out", str(out), *[arg for item in SETTINGS for arg in ("--set", item)]]
        env = {**__import__("os").environ, **PINNED}
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        summary = json.loads((out / "summary.json").read_text())
        new = {
            "recorded": f"{datetime.date.today()}: {reason}",
            "losses": [r["loss"] for r in records if r["kind"] == "train"],
            "checkpoint_keys": list(state),
            "progress_keys": list(state["progress"]),
            "model_tensors": {n: list(t.shape) for n, t in state["model"].items()},
            "rng_keys": list(state["rng"]),
            "step": state["step"],
            "summary_keys": sorted(summary),
            "metric_kinds": sorted({r["kind"] for r in records}),
            "config": yaml.safe_load((out / "config.yaml").read_text()),
            "model_sha256": model_sha256(state["model"]),
        }
    for before, after in zip(old["losses"], new["losses"], strict=True):
        print(f"{before:.7f} {after:.7f} {after - before:+.2e}")
    for key in new:
        if key not in ("recorded", "losses", "model_sha256") and new[key] != old.get(key):
            print(f"{key} changed: {old.get(key)} -> {new[key]}")
    GOLDEN.write_text(json.dumps(new, indent=1) + "\n")


if __name__ == "__main__":
    main()
