"""Images per second of the batched two-view augmentation on the CPU (both views, the
paper's recipe): 28x28 grey and 32x32 RGB batches, best of 5 runs of 10 batches.

    python benchmarks/augment_throughput.py [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from mocov3.config import AugmentConfig
from mocov3.data.augment import TwoViewAugment
from mocov3.data.counters import sample_keys


def images_per_second(channels: int, size: int, batch: int, repeats: int = 10) -> float:
    augment = TwoViewAugment(AugmentConfig(), size, [0.5] * channels, [0.25] * channels)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    keys = sample_keys(0, 0, torch.arange(batch))
    augment(images, keys)  # warm-up
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            augment(images, keys)
        best = max(best, batch * repeats / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    for channels, size in ((1, 28), (3, 32)):
        rate = images_per_second(channels, size, args.batch)
        print(f"{channels}x{size}x{size}: {rate:,.0f} img/s (both views, batch {args.batch})")


if __name__ == "__main__":
    main()
