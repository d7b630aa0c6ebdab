"""A time-budgeted run with a real stall: the training process is frozen (SIGSTOP) for a
while in the middle of its run, as when another job takes the machine, then continued.
Prints how the plan changed at each re-plan and whether the lr rose after the warmup.

    python docs/experiments/scripts/stall_budget.py --out /tmp/stall --minutes 5 \
        --stall-at 100 --stall-seconds 60 [--repo DIR]

``--repo`` runs the mocov3 of another checkout (e.g. a worktree of an older commit) with
this interpreter, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.repo:
        env["PYTHONPATH"] = str(Path(args.repo).resolve())
    config = args.config if not args.repo else str(Path(args.repo) / "configs" / "demo.yaml")
    command = [
        sys.executable, "-m", "mocov3", "pretrain", "--config", config,
        "--budget-minutes", str(args.minutes), "--out", args.out, "--overwrite",
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=args.repo or None, stdout=subprocess.PIPE)
    time.sleep(args.stall_at)  # the stall is the experiment: wall time is what it measures
    os.kill(process.pid, signal.SIGSTOP)
    time.sleep(args.stall_seconds)
    os.kill(process.pid, signal.SIGCONT)
    out, _ = process.communicate()
    wall = time.monotonic() - started
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return analyse(Path(args.out), summary, wall)


def analyse(out: Path, summary: dict, wall: float) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plans = [(r["step"], r["steps"]) for r in records if r["kind"] == "budget"]
    train = [(r["step"], r["lr"]) for r in records if r["kind"] == "train"]
    peak_step = max(train, key=lambda item: item[1])[0]
    after = [lr for step, lr in train if step >= peak_step]
    rises = [b - a for a, b in zip(after, after[1:], strict=False) if b > a]
    return {
        "plans (at step, steps)": plans,
        "lr_rises_after_peak": len(rises),
        "largest_rise": max(rises, default=0.0),
        "steps": summary.get("steps"),
        "knn_top1": summary.get("knn_top1"),
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--stall-at", type=float, default=100.0, help="seconds after start")
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument("--repo", help="another checkout's mocov3 (an older commit)")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
