"""Random access to a dataset's ENCODED images: ``folder:PATH``, ``wds:PATTERN``, ``hf:PATH``.

A record is the image file's bytes as stored, not pixels: DataLoader workers decode them.
Access is by index, not iteration, because the trainer's sampler picks every batch's items
itself (batches that do not depend on the world size, an exact resume mid-epoch).

Every implementation is cheap to pickle and fork: per-item data lives in a few numpy arrays
whose pages forked workers share, where millions of Python objects would be copied into
every worker by reference counting. Files are opened lazily, per process.

WebDataset shards are indexed once (:mod:`mocov3.data.tar_index`: each sample's image
offset and size, from a sidecar file beside the shard or a per-machine cache), and
``read(i)`` is then one ``os.pread``. webdataset's own readers are sequential iterators,
hence this reader.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mocov3.data.braces import expand_braces
from mocov3.data.decode import try_decode, unreadable_reason
from mocov3.data.folders import (
    check_split,
    folder_has_test_split,
    folder_root,
    list_folder_split,
    walk_images,
)
from mocov3.data.tar_index import IMAGE_EXTENSIONS, OpenShards, decode_name, index_shard
from mocov3.errors import DatasetError, one_line

logger = logging.getLogger(__name__)

SPEC_FORMS = "folder:PATH, wds:PATTERN or hf:PATH"
_KINDS = ("folder", "wds", "hf")


class ImageRecords(Protocol):
    """Indexed access to the encoded images of one split, with their labels."""

    source: str  # the spec, for messages
    classes: list[str]  # class names, classes[label]; [] when unlabelled
    labels: torch.Tensor | None  # int64 [N], None when unlabelled

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes:
        """The encoded image file's bytes (OSError on I/O failure)."""
        ...

    def name(self, i: int) -> str:
        """A human name for messages: a file path, or ``shard.tar:key.jpg``."""
        ...


def try_decode_record(
    records: ImageRecords, i: int, size: int, channels: int | None
) -> torch.Tensor | str:
    """Record ``i`` decoded and centre-cropped to ``size``, or why it cannot be read."""
    try:
        data = records.read(i)
    except OSError as error:
        return unreadable_reason(error)
    return try_decode(data, size, channels)


def record_spec(spec: str) -> tuple[str, str] | None:
    """(kind, rest) of an encoded-image spec: kind 'folder', 'wds' or 'hf'; None for others
    (fashion-mnist, synthetic), which live in memory."""
    kind, sep, rest = spec.strip().partition(":")
    return (kind.lower(), rest.strip()) if sep and kind.lower() in _KINDS else None


def has_test_split(spec: str) -> bool:
    """Whether ``spec`` has an evaluation split: a folder needs val/ or test/, a Hugging Face
    dataset a validation or test split; a shard pattern is one split."""
    parsed = record_spec(spec)
    if parsed is None or parsed[0] == "folder":
        return folder_has_test_split(spec)
    if parsed[0] == "wds":
        return False
    splits = Path(parsed[1]).expanduser() / "dataset_dict.json"
    try:
        names = json.loads(splits.read_text()).get("splits", []) if splits.is_file() else []
    except (OSError, ValueError, AttributeError) as e:
        raise DatasetError(f"cannot read {splits} ({one_line(e)}): save the dataset again") from e
    return any(name in names for name in _EVAL_SPLITS)


def open_records(spec: str, split: str = "train", subset: int | None = None) -> ImageRecords:
    """The encoded images of ``split`` ('train' or 'test'/'val') of the dataset ``spec``;
    ``subset`` keeps the first N."""
    text, parsed, split = spec.strip(), record_spec(spec), check_split(split)
    if parsed is None:
        raise DatasetError(f"unknown encoded-image dataset {spec!r}: use {SPEC_FORMS}")
    kind, rest = parsed
    if kind == "folder":
        return FolderRecords(folder_root(text) or "", split, subset, source=text)
    if kind == "wds":
        if split != "train":
            raise DatasetError(
                f"{text}: WebDataset shards hold one split, and evaluation does not read "
                "shards yet: evaluate on the folder or Hugging Face dataset the shards came from"
            )
        return ShardRecords(expand_shards(rest), subset, source=text)
    if not rest:
        raise DatasetError("dataset spec 'hf:' has no path: write hf:PATH (a save_to_disk dir)")
    return HFRecords(rest, split, subset, source=text)


