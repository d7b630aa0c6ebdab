"""Images/s of the full MoCo v3 training step, variants side by side in one process.

Usage: python benchmarks/step_throughput.py --config configs/demo.yaml [--steps 5]
       [--set key=value ...] [--precision fp32 bf16] [--device cuda]

Each variant (precision x concatenated/per-view backbone call) runs warm-up steps and then
``--steps`` timed steps of forward, momentum update, backward and AdamW on random inputs of
the preset's shape, with augmentation on the device included. Prints a table and one JSON
line. Ratios between rows are the meaningful numbers; absolute speed depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mocov3.config import load_config
from mocov3.data.augment import TwoViewAugment, sample_keys
from mocov3.engine.optim import build_optimizer
from mocov3.engine.precision import autocast_context, resolve_precision
from mocov3.models.moco import build_moco


def time_variant(config, device, precision: str, concat: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    channels = config.data.channels or 1
    model = build_moco(config, channels).to(device)
    model.concat_views = concat
    optimizer = build_optimizer(model, config.optim, device)
    augment = TwoViewAugment(
        config.augment, config.data.image_size, (0.5,) * channels, (0.25,) * channels
    )
    batch, size = config.train.batch_size, config.data.image_size
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)

    def step(index: int) -> None:
        keys = sample_keys(0, index, torch.arange(batch)).to(device)
        x1, x2 = augment(images, keys)
        with autocast_context(device, precision):
            loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index in range(warmup):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(steps):
        step(warmup + index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    rows = []
    for precision in dict.fromkeys(resolve_precision(p, device) for p in args.precision):
        for concat in (False, True):
            rate = time_variant(config, device, precision, concat, args.steps, args.warmup)
            rows.append(
                {
                    "precision": precision,
                    "concat_views": concat,
                    "images_per_second": round(rate, 1),
                }
            )
    base = rows[0]["images_per_second"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.config} batch {config.train.batch_size} on {name}")
    print(f"{'precision':>9} {'concat':>6} {'img/s':>9} {'vs first':>8}")
    for row in rows:
        row["ratio"] = round(row["images_per_second"] / base, 2)
        print(
            f"{row['precision']:>9} {row['concat_views']!s:>6} "
            f"{row['images_per_second']:>9.1f} {row['ratio']:>8.2f}"
        )
    print(json.dumps({"device": name, "config": args.config, "rows": rows}))


if __name__ == "__main__":
    main()
