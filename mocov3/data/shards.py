"""Convert a dataset to WebDataset tar shards: the work behind ``mocov3 shards SOURCE --out DIR``.

Why shards: a folder of a million small files is slow to list and to read on network and
parallel file systems; a few hundred large tar files are not. Why the WebDataset layout:
it is the de-facto format for such shards (``KEY.jpg`` + ``KEY.cls`` members), readable by
other tools, and webdataset's ``ShardWriter`` is well kept, so this module writes no tar
code of its own. Reading is another matter: webdataset's readers are sequential iterators
and its indexed reader (``wids``) is not in the 1.0 release, while the trainer's sampler
needs random access for batches that do not depend on the world size and for an exact
resume; :class:`mocov3.data.records.ShardRecords` reads the shards by random access.

Sample i of the shards is sample i of the source (same order, key ``f"{i:08d}"``), and an
encoded source's image bytes are copied as they are, under their own extension: the shards
and the source read alike. In-memory sources (Fashion-MNIST, synthetic) are written as PNG,
which is lossless.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocov3.data.datasets import load_split
from mocov3.data.images import ImageDataset
from mocov3.data.records import CLASS_NAMES_FILE, ImageRecords, has_test_split, open_records
from mocov3.data.tar_index import IMAGE_EXTENSIONS, write_sidecar
from mocov3.errors import DatasetError, one_line
from mocov3.runtime.progress import Progress

IN_MEMORY = ("fashion-mnist", "synthetic")
PREFIXES = {"train": "train", "test": "val"}  # split -> shard file prefix
_CHUNK = 256  # records read ahead in parallel (file systems with latency reward it)

# magic bytes -> extension, for records whose name does not say (Hugging Face bytes)
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"P5", "pgm"),
    (b"P6", "ppm"),
)


def write_shards(
    spec: str,
    out_dir: str | Path,
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    subset: int | None = None,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    synthetic_size: int = 2048,
    seed: int = 0,
) -> dict[str, Any]:
    """Write every split of ``spec`` as ``out_dir/train-000000.tar ...`` (and ``val-*.tar``
    for the test split), at most ``max_count`` samples per shard, a new shard once one holds
    ``max_bytes`` of data. ``subset`` keeps the first N samples of each split;
    ``data_dir``/``image_size``/``synthetic_size``/``seed`` go to the in-memory loaders
    (encoded sources keep their original files, so they take none of them).

    Returns ``{"source", "out_dir", "classes", "splits": {split: {"shards", "samples",
    "bytes", "pattern"}}}``, where ``pattern`` is the ``wds:`` spec that reads the split.
    """
    if max_count < 1 or max_bytes < 1:
        raise DatasetError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
    in_memory = spec.strip().lower() in IN_MEMORY
    if image_size is not None and not in_memory:
        raise DatasetError(
            f"image_size only applies to {' and '.join(IN_MEMORY)}: shards of {spec} keep "
            "the original files; resize when training (data.image_size)"
        )
    options = {"data_dir": data_dir, "image_size": image_size}
    options |= {"synthetic_size": synthetic_size, "seed": seed, "subset": subset}
    out = _prepare_out_dir(Path(out_dir))
    summary: dict[str, Any] = {"source": spec, "out_dir": str(out), "classes": [], "splits": {}}
    # members get an int mtime: webdataset's default float one costs each a 512-byte pax header
    limits = (max_count, max_bytes, int(time.time()))
    try:
        for split in _source_splits(spec):
            records = (
                _open(spec, split, options) if in_memory else open_records(spec, split, subset)
            )
            summary["classes"] = summary["classes"] or list(records.classes)
            summary["splits"][split] = _write_split(records, out, PREFIXES[split], *limits)
    except BaseException:
        _remove_shards(out)  # a rerun must not find half a conversion and refuse
        raise
    if summary["classes"]:
        (out / CLASS_NAMES_FILE).write_text("\n".join(summary["classes"]) + "\n", "utf-8")
    return summary


def _open(spec: str, split: str, options: dict[str, Any]) -> ImageRecords:
    return MemoryRecords(load_split(spec, split, **options), f"{spec}:{split}")


class MemoryRecords:
    """An in-memory split seen as encoded records: each image as PNG bytes."""

    def __init__(self, ds: ImageDataset, source: str) -> None:
        self.ds, self.source = ds, source
        self.classes, self.labels = list(ds.classes), ds.labels

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> bytes:
        return encode_png(self.ds.images[i])

    def name(self, i: int) -> str:
        return f"{self.source}[{i}]"


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 [C, H, W] image (C 1 or 3) as PNG bytes, losslessly."""
    from PIL import Image

    pixels = image.numpy()
    array = pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _source_splits(spec: str) -> list[str]:
    """The splits the source holds: train, and test when it has an evaluation split."""
    return ["train", "test"] if has_test_split(spec) else ["train"]