def _check_subset(subset: int | None) -> None:
    if subset is not None and subset < 1:
        raise DatasetError(f"subset must be >= 1 (or unset), got {subset}")


CLASS_NAMES_FILE = "classes.txt"  # beside the shards: one class name per line, by class id


def _class_names(labels: np.ndarray, names_file: Path | None = None) -> list[str]:
    """Names for integer class ids: classes[label] must name that label (reports index it).
    ``names_file`` (what ``mocov3 shards`` writes) names them when it covers every id."""
    count = int(labels.max()) + 1 if len(labels) else 0
    names = (
        names_file.read_text("utf-8").splitlines() if names_file and names_file.is_file() else []
    )
    return names if count and len(names) >= count else [str(c) for c in range(count)]


# --------------------------------------------------------------------------- folders


class FolderRecords:
    """The image files of one ``folder:PATH`` split, in the package's folder order."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        subset: int | None = None,
        source: str | None = None,
    ) -> None:
        _check_subset(subset)
        self.root = Path(root).expanduser()
        self.source = source or f"folder:{root}"
        _, self.classes, items = list_folder_split(self.root, split, image_size=1, channels=None)
        items = items[:subset]
        # one numpy bytes array, not a list of Paths: forked workers share its pages
        self.paths = np.array([os.fsencode(p) for _, p in items])
        labels = torch.tensor([label for label, _ in items], dtype=torch.int64)
        self.labels: torch.Tensor | None = labels if self.classes else None

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def read(self, i: int) -> bytes:
        return self.path(i).read_bytes()

    def name(self, i: int) -> str:
        return str(self.path(i))


class FileRecords:
    """Every image file under a folder (recursively, sorted, hidden entries skipped),
    unlabelled; named by their paths relative to it (``mocov3 embed --images``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist: pass --images FOLDER")
        self.source = f"images:{self.root}"
        self.paths = np.array([os.fsencode(p) for p in walk_images(self.root)])
        if not len(self.paths):
            raise DatasetError(
                f"{self.root} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))}): "
                "check --images"
            )
        self.labels: torch.Tensor | None = None
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        return Path(os.fsdecode(self.paths[i])).read_bytes()

    def name(self, i: int) -> str:
        return Path(os.fsdecode(self.paths[i])).relative_to(self.root).as_posix()


# --------------------------------------------------------------------------- shard patterns


def expand_shards(pattern: str) -> list[str]:
    """The shard files of a ``wds:`` pattern: a directory (its ``*.tar``), brace ranges such
    as ``train-{000000..000099}.tar`` and/or shell globs, in the order the pattern lists them."""
    text = pattern.strip()
    if not text:
        raise DatasetError(
            "dataset spec 'wds:' has no pattern: write wds:DIR or "
            "wds:/data/train-{000000..000099}.tar"
        )
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return _directory_shards(path)
    names = expand_braces(path)
    found: list[str] = []
    missing: list[str] = []
    for name in names:
        if glob.has_magic(name):
            found.extend(sorted(p for p in glob.glob(name) if os.path.isfile(p)))
        elif os.path.isfile(name):
            found.append(name)
        else:
            missing.append(name)
    if not found:
        raise DatasetError(f"wds pattern {text!r} matches no file: check the path and the range")
    if missing:
        raise DatasetError(
            f"shard {missing[0]} does not exist ({len(missing)} of {len(names)} listed by "
            f"{text!r} are missing): fix the pattern's range or restore the file"
        )
    return found


def _directory_shards(path: str) -> list[str]:
    """A directory's ``*.tar``, sorted; only ``train-*.tar`` when it also holds other shards
    (the converter's layout), so that evaluation shards never leak into training."""
    shards = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    if not shards:
        raise DatasetError(f"{path} holds no .tar shards: check the path or pass wds:PATTERN")
    train = [p for p in shards if os.path.basename(p).startswith("train-")]
    if train and len(train) < len(shards):
        logger.info("%s: reading its %d train-*.tar shards", path, len(train))
        return train
    return shards


# --------------------------------------------------------------------------- shards


class ShardRecords:
    """The image samples of WebDataset-format tar shards, read by random access.

    Order: the shards as listed, then member order. A sample is the run of members sharing
    a key; its first member with an image extension is the image, a ``.cls`` member holds
    its label. Unreadable samples (truncated, or with no image) are left out and listed in
    :attr:`dropped` as (name, reason).
    """

    def __init__(
        self, urls: list[str], subset: int | None = None, source: str | None = None
    ) -> None:
        _check_subset(subset)
        if not urls:
            raise DatasetError("no shards given: pass wds:DIR or wds:PATTERN")
        self.urls = list(urls)
        self.source = source or f"wds:{urls[0]}"
        with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
            indexes = list(pool.map(index_shard, self.urls))
        self.dropped = [
            (f"{url}:{decode_name(key)}" if key else url, decode_name(why))
            for url, index in zip(self.urls, indexes, strict=True)
            for key, why in zip(index.drop_keys, index.drop_why, strict=True)
        ]
        counts = [len(index.offsets) for index in indexes]
        self._shard = np.repeat(np.arange(len(urls), dtype=np.int32), counts)
        self._member = np.concatenate([index.members for index in indexes])
        self._offset = np.concatenate([index.offsets for index in indexes])
        self._size = np.concatenate([index.sizes for index in indexes])
        self._check_found()
        labels, self.classes = self._labels(np.concatenate([index.labels for index in indexes]))
        if subset is not None:
            self._shard, self._member = self._shard[:subset], self._member[:subset]
            self._offset, self._size = self._offset[:subset], self._size[:subset]
            labels = None if labels is None else labels[:subset].copy()
        self.labels = None if labels is None else torch.from_numpy(labels)
        self._handles = OpenShards()
        if self.dropped:
            logger.warning("%s: left out %s; see .dropped", self.source, self._dropped_note())

    def _dropped_note(self) -> str:
        name, why = self.dropped[0]
        return f"{len(self.dropped)} unreadable sample(s), first {name}: {why}"

    def _check_found(self) -> None:
        if not len(self._offset):
            detail = f" ({self._dropped_note()})" if self.dropped else ""
            raise DatasetError(
                f"{self.source} holds no image members{detail}: shards need KEY.jpg (or "
                f"{'/'.join(sorted(IMAGE_EXTENSIONS - {'jpg'}))}) members, KEY.cls for labels"
            )

    def _labels(self, labels: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
        """Labels when every sample has a .cls member, None when none has."""
        missing = np.flatnonzero(labels < 0)
        if len(missing) == len(labels):
            return None, []
        if len(missing):
            raise DatasetError(
                f"{self.source}: {len(missing)} of {len(labels)} samples have no .cls label "
                f"(first {self.name(int(missing[0]))}): label every sample or none"
            )
        return labels, _class_names(labels, Path(self.urls[0]).parent / CLASS_NAMES_FILE)

    def __len__(self) -> int:
        return len(self._offset)

    def read(self, i: int) -> bytes:
        shard, offset, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        fd = self._handles.fd(shard, self.urls[shard])
        chunks: list[bytes] = []
        while size > 0:  # pread may return less than asked for (huge reads, signals)
            chunk = os.pread(fd, size, offset)
            if not chunk:
                raise OSError(f"{self.name(i)}: shard shorter than its index; was it rewritten?")
            chunks.append(chunk)
            offset, size = offset + len(chunk), size - len(chunk)
        return b"".join(chunks)

    def name(self, i: int) -> str:
        return f"{self.urls[int(self._shard[i])]}:{decode_name(self._member[i])}"

    def close(self) -> None:
        """Close this process's shard files (they also close when the process ends)."""
        self._handles.close()


# --------------------------------------------------------------------------- Hugging Face


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(
            "hf: datasets need the Hugging Face datasets package: pip install 'mocov3[hf]'"
        ) from e
    return datasets


class HFRecords:
    """One split of a Hugging Face dataset saved with ``save_to_disk``; its image column is
    read undecoded, so ``read`` returns the stored file bytes. Arrow tables are memory-mapped
    (memory stays bounded) and pickle by file path."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        subset: int | None = None,
        source: str | None = None,
    ) -> None:
        _check_subset(subset)
        datasets = _import_datasets()
        self.path = Path(path).expanduser()
        self.source = source or f"hf:{path}"
        self.split = check_split(split)
        ds, self.split_name = self._pick_split(_load_hf(datasets, self.path, self.source))
        self.image_column = self._image_column(datasets, ds)
        labels, self.classes = self._labels(datasets, ds)
        self._n = len(ds) if subset is None else min(subset, len(ds))
        self.labels = None if labels is None else torch.from_numpy(labels[: self._n].copy())
        column = ds.select_columns([self.image_column])
        if isinstance(ds.features[self.image_column], datasets.Image):
            column = column.cast_column(self.image_column, datasets.Image(decode=False))
        self._ds = column

    def _pick_split(self, ds: Any) -> tuple[Any, str]:
        if not isinstance(ds, dict):  # a DatasetDict is a dict; a plain Dataset is train
            if self.split == "test":
                raise DatasetError(
                    f"{self.source} is a single Dataset (the train split): save a DatasetDict "
                    "with a 'validation' or 'test' split for evaluation"
                )
            return ds, "train"
        wanted = ("train",) if self.split == "train" else _EVAL_SPLITS
        for name in wanted:
            if name in ds:
                return ds[name], name
        raise DatasetError(
            f"{self.source} has splits {', '.join(ds)} but no {' or '.join(wanted)}: "
            "save the DatasetDict with that split"
        )

    def _image_column(self, datasets: Any, ds: Any) -> str:
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                return name
        for name in ("image", "img"):
            feature = ds.features.get(name)
            if isinstance(feature, datasets.Value) and feature.dtype in _PATH_OR_BYTES:
                return name
        raise DatasetError(
            f"{self.source} has no image column (columns: {', '.join(ds.column_names)}): add "
            "a column of feature datasets.Image(), or one named 'image' of file paths or bytes"
        )

    def _labels(self, datasets: Any, ds: Any) -> tuple[np.ndarray | None, list[str]]:
        """The first ClassLabel column, else an integer 'label'/'labels' column."""
        features = ds.features
        found = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        found += [n for n in ("label", "labels") if "int" in getattr(features.get(n), "dtype", "")]
        if not found:
            return None, []
        column, names = found[0], getattr(features[found[0]], "names", None)
        labels = np.asarray(ds.with_format("arrow")[column].to_numpy(), dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise DatasetError(
                f"{self.source}: {int((labels < 0).sum())} rows of column {column!r} have no "
                "label (-1): label every row, or drop the column for unlabelled data"
            )
        return labels, names if names is not None else _class_names(labels)

    def __len__(self) -> int:
        return self._n

    def _value(self, i: int) -> Any:
        if not 0 <= i < self._n:
            raise IndexError(f"record {i} out of range for {self._n} records")
        return self._ds[i][self.image_column]

    def read(self, i: int) -> bytes:
        value = self._value(i)
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if not value:
            raise OSError(f"{self.name(i)} has neither image bytes nor a path")
        path = Path(value)
        if not path.is_absolute() and not path.exists():
            path = self.path / path  # a path stored relative to the dataset
        return path.read_bytes()

    def name(self, i: int) -> str:
        value = self._value(i)
        stored = value.get("path") if isinstance(value, dict) else value
        where = f"{self.source}[{self.split_name}][{i}]"
        return f"{where} ({stored})" if isinstance(stored, str) and stored else where


_EVAL_SPLITS = ("validation", "test")  # a Hugging Face dataset's evaluation split names
_PATH_OR_BYTES = ("string", "large_string", "binary", "large_binary")


def _load_hf(datasets: Any, path: Path, source: str) -> Any:
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise DatasetError(
            f"{source}: {path} is not a saved Hugging Face dataset ({one_line(e)}): save one "
            "with Dataset.save_to_disk(PATH)"
        ) from e
    except Exception as e:  # corrupt arrow files etc.: one line, not a deep traceback
        raise DatasetError(f"{source}: cannot load {path}: {one_line(e)}") from e
