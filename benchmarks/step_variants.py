"""Training-step time of model variants, side by side in one process.

Usage:
    python benchmarks/step_variants.py [--config configs/demo.yaml] [--steps 12] \
        [--variant NAME KEY=VALUE ...] ...

Each variant is the preset with its overrides (none: the preset itself). Every variant
builds a real Trainer on the preset's data and runs two untimed steps; then the variants'
timed steps (batched augmentation, both encoders, EMA, backward, AdamW) run interleaved in
rounds, one step of each per round (mocov3.tools.rounds), so that this 2-core machine's
drift (about 15%) hits every variant alike. Each variant reports the median and min-max of
its images per second (variants with another batch size compare too); a variant is faster
than the first only when the ranges do not overlap. This is how the demo's model was picked
at a fixed CPU budget (docs/experiments/results.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from mocov3.config import load_config
from mocov3.tools.measure import synchronize
from mocov3.tools.rounds import run_rounds, verdict
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


class VariantStep:
    """A real Trainer for the preset with ``overrides``, warmed by two steps; called with a
    step number it takes that step and returns (0, its seconds), as the rounds expect."""

    def __init__(self, config_path: str, overrides: list[str], steps: int) -> None:
        config = load_config(config_path, [*overrides, *TIMING, "data.subset=8192"])
        self.batch = config.train.batch_size
        self.out = tempfile.TemporaryDirectory()
        self.trainer = Trainer(config, self.out.name, overwrite=True)
        self.trainer.close()  # the input pipeline __init__ made, replaced by one for these steps
        self.trainer.batches = self.trainer._batch_source(0, steps + 2)
        self.trainer.take_step(0)
        self.trainer.take_step(1)

    def __call__(self, step: int) -> tuple[float, float]:
        synchronize(self.trainer.device)
        tic = time.perf_counter()
        self.trainer.take_step(step)
        synchronize(self.trainer.device)  # a GPU's queued work belongs to this variant
        return 0.0, time.perf_counter() - tic

    def close(self) -> None:
        self.trainer.close()
        self.out.cleanup()


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
    built = {name: VariantStep(args.config, sets, args.steps) for name, sets in variants.items()}
    try:
        timings = run_rounds(list(built.values()), 2, args.steps, 0.0)
    finally:
        for step in built.values():
            step.close()
    rates = {name: t.rates(built[name].batch) for name, t in zip(built, timings, strict=True)}
    first = next(iter(rates.values()))
    rows = {}
    for name, rate in rates.items():
        rows[name] = {
            "batch_size": built[name].batch,
            "images_per_second": round(rate.median),
            "images_per_second_range": [round(rate.low), round(rate.high)],
            "speed_vs_first": round(rate.median / first.median, 2),
            "vs_first": verdict(rate, first),
        }
        ratio, standing = rows[name]["speed_vs_first"], rows[name]["vs_first"]
        spread = f"{rate.median:6.0f} img/s ({rate.low:.0f}-{rate.high:.0f})"
        print(f"{name:36s} {spread} {ratio:.2f}x {standing}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
