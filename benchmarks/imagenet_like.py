"""Write an ImageNet-like folder of full-size JPEGs cut from real photographs.

ImageNet's training images are JPEGs of about 500x375 (median 500x375, ~110 KB); the input
pipeline's speed depends on exactly that (entropy decoding of real photo content, chroma
upsampling, sizes to crop from), so synthetic patterns would mislead. No photo collection
can be downloaded here, but scikit-image ships ten real photographs; each becomes one class,
and every image is a random crop of it (area 10-100%, ImageNet's common sizes and aspect
ratios), randomly mirrored, with a random gamma, saved at quality 90.

    python benchmarks/imagenet_like.py --out /tmp/in-like --train 20000 --val 1000

writes OUT/train/<class>/NNNNNN.jpg and OUT/val/<class>/NNNNNN.jpg.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "grass", "gravel", "brick",
)  # fmt: skip
# (width, height) of ImageNet's most common image shapes, most frequent first
SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (500, 500), (640, 480), (333, 500))
QUALITY = 90


def _photo(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    image = Image.fromarray(pixels)
    return image.convert("RGB")


def _cut(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` at one of ImageNet's common sizes."""
    width, height = SIZES[min(int(rng.exponential(1.5)), len(SIZES) - 1)]
    aspect = width / height
    area = photo.width * photo.height * rng.uniform(0.1, 1.0)
    crop_w = min(photo.width, round(math.sqrt(area * aspect)))
    crop_h = min(photo.height, round(crop_w / aspect))
    left = int(rng.integers(0, photo.width - crop_w + 1))
    top = int(rng.integers(0, photo.height - crop_h + 1))
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gamma = rng.uniform(0.7, 1.4)
    return image.point(lambda v: round(255 * (v / 255) ** gamma))


def _write_class(job: tuple[Path, str, int, int]) -> int:
    folder, name, count, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    photo, rng = _photo(name), np.random.default_rng(seed)
    for i in range(count):
        _cut(photo, rng).save(folder / f"{i:06d}.jpg", quality=QUALITY)
    return count


def write_imagenet_like(out: Path, train: int, val: int, seed: int = 0, jobs: int = 2) -> None:
    """``train`` and ``val`` images split evenly over the ten photos' classes."""
    work = []
    for split, total, offset in (("train", train, 0), ("val", val, 1000)):
        per_class = -(-total // len(PHOTOS))
        for c, name in enumerate(PHOTOS):
            work.append((out / split / name, name, per_class, seed * 10_000 + offset + c))
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_class, work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--val", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    write_imagenet_like(args.out, args.train, args.val, args.seed, args.jobs)


if __name__ == "__main__":
    main()
