"""A split held in memory: every image as one uint8 ``[N, C, H, W]`` tensor, with labels and
the normalisation statistics, so that augmentation runs on tensors without per-item I/O.

Statistics (``mean``/``std``) are in [0, 1] units; callers normalise every split with the
*train* split's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageDataset:
    """All images of one split in memory, with labels and normalisation statistics."""

    images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    labels: torch.Tensor | None  # int64 [N], or None when unlabeled
    classes: list[str]  # class names ([] when unlabeled)
    mean: tuple[float, ...]  # per-channel statistics in [0, 1] units
    std: tuple[float, ...]
    names: list[str] | None = None  # file names relative to the root (folder data only)
    skipped: int = 0  # unreadable files skipped while loading (folder data)

    def __post_init__(self) -> None:
        # These are programming errors (a loader built a bad dataset), hence ValueError.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        self.images = self.images.contiguous()
        n, c = self.images.shape[:2]
        if self.labels is not None:
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(self.labels.shape)}")
            self.labels = self.labels.to(torch.int64).contiguous()
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} values, got {len(self.mean)}/{len(self.std)}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.names is not None and len(self.names) != n:
            raise ValueError(f"names must have {n} entries, got {len(self.names)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of image channels (1 or 3)."""
        return int(self.images.shape[1])

    def subset(self, n: int) -> ImageDataset:
        """The first ``n`` items (all of them if ``n >= len(self)``); statistics are kept.

        Copies the slice so that a small subset does not keep the full tensor alive.
        """
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        n = min(n, len(self))
        return ImageDataset(
            images=self.images[:n].clone(),
            labels=None if self.labels is None else self.labels[:n].clone(),
            classes=list(self.classes),
            mean=self.mean,
            std=self.std,
            names=None if self.names is None else self.names[:n],
            skipped=self.skipped,
        )


# --------------------------------------------------------------------------- helpers


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in float64 and in bounded-memory chunks."""
    n, c, h, w = images.shape
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    step = max(1, (1 << 23) // (c * h * w))  # ~64 MB of float64 per chunk
    for start in range(0, n, step):
        x = images[start : start + step].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square_().sum(dim=(0, 2, 3))
    count = n * h * w
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    # A constant channel has std 0; floor it at one grey level so normalising never divides by 0.
    std = var.sqrt().clamp_min(1.0 / 255.0)
    return tuple(mean.tolist()), tuple(std.tolist())


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size x size`` (bilinear, antialiased).

    Works in chunks so that upsampling a large set never needs a full float copy.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    step = max(1, (1 << 22) // (c * max(h * w, size * size)))
    for start in range(0, n, step):
        x = images[start : start + step].to(torch.float32)
        y = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + step] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
