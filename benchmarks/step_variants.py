"""Training-step time of model variants, side by side in one process.

Usage:
    python benchmarks/step_variants.py [--config configs/demo.yaml] [--steps 12] \
        [--variant NAME KEY=VALUE ...] ...

Each variant is the preset with its overrides (none: the preset itself). Every variant
builds a real Trainer on the preset's data and times full training steps (batched
augmentation, both encoders, EMA, backward, AdamW) after two untimed ones; the variants run
one after another in the same process, so the ratios between them (images per second, so
that variants with another batch size compare too) are what to read, not the absolute
numbers (this 2-core machine's speed wanders by about 15%). This is how the
demo's model was picked at a fixed CPU budget (docs/experiments/results.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from mocov3.config import load_config
from mocov3.train.trainer import Trainer

DEFAULT_VARIANTS = {
    "preset": [],
    "dim 96": ["model.embed_dim=96"],
    "patch 7 (16 tokens)": ["model.patch_size=7"],
    "dim 96, patch 7 (the previous demo)": ["model.embed_dim=96", "model.patch_size=7"],
    "heads 1024": ["model.proj_hidden_dim=1024", "model.pred_hidden_dim=1024"],
}
# timing only: no budget, no kNN, a data subset that loads fast
TIMING = ["train.budget_minutes=null", "eval.knn_init=false", "eval.monitor_every=0"]


def step_seconds(config_path: str, overrides: list[str], steps: int) -> tuple[float, int]:
    """(seconds per training step, the batch size it ran) for the preset with overrides."""
    config = load_config(config_path, [*overrides, *TIMING, "data.subset=8192"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, overwrite=True)
        trainer.close()  # the input pipeline __init__ made, replaced by one for these steps
        trainer.batches = trainer._batch_source(0, steps + 2)
        try:
            trainer.take_step(0)
            trainer.take_step(1)
            tic = time.perf_counter()
            for step in range(2, steps + 2):
                trainer.take_step(step)
            return (time.perf_counter() - tic) / steps, config.train.batch_size
        finally:
            trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY=VALUE")
    args = parser.parse_args()
    variants = DEFAULT_VARIANTS
    if args.variant:
        names = [name for name, *_ in args.variant]
        if len(set(names)) < len(names):
            parser.error(f"variant names must differ (they key the results): {names}")
        variants = {name: list(sets) for name, *sets in args.variant}
    rows: dict[str, dict] = {}
    speeds: dict[str, float] = {}  # images per second, unrounded
    for name, overrides in variants.items():
        # per variant: a variant may change the batch size, and speed is images per second
        seconds, batch = step_seconds(args.config, overrides, args.steps)
        speeds[name] = batch / seconds
        rows[name] = {
            "batch_size": batch,
            "step_seconds": round(seconds, 4),
            "images_per_second": round(speeds[name]),
        }
        print(f"{name:32s} {seconds:.3f} s/step  {speeds[name]:6.0f} img/s", flush=True)
    first = next(iter(speeds.values()))
    for name, row in rows.items():
        row["speed_vs_first"] = round(speeds[name] / first, 2)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
