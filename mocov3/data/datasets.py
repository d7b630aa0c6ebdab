"""In-memory image datasets: Fashion-MNIST (idx files), image folders and a synthetic set.

Every loader returns an :class:`ImageDataset` holding all images as one ``uint8``
``[N, C, H, W]`` tensor, so augmentation runs on tensors without per-item file I/O.
Data problems the user can fix raise :class:`DatasetError` with a one-line message that
names the problem and the fix.

Normalisation statistics (``mean``/``std``) are in [0, 1] units. Fashion-MNIST carries its
published train statistics for both splits; folder and synthetic datasets carry the
statistics of their own images, so callers should normalise every split with the *train*
split's values.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_CLASSES",
    "DatasetError",
    "ImageDataset",
    "load_fashion_mnist",
    "load_folder",
    "load_split",
    "make_synthetic",
    "read_idx",
    "resize_images",
]


class DatasetError(RuntimeError):
    """A data problem the user can fix; message is ONE line naming the problem and the fix."""


def _one_line(text: object) -> str:
    """Collapse whitespace so third-party error text cannot break the one-line contract."""
    return " ".join(str(text).split())


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


def _check_split(split: str) -> str:
    """Normalise a split name; 'val' is an alias of 'test' (the evaluation split)."""
    s = split.strip().lower()
    if s == "val":
        return "test"
    if s not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    return s


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3 (or unset), got {channels!r}")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# --------------------------------------------------------------------------- idx files

# idx type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping it when it starts with the gzip magic (whatever its name)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {_one_line(e)}; check the path") from e
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{path} is a truncated or corrupt gzip file ({_one_line(e)}): download it again"
        ) from e


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzipped or plain) into a native-endian, writable numpy array.

    The header is two zero bytes, a type code, the number of dimensions, then one
    big-endian uint32 per dimension. Raises :class:`DatasetError` on a bad magic number or
    when the payload size disagrees with the header (truncated or corrupt file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path} is not an idx file (bad magic number 0x{data[:4].hex()}): "
            "download the dataset file again"
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DatasetError(f"{path} is truncated inside its header: download it again")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)
    expected = offset + count * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt ({len(data)} bytes, header promises {expected}): "
            "download it again"
        )
    # frombuffer avoids a per-element parse (60k images in well under a second); the copy
    # makes the array native-endian and writable, which torch.from_numpy needs.
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Train-split statistics (checked against the files in tests/data/test_datasets.py).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _find_idx(data_dir: Path, stem: str) -> Path:
    """Locate ``stem.gz`` or ``stem`` in data_dir (or torchvision's FashionMNIST/raw/)."""
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(
        f"Fashion-MNIST not found in {data_dir} (no {stem}[.gz]): install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass --data-dir DIR "
        "holding the four idx files"
    )


def load_fashion_mnist(split: str, data_dir: str | None = None) -> ImageDataset:
    """Fashion-MNIST 'train' (60k) or 'test' (10k) as uint8 ``[N, 1, 28, 28]`` images.

    Both splits carry the train statistics, the values a model is normalised with.
    """
    split = _check_split(split)
    folder = Path(data_dir or FASHION_MNIST_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"{image_path} {images.shape} and {label_path} {labels.shape} do not form a "
            "Fashion-MNIST split: download the four idx files again"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DatasetError(f"{label_path} has labels outside 0..9: download it again")
    return ImageDataset(
        images=torch.from_numpy(images.astype(np.uint8, copy=False)).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


# --------------------------------------------------------------------------- synthetic

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
    split = _check_split(split)
    _check_channels(channels)
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
    mean, std = _channel_stats(images)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(params["label"].astype(np.int64)),
        classes=SYNTHETIC_CLASSES[:num_classes],
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _is_hidden(name: str) -> bool:
    # Dot files include macOS "._x.jpg" resource forks, which are not images at all.
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    """Visible file with an image extension (case-insensitive); other files are ignored."""
    return not _is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under folder, recursively, in sorted order, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_image_name(name):
                yield Path(dirpath) / name


def _class_folders(folder: Path) -> dict[str, Path]:
    """Visible sub-folders that hold at least one image file, by sorted name."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))
    return {p.name: p for p in subdirs if next(_walk_images(p), None) is not None}


def _split_folder(root: Path, split: str) -> Path:
    """root/train or root/{val,test} when present; root itself is the train split otherwise."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist: check the folder:PATH spec")
    train = root / "train"
    evals = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if split == "train":
        if train.is_dir():
            return train
        if evals:
            raise DatasetError(
                f"{root} has {evals[0].name}/ but no train/ folder: put the training images in "
                f"{train}/"
            )
        return root
    if not evals:
        raise DatasetError(
            f"{root} has no val/ or test/ folder; kNN evaluation needs one: add {root}/val/ "
            "with the same class sub-folders as the training images"
        )
    return evals[0]


def has_test_split(spec: str) -> bool:
    """Whether ``spec`` has a labelled evaluation split (a folder needs val/ or test/)."""
    if not spec.startswith("folder:"):
        return True
    root = Path(spec.split(":", 1)[1]).expanduser()
    return any((root / name).is_dir() for name in ("val", "test"))


def _interleave(groups: list[list[Path]]) -> list[tuple[int, Path]]:
    """Round-robin over classes, so that ``subset(n)`` of folder data covers every class."""
    out: list[tuple[int, Path]] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend((label, g[i]) for label, g in enumerate(groups) if i < len(g))
    return out


def _list_folder(root: Path, split: str) -> tuple[Path, list[str], list[tuple[int, Path]]]:
    """The split folder, its class names and (label, file) items; label -1 when unlabeled."""
    folder = _split_folder(root, split)
    found = _class_folders(folder)
    if not found:  # no class sub-folders: an unlabeled folder of images
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_image_name(p.name)]
        return folder, [], [(-1, p) for p in files]
    classes = sorted(found)
    if split == "test" and (root / "train").is_dir():
        # Labels must mean the same class in both splits, or kNN accuracy is meaningless.
        classes = sorted(_class_folders(root / "train")) or classes
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(
                f"{folder} has class folders missing from {root / 'train'}: {', '.join(extra)}; "
                "give both splits the same classes"
            )
    loose = sum(1 for p in folder.iterdir() if p.is_file() and _is_image_name(p.name))
    if loose:
        logger.warning(
            "ignoring %d image(s) directly in %s, outside any class folder", loose, folder
        )
    groups = [list(_walk_images(found[c])) if c in found else [] for c in classes]
    return folder, classes, _interleave(groups)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with alpha over WHITE (how viewers show transparency) -> RGB."""
    if img.mode == "La":  # premultiplied: PIL converts it to RGBA only via LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey.

    Integers inside 0..65535 are read as 16-bit (divide by 257, so 65535 -> 255), floats
    inside [0, 1] as fractions; anything else is min-max stretched, its scale being unknown.
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    full = 1.0 if img.mode == "F" else 65535.0
    if 0.0 <= lo and hi <= full:
        scaled = arr / full
    else:
        scaled = (arr - lo) / max(hi - lo, 1e-12)
    return Image.fromarray(np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8))


def _palette_is_grey(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to 8-bit 'L' (grey) or 'RGB' (colour); alpha goes over white."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img)
    if mode == "P":
        out = _flatten_alpha(img) if "transparency" in img.info else img.convert("RGB")
        return out.convert("L") if _palette_is_grey(img) else out
    if mode in ("LA", "La"):
        return _flatten_alpha(img).convert("L")
    if "A" in mode or "a" in mode:  # RGBA, RGBa, PA
        return _flatten_alpha(img)
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear; PIL widens the filter when shrinking, i.e. it
    antialiases), then a centre crop to ``size x size``."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _decode(path: Path, size: int, mode: str | None) -> np.ndarray:
    """Decode one file to uint8 [size, size, C] with C = 1 (grey) or 3; ``mode`` forces it."""
    with Image.open(path) as img:
        # JPEG can decode at 1/2..1/8 scale; still >= size on both sides, much faster.
        img.draft(img.mode, (size, size))
        img.load()
        out = _to_l_or_rgb(ImageOps.exif_transpose(img))
    if mode is not None and out.mode != mode:
        out = out.convert(mode)
    arr = np.array(_resize_crop(out, size))  # a copy: PIL's buffer view is read-only
    return arr[:, :, None] if arr.ndim == 2 else arr


def _try_decode(path: Path, size: int, mode: str | None) -> np.ndarray | str:
    """The decoded image, or the reason it could not be read."""
    try:
        return _decode(path, size, mode)
    except Exception as e:  # noqa: BLE001  PIL plugins raise many types on corrupt input
        return f"{type(e).__name__}: {_one_line(e)}"


def _decode_all(files: list[Path], size: int, mode: str | None) -> list[np.ndarray | str]:
    """Decode in threads: PIL releases the GIL while decoding and resizing."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: _try_decode(p, size, mode), files))


def _stack(arrays: list[np.ndarray], channels: int | None) -> torch.Tensor:
    """Stack [H, W, C] arrays as [N, C, H, W]; grey images are replicated into colour sets."""
    c = channels or (3 if any(a.shape[2] == 3 for a in arrays) else 1)
    h, w = arrays[0].shape[:2]
    images = torch.empty((len(arrays), c, h, w), dtype=torch.uint8)
    for i, a in enumerate(arrays):
        images[i] = torch.from_numpy(a).permute(2, 0, 1)  # broadcasts 1 -> 3 channels
    return images


def list_folder_split(
    root: Path, split: str, image_size: int, channels: int | None
) -> tuple[Path, list[str], list[tuple[int, Path]]]:
    """Check the arguments every folder loader takes and list the split's (label, file)
    items: the split folder, its class names and the items (DatasetError when none)."""
    _check_channels(channels)
    if image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    folder, classes, items = _list_folder(root, _check_split(split))
    if not items:
        raise DatasetError(
            f"{folder} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))}): add images, "
            "one sub-folder per class"
        )
    return folder, classes, items


def load_folder(
    root: str | Path,
    split: str,
    image_size: int,
    channels: int | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> ImageDataset:
    """Load a folder of images into memory at ``image_size x image_size``.

    Layout: ``root/train`` and ``root/val`` (or ``root/test``) when present, otherwise
    ``root`` itself is the train split. Class sub-folders (sorted names) give labels,
    images are found recursively inside them; a folder with no sub-folders is unlabeled.
    Items are interleaved round-robin across classes so ``subset(n)`` covers every class.

    Modes: grey and 1-bit -> grey; 16-bit/32-bit -> 8-bit (see :func:`_high_depth_to_l`);
    LA/RGBA/PA and palette transparency are composited over white; palette, CMYK, YCbCr ->
    RGB (a palette of only greys stays grey). ``channels=None`` -> 3 if any image is colour,
    else 1. Unreadable files are skipped and counted (a logged warning), or with
    ``strict=True`` raise :class:`DatasetError` naming the first one.

    ``limit``: keep the first ``limit`` readable items, decoding no further than needed, so
    that a small subset of a huge folder (a kNN memory bank) costs seconds, not an epoch of
    decoding. Channels (when auto) and statistics then come from those items only.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1 (or unset), got {limit}")
    root = Path(root).expanduser()
    folder, classes, items = list_folder_split(root, split, image_size, channels)
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    good, bad, tried = _decode_first(items, limit or len(items), image_size, mode)
    _check_bad(bad, tried, folder, strict)
    images = _stack([r for _, _, r in good], channels)
    labels = torch.tensor([lab for lab, _, _ in good], dtype=torch.int64)
    mean, std = _channel_stats(images)
    return ImageDataset(
        images=images,
        labels=labels if classes else None,
        classes=classes,
        mean=mean,
        std=std,
        names=[p.relative_to(root).as_posix() for _, p, _ in good],
        skipped=len(bad),
    )


_Decoded = tuple[int, Path, np.ndarray]


def _decode_first(
    items: list[tuple[int, Path]], limit: int, size: int, mode: str | None
) -> tuple[list[_Decoded], list[tuple[Path, str]], int]:
    """Decode items in order until ``limit`` are readable: (good, bad, number tried).

    Decodes only the shortfall in each round, so unreadable files cost one more round each
    rather than a pass over the whole folder.
    """
    good: list[_Decoded] = []
    bad: list[tuple[Path, str]] = []
    tried = 0
    while len(good) < limit and tried < len(items):
        chunk = items[tried : tried + limit - len(good)]
        tried += len(chunk)
        for (label, path), result in zip(
            chunk, _decode_all([p for _, p in chunk], size, mode), strict=True
        ):
            if isinstance(result, str):
                bad.append((path, result))
            else:
                good.append((label, path, result))
    return good, bad, tried


def _check_bad(bad: list[tuple[Path, str]], total: int, folder: Path, strict: bool) -> None:
    """Raise for unreadable files under ``strict`` or when nothing is left, else warn."""
    if not bad:
        return
    first = f"{bad[0][0]} ({bad[0][1]})"
    if strict:
        raise DatasetError(
            f"cannot read image {first}: fix or delete it, or load without strict to skip "
            "unreadable files"
        )
    if len(bad) == total:
        raise DatasetError(
            f"none of the {total} image files in {folder} could be read (first: {first}): "
            "check the files"
        )
    logger.warning("skipped %d unreadable image file(s) in %s (first: %s)", len(bad), folder, first)


# --------------------------------------------------------------------------- entry point

_SPECS = "fashion-mnist, folder:PATH, synthetic"


def _adapt_fashion(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    """Resize Fashion-MNIST and/or replicate its grey channel to RGB, as the model needs."""
    images = ds.images
    if image_size is not None and image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    if image_size is not None and image_size != images.shape[-1]:
        images = resize_images(images, image_size)
    mean, std = ds.mean, ds.std
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
        mean, std = mean * 3, std * 3
    if images is ds.images:
        return ds
    return ImageDataset(images, ds.labels, ds.classes, mean, std, ds.names, ds.skipped)


def load_split(
    spec: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    synthetic_size: int = 2048,
    seed: int = 0,
    strict: bool = False,
    subset: int | None = None,
) -> ImageDataset:
    """Load one split of the dataset named by ``spec``: fashion-mnist | folder:PATH | synthetic.

    ``image_size`` None keeps 28 for Fashion-MNIST and means 224 for folders, 32 for
    synthetic data. Synthetic splits hold ``synthetic_size`` (train) and
    ``max(512, synthetic_size // 4)`` (test) images. ``subset`` keeps the first N items;
    for Fashion-MNIST it is taken *before* resizing, because all 60k images at 224 px RGB
    are 9 GB and take tens of seconds to resize; for folders only the first N readable files
    are decoded (statistics are then theirs), because a streamed folder may be far too large
    to decode whole just to take a kNN subset of it.
    """
    split = _check_split(split)
    _check_channels(channels)
    if subset is not None and subset < 1:
        raise DatasetError(f"subset must be >= 1 (or unset), got {subset}")
    name = spec.strip()
    kind = name.lower()
    if kind == "fashion-mnist":
        ds = load_fashion_mnist(split, data_dir)
        return _adapt_fashion(ds if subset is None else ds.subset(subset), image_size, channels)
    if kind.startswith("folder:"):
        path = name[len("folder:") :].strip()
        if not path:
            raise DatasetError("dataset spec 'folder:' has no path: write folder:PATH")
        # decode only the first ``subset`` readable files, not the whole folder
        return load_folder(path, split, image_size or 224, channels, strict, limit=subset)
    if kind == "synthetic":
        n = synthetic_size if split == "train" else max(512, synthetic_size // 4)
        ds = make_synthetic(split, n, image_size or 32, channels or 1, seed)
    else:
        raise DatasetError(f"unknown dataset {spec!r}: use one of {_SPECS}")
    return ds if subset is None else ds.subset(subset)
