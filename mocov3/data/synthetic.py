"""A synthetic labelled image set: procedurally generated texture classes, a fast, offline
learning task for tests and quick tries (``data.name: synthetic``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from mocov3.data.folders import check_channels, check_split
from mocov3.data.images import ImageDataset, channel_stats
from mocov3.errors import DatasetError

# One texture family per class. Families are told apart by pattern *type*, not by absolute
# frequency or left/right orientation, because the MoCo augmentations (random resized crops,
# horizontal flips) change frequency and mirror orientation: a class defined by those would be
# unlearnable for a self-supervised model that is taught to ignore them.
SYNTHETIC_CLASSES = [
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "diagonal checkerboard",
    "rings",
    "spokes",
    "dots",
    "waves",
    "nested squares",
]

_TAU = 2.0 * np.pi
_Pattern = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _rot45(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (x + y) / math.sqrt(2.0), (x - y) / math.sqrt(2.0)


def _checker(u: np.ndarray, v: np.ndarray, f: np.ndarray, ph: np.ndarray) -> np.ndarray:
    # Distinct phases on the two axes so the grid is not always centred on the window.
    return np.sin(_TAU * f * u + ph) * np.sin(_TAU * f * v + 1.7 * ph)


# Each pattern maps (x, y, cycles per image, phase, random sign) to values in [-1, 1].
_PATTERNS: list[_Pattern] = [
    lambda x, y, f, ph, s: np.sin(_TAU * f * y + ph),
    lambda x, y, f, ph, s: np.sin(_TAU * f * x + ph),
    # the random sign picks 45 or 135 degrees: a flip maps one to the other, same class.
    lambda x, y, f, ph, s: np.sin(_TAU * f * (x + s * y) / math.sqrt(2.0) + ph),
    lambda x, y, f, ph, s: _checker(x, y, f, ph),
    lambda x, y, f, ph, s: _checker(*_rot45(x, y), f, ph),
    lambda x, y, f, ph, s: np.sin(_TAU * f * np.hypot(x, y) + ph),
    lambda x, y, f, ph, s: np.sin(np.round(2.0 * f) * np.arctan2(y, x) + ph),
    lambda x, y, f, ph, s: np.clip(4.0 * np.abs(_checker(x, y, f, ph)) - 2.5, -1.0, 1.0),
    lambda x, y, f, ph, s: np.sin(_TAU * f * y + 0.6 * f * np.sin(_TAU * 0.6 * f * x + ph) + ph),
    lambda x, y, f, ph, s: np.sign(np.sin(_TAU * f * np.maximum(np.abs(x), np.abs(y)) + ph)),
]


def _synthetic_params(rng: np.random.Generator, n: int, k: int, c: int) -> dict[str, np.ndarray]:
    """Per-image nuisance parameters, drawn up front so chunking cannot change the result."""
    u = rng.uniform
    p = {
        "label": rng.permutation(np.arange(n) % k),  # exactly balanced, shuffled order
        "f": u(2.5, 5.0, n),  # cycles per image
        "ph": u(0.0, _TAU, n),
        "s": rng.choice([-1.0, 1.0], n),
        "cx": u(-0.2, 0.2, n),  # position jitter of the textured window
        "cy": u(-0.2, 0.2, n),
        "sigma": u(0.2, 0.35, n),  # window size
        "contrast": u(0.4, 1.0, n),
        "bg": u(0.2, 0.6, n),  # background brightness
        "grad_angle": u(0.0, _TAU, n),  # a lighting gradient across the image
        "grad": u(-0.25, 0.25, n),
    }
    # Colour is a per-image nuisance (never class information), as colour jitter assumes.
    p["bg_c"] = p["bg"][:, None] + u(-0.1, 0.1, (n, c)) if c > 1 else p["bg"][:, None]
    p["tint"] = u(0.75, 1.0, (n, c)) if c > 1 else np.ones((n, 1))
    return p


def _col(v: np.ndarray) -> np.ndarray:
    """Per-image values [n] -> [n, 1, 1], to broadcast over pixels."""
    return v[:, None, None]


def _render_synthetic(
    p: dict[str, np.ndarray], idx: slice, size: int, c: int, rng: np.random.Generator
) -> np.ndarray:
    """Render images ``idx`` of the parameter set as uint8 [n, c, size, size]."""
    q = {key: v[idx].astype(np.float32) for key, v in p.items()}
    q["label"] = p["label"][idx]
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5)[None, None, :]
    xx, yy = coords, coords.transpose(0, 2, 1)
    x, y = xx - _col(q["cx"]), yy - _col(q["cy"])
    pattern = np.empty((len(q["label"]), size, size), dtype=np.float32)
    for k in np.unique(q["label"]):
        m = q["label"] == k
        pattern[m] = _PATTERNS[k](x[m], y[m], _col(q["f"][m]), _col(q["ph"][m]), _col(q["s"][m]))
    window = np.exp(-(x**2 + y**2) / (2.0 * _col(q["sigma"]) ** 2))
    ga = q["grad_angle"]
    light = _col(q["grad"]) * (xx * _col(np.cos(ga)) + yy * _col(np.sin(ga)))
    texture = 0.5 * _col(q["contrast"]) * pattern * window
    img = q["bg_c"][:, :, None, None] + (light + texture)[:, None] * q["tint"][:, :, None, None]
    img = img + 0.15 * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_synthetic(
    split: str,
    n: int,
    image_size: int,
    channels: int = 1,
    seed: int = 0,
    num_classes: int = 10,
) -> ImageDataset:
    """Deterministic procedurally generated texture classes (a fast, offline learning task).

    Class k is the k-th family of :data:`SYNTHETIC_CLASSES` (stripes, checkerboards, rings,
    ...) inside a soft window, with random frequency, phase, position, window size,
    contrast, brightness, lighting gradient, colour tint and pixel noise. Raw-pixel kNN
    separates the classes only partly, a small network learns them. The test split draws
    from a different seed stream than train, so the two never share images.
    """
    split = check_split(split)
    check_channels(channels)
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise DatasetError(
            f"synthetic data has 2..{len(SYNTHETIC_CLASSES)} classes, got {num_classes}: "
            "lower num_classes"
        )
    if n < 1 or image_size < 8:
        raise DatasetError(
            f"synthetic data needs n >= 1 and image_size >= 8, got n={n}, "
            f"image_size={image_size}: raise them"
        )
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    params = _synthetic_params(rng, n, num_classes, channels)
    images = torch.empty((n, channels, image_size, image_size), dtype=torch.uint8)
    step = max(1, (1 << 21) // (image_size * image_size))  # bounded float32 temporaries
    for start in range(0, n, step):
        chunk = slice(start, start + step)
        images[chunk] = torch.from_numpy(
            _render_synthetic(params, chunk, image_size, channels, rng)
        )
    mean, std = channel_stats(images)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(params["label"].astype(np.int64)),
        classes=SYNTHETIC_CLASSES[:num_classes],
        mean=mean,
        std=std,
    )
