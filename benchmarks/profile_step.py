"""Where the time of one MoCo v3 training step goes: torch.profiler's operator table.

Usage: python benchmarks/profile_step.py [--config configs/bench_cpu.yaml] [--batch 64]
       [--precision fp32] [--per-view] [--set KEY=VALUE ...]

Runs one warm-up step, then profiles one full step (augmentation on the device, forward of
both encoders, EMA, backward, AdamW) and prints the operators sorted by self time, plus the
share of the step in matrix products (mm/addmm/bmm/linear/attention), in element-wise and
normalisation kernels, and in the rest. The table is what a closing note quotes when a
speed target is missed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mocov3.config import load_config
from mocov3.data.augment import TwoViewAugment
from mocov3.data.counters import sample_keys
from mocov3.models.moco import build_moco
from mocov3.optim.optimizers import build_optimizer
from mocov3.runtime.precision import autocast_context

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "aten::convolution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_cpu.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--per-view", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    config = load_config(args.config, [f"train.batch_size={args.batch}", *args.set])
    channels = config.data.channels or 1
    torch.manual_seed(0)
    model = build_moco(config, channels)
    model.concat_views = not args.per_view
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    augment = TwoViewAugment(config.augment, config.data.image_size, (0.5,) * channels,
                             (0.25,) * channels)  # fmt: skip
    size = config.data.image_size
    images = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8)

    def step(index: int) -> None:
        x1, x2 = augment(images, sample_keys(0, index, torch.arange(args.batch)))
        with autocast_context(torch.device("cpu"), args.precision):
            loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL))
    print(f"step {wall * 1000:.0f} ms under the profiler, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; matrix products {matmul / total:.0%} "
          f"of operator self time, everything else {1 - matmul / total:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
