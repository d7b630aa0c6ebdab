"""In-memory datasets: Fashion-MNIST (idx files), image folders and the synthetic set, by
their ``data.name`` spec.

Every loader returns an :class:`~mocov3.data.images.ImageDataset`. Data problems the user
can fix raise :class:`DatasetError` with a one-line message that names the problem and the
fix. Fashion-MNIST carries its published train statistics for both splits; folder and
synthetic datasets carry the statistics of their own images.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from mocov3.data.decode import one_thread, try_decode
from mocov3.data.folders import (
    IMAGE_EXTENSIONS,
    check_channels,
    check_split,
    folder_root,
    list_folder_split,
)
from mocov3.data.images import ImageDataset, channel_stats, resize_images
from mocov3.data.records import ImageRecords, open_records, record_spec, try_decode_record
from mocov3.data.synthetic import make_synthetic
from mocov3.errors import DatasetError, one_line
from mocov3.runtime.distributed import barrier, is_main_process

logger = logging.getLogger(__name__)


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
        raise DatasetError(f"cannot read {path}: {one_line(e)}; check the path") from e
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{path} is a truncated or corrupt gzip file ({one_line(e)}): download it again"
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

# where the files are looked for, in order, when neither data.data_dir nor --data-dir names a
# folder: $FASHION_MNIST_DIR, the Debian package's folder, the download cache
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FASHION_MNIST_DIR"
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


def fashion_mnist_cache() -> Path:
    """Where ``data.download`` puts the files: ``$XDG_CACHE_HOME/mocov3/fashion-mnist``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mocov3" / "fashion-mnist"


def fashion_mnist_folders(data_dir: str | None) -> list[Path]:
    """The folders searched for the idx files, the last also where ``data.download`` puts
    them: ``data_dir`` alone when given, else ``$FASHION_MNIST_DIR`` alone when set, else
    the Debian package's folder and the download cache."""
    named = data_dir or os.environ.get(FASHION_MNIST_ENV)
    if named:
        return [Path(named).expanduser()]
    return [Path(FASHION_MNIST_DIR), fashion_mnist_cache()]