def _prepare_out_dir(out_dir: Path) -> Path:
    """The absolute output folder, created; refused when it already holds shards, which
    this run would mix with or overwrite."""
    out = out_dir.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file: give a folder for the shards")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing:
        raise DatasetError(
            f"{out} already holds shards ({existing[0].name}, {len(existing)} in all): write "
            "to a new or empty folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {out}: {one_line(e)}; choose another --out") from e
    return out


def _remove_shards(out: Path) -> None:
    for prefix in PREFIXES.values():
        for path in out.glob(f"{prefix}-*.tar*"):  # the shards and their index sidecars
            path.unlink(missing_ok=True)


def _write_split(
    records: ImageRecords, out: Path, prefix: str, max_count: int, max_bytes: int, stamp: int
) -> dict[str, Any]:
    """Write one split's shards in index order; the summary of what was written."""
    import webdataset

    labels = None if records.labels is None else records.labels.tolist()
    # ShardWriter formats the pattern with %, so a % in the folder name must be doubled
    pattern = str(out / prefix).replace("%", "%%") + "-%06d.tar"
    writer = webdataset.ShardWriter(
        pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=stamp
    )
    with writer, Progress(f"shards {prefix}", len(records)) as progress:
        for i, data in _read_all(records):
            sample = {"__key__": f"{i:08d}", _extension(records.name(i), data): data}
            if labels is not None:
                sample["cls"] = str(labels[i]).encode("ascii")
            writer.write(sample)
            progress.update(1)
    for shard in sorted(out.glob(f"{prefix}-*.tar")):
        write_sidecar(str(shard))  # readers then never scan these shards
    return _split_summary(out, prefix, len(records))


def _read_all(records: ImageRecords) -> Iterator[tuple[int, bytes]]:
    """Every record's bytes in index order, read a chunk at a time by a thread pool."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(records), _CHUNK):
            indices = range(start, min(start + _CHUNK, len(records)))
            yield from zip(indices, pool.map(lambda i: _read(records, i), indices), strict=True)


def _read(records: ImageRecords, i: int) -> bytes:
    try:
        return records.read(i)
    except OSError as e:
        raise DatasetError(
            f"cannot read {records.name(i)}: {one_line(e)}; fix or remove it and convert again"
        ) from e


def _extension(name: str, data: bytes) -> str:
    """The record's own extension when its name has an image one, else from its magic bytes."""
    ext = os.path.splitext(name)[1][1:].lower()
    if ext in IMAGE_EXTENSIONS:
        return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    found = next((e for magic, e in _MAGIC if data.startswith(magic)), None)
    if found is None:
        raise DatasetError(
            f"{name} is not an image this converter recognises "
            f"({'/'.join(sorted(IMAGE_EXTENSIONS))}): convert or remove it"
        )
    return found


def _split_summary(out: Path, prefix: str, samples: int) -> dict[str, Any]:
    paths = sorted(out.glob(f"{prefix}-*.tar"))
    last = len(paths) - 1
    names = f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
    return {
        "shards": len(paths),
        "samples": samples,
        "bytes": sum(p.stat().st_size for p in paths),
        "pattern": f"wds:{out / names}",
    }
