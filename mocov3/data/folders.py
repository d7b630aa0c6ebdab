"""Image folders: which files a ``folder:PATH`` dataset holds, with which labels.

Layout: ``root/train`` and ``root/val`` (or ``root/test``) when present, otherwise ``root``
itself is the train split. Class sub-folders (sorted names) give labels, images are found
recursively inside them (hidden entries skipped); a folder without sub-folders is
unlabelled. Items are interleaved round-robin across classes, so that the first N items of
a folder cover every class. The in-memory and the streamed paths list a folder here, so an
index names the same file in both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mocov3.errors import DatasetError

logger = logging.getLogger(__name__)


def check_split(split: str) -> str:
    """Normalise a split name; 'val' is an alias of 'test' (the evaluation split)."""
    s = split.strip().lower()
    if s == "val":
        return "test"
    if s not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    return s


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _is_hidden(name: str) -> bool:
    # Dot files include macOS "._x.jpg" resource forks, which are not images at all.
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    """Visible file with an image extension (case-insensitive); other files are ignored."""
    return not _is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files under folder, recursively, in sorted order, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_image_name(name):
                yield Path(dirpath) / name


def _class_folders(folder: Path) -> dict[str, Path]:
    """Visible sub-folders that hold at least one image file, by sorted name."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))
    return {p.name: p for p in subdirs if next(walk_images(p), None) is not None}


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


def folder_has_test_split(spec: str) -> bool:
    """Whether ``spec`` has a labelled evaluation split (a folder needs val/ or test/;
    Fashion-MNIST and synthetic data always have one). Shards and Hugging Face datasets:
    :func:`mocov3.data.records.has_test_split`."""
    root = folder_root(spec)
    if root is None:
        return True
    return any((Path(root).expanduser() / name).is_dir() for name in ("val", "test"))


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
    groups = [list(walk_images(found[c])) if c in found else [] for c in classes]
    return folder, classes, _interleave(groups)


def list_folder_split(
    root: Path, split: str, image_size: int, channels: int | None
) -> tuple[Path, list[str], list[tuple[int, Path]]]:
    """Check the arguments every folder loader takes and list the split's (label, file)
    items: the split folder, its class names and the items (DatasetError when none)."""
    check_channels(channels)
    if image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    folder, classes, items = _list_folder(root, check_split(split))
    if not items:
        raise DatasetError(
            f"{folder} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))}): add images, "
            "one sub-folder per class"
        )
    return folder, classes, items


def check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3 (or unset), got {channels!r}")


def folder_root(spec: str) -> str | None:
    """The PATH of a ``folder:PATH`` dataset spec; None for other datasets."""
    name = spec.strip()
    if not name.lower().startswith("folder:"):
        return None
    path = name[len("folder:") :].strip()
    if not path:
        raise DatasetError("dataset spec 'folder:' has no path: write folder:PATH")
    return path