def _idx_in(folder: Path, stem: str) -> Path | None:
    """``stem.gz`` or ``stem`` in ``folder`` or in torchvision's ``FashionMNIST/raw/``."""
    for where in (folder, folder / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (where / name).is_file():
                return where / name
    return None


def _split_in(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    """A split's images and labels, both from ``folder``."""
    images = _idx_in(folder, f"{prefix}-images-idx3-ubyte")
    labels = _idx_in(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def download_fashion_mnist(folder: Path) -> None:
    """torchvision's Fashion-MNIST download into ``folder`` (needs the network): the
    fallback where the Debian package is not available. Under torchrun the main process
    downloads and the others wait for it."""
    from torchvision.datasets import FashionMNIST

    if is_main_process():
        try:
            for train in (True, False):
                FashionMNIST(str(folder), train=train, download=True)
        except (OSError, RuntimeError) as error:
            raise DatasetError(
                f"downloading Fashion-MNIST into {folder} failed ({one_line(error)}); install "
                "it with `sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR"
            ) from None
    barrier()


def _find_split(folders: list[Path], prefix: str, download: bool) -> tuple[Path, Path]:
    for folder in folders:
        if (found := _split_in(folder, prefix)) is not None:
            return found
    if download:
        download_fashion_mnist(folders[-1])
        if (found := _split_in(folders[-1], prefix)) is not None:
            return found
    raise DatasetError(
        f"Fashion-MNIST not found (no {prefix}-images/labels idx files in "
        f"{', '.join(map(str, folders))}): install it with `sudo apt-get install "
        f"dataset-fashion-mnist` (Debian/Ubuntu), pass --data-dir DIR or set "
        f"{FASHION_MNIST_ENV} to a folder holding the four idx files, or download it with "
        "torchvision (network): --set data.download=true"
    )


def load_fashion_mnist(
    split: str, data_dir: str | None = None, download: bool = False
) -> ImageDataset:
    """Fashion-MNIST 'train' (60k) or 'test' (10k) as uint8 ``[N, 1, 28, 28]`` images,
    from the first of :func:`fashion_mnist_folders` holding them; ``download``: fetch them
    with torchvision into the last when none does.

    Both splits carry the train statistics, the values a model is normalised with.
    """
    split = check_split(split)
    prefix = "train" if split == "train" else "t10k"
    image_path, label_path = _find_split(fashion_mnist_folders(data_dir), prefix, download)
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


# --------------------------------------------------------------------------- image folders


def load_folder(
    root: str | Path,
    split: str,
    image_size: int,
    channels: int | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> ImageDataset:
    """Load a folder split into memory at ``image_size x image_size``.

    The layout, labels and order are :mod:`mocov3.data.folders`'; each file is decoded by
    :func:`mocov3.data.decode.decode_image`. ``channels=None`` -> 3 if any image is colour,
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
    return _load_items(root, folder, classes, items, image_size, channels, strict, limit)


def load_image_files(
    root: Path, files: list[Path], image_size: int, channels: int | None = None
) -> ImageDataset:
    """The given image files under ``root`` as an unlabelled set named relative to it
    (what ``mocov3 embed --images`` reads); unreadable files are skipped and counted."""
    if not files:
        raise DatasetError(f"{root} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
    items = [(-1, path) for path in files]
    return _load_items(root, root, [], items, image_size, channels, False, None)


def _load_items(
    root: Path,
    folder: Path,
    classes: list[str],
    items: list[tuple[int, Path]],
    image_size: int,
    channels: int | None,
    strict: bool,
    limit: int | None,
) -> ImageDataset:
    def decode(paths: list[Path]) -> list[torch.Tensor | str]:
        return _decode_all([lambda p=p: try_decode(p, image_size, channels) for p in paths])

    good, bad, tried = _decode_first(items, limit or len(items), decode)
    _check_bad(bad, tried, str(folder), strict)
    names = [path.relative_to(root).as_posix() for _, path, _ in good]
    return _dataset(good, classes, channels, names, len(bad))


def load_records(
    records: ImageRecords,
    image_size: int,
    channels: int | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> ImageDataset:
    """A ``wds:`` or ``hf:`` split (:mod:`mocov3.data.records`) in memory, decoded and
    centre-cropped as :func:`load_folder` decodes a folder, with the same ``limit``,
    ``strict`` and skipping rules."""
    if image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    labels = records.labels.tolist() if records.labels is not None else [-1] * len(records)
    pairs = [(label, i) for i, label in enumerate(labels)]

    def decode(indices: list[int]) -> list[torch.Tensor | str]:
        return _decode_all(
            [lambda i=i: try_decode_record(records, i, image_size, channels) for i in indices]
        )

    good, bad, tried = _decode_first(pairs, limit or len(pairs), decode)
    named_bad = [(records.name(i), reason) for i, reason in bad]
    _check_bad(named_bad, tried, records.source, strict)
    names = [records.name(i) for _, i, _ in good]
    return _dataset(good, records.classes, channels, names, len(bad))


def _dataset(
    good: list[tuple[int, object, torch.Tensor]],
    classes: list[str],
    channels: int | None,
    names: list[str],
    skipped: int,
) -> ImageDataset:
    images = _stack([image for _, _, image in good], channels)
    labels = torch.tensor([label for label, _, _ in good], dtype=torch.int64)
    mean, std = channel_stats(images)
    return ImageDataset(
        images=images,
        labels=labels if classes else None,
        classes=classes,
        mean=mean,
        std=std,
        names=names,
        skipped=skipped,
    )


def _decode_all(jobs: list[Callable[[], torch.Tensor | str]]) -> list[torch.Tensor | str]:
    """Decode in threads (the decoders release the GIL), one intra-op thread each."""
    workers = min(8, os.cpu_count() or 1)
    with one_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def _stack(images: list[torch.Tensor], channels: int | None) -> torch.Tensor:
    """Stack ``[C, S, S]`` images as ``[N, C, S, S]``; grey images are replicated into
    colour sets."""
    c = channels or (3 if any(image.shape[0] == 3 for image in images) else 1)
    h, w = images[0].shape[1:]
    out = torch.empty((len(images), c, h, w), dtype=torch.uint8)
    for i, image in enumerate(images):
        out[i] = image  # broadcasts 1 -> 3 channels
    return out


Item = TypeVar("Item")


def _decode_first(
    items: list[tuple[int, Item]],
    limit: int,
    decode: Callable[[list[Item]], list[torch.Tensor | str]],
) -> tuple[list[tuple[int, Item, torch.Tensor]], list[tuple[Item, str]], int]:
    """Decode (label, item) pairs in order until ``limit`` are readable: (good, bad, number
    tried).

    Decodes only the shortfall in each round, so unreadable files cost one more round each
    rather than a pass over the whole folder.
    """
    good: list[tuple[int, Item, torch.Tensor]] = []
    bad: list[tuple[Item, str]] = []
    tried = 0
    while len(good) < limit and tried < len(items):
        chunk = items[tried : tried + limit - len(good)]
        tried += len(chunk)
        for (label, item), result in zip(chunk, decode([x for _, x in chunk]), strict=True):
            if isinstance(result, str):
                bad.append((item, result))
            else:
                good.append((label, item, result))
    return good, bad, tried


def _check_bad(bad: list[tuple[object, str]], total: int, folder: str, strict: bool) -> None:
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

_SPECS = "fashion-mnist, folder:PATH, wds:PATTERN, hf:PATH, synthetic"


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
    download: bool = False,
) -> ImageDataset:
    """Load one split of the dataset named by ``spec`` into memory: fashion-mnist |
    folder:PATH | wds:PATTERN | hf:PATH | synthetic.

    ``image_size`` None keeps 28 for Fashion-MNIST and means 224 for folders, shards and
    Hugging Face datasets, 32 for synthetic data. Synthetic splits hold ``synthetic_size``
    (train) and ``max(512, synthetic_size // 4)`` (test) images. ``subset`` keeps the first
    N items; for Fashion-MNIST it is taken *before* resizing, because all 60k images at 224
    px RGB are 9 GB and take tens of seconds to resize; for folders only the first N
    readable files are decoded (statistics are then theirs), because a streamed folder may
    be far too large to decode whole just to take a kNN subset of it; for shards and Hugging
    Face datasets it is the first N records, unreadable ones left out.
    """
    split = check_split(split)
    check_channels(channels)
    if subset is not None and subset < 1:
        raise DatasetError(f"subset must be >= 1 (or unset), got {subset}")
    name = spec.strip()
    kind = name.lower()
    if kind == "fashion-mnist":
        ds = load_fashion_mnist(split, data_dir, download)
        return _adapt_fashion(ds if subset is None else ds.subset(subset), image_size, channels)
    if (path := folder_root(name)) is not None:
        # decode only the first ``subset`` readable files, not the whole folder
        return load_folder(path, split, image_size or 224, channels, strict, limit=subset)
    if record_spec(name) is not None:
        records = open_records(name, split, subset)
        return load_records(records, image_size or 224, channels, strict)
    if kind == "synthetic":
        n = synthetic_size if split == "train" else max(512, synthetic_size // 4)
        ds = make_synthetic(split, n, image_size or 32, channels or 1, seed)
    else:
        raise DatasetError(f"unknown dataset {spec!r}: use one of {_SPECS}")
    return ds if subset is None else ds.subset(subset)


def default_channels(spec: str) -> int:
    """The channels training on ``spec`` uses when ``data.channels`` is unset, before any
    file is read: 1 for Fashion-MNIST and synthetic data, 3 for image folders (a folder of
    only grey images is read as 1 once decoded)."""
    return 1 if spec.strip().lower() in ("fashion-mnist", "synthetic") else 3
