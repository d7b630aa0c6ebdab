"""The index of a WebDataset tar shard: where each sample's image member lies in the file.

A shard is read by random access (:class:`mocov3.data.records.ShardRecords`), so its
headers are walked once, with stdlib ``tarfile``, and each sample's image offset, size and
``.cls`` label kept in numpy arrays. The index is looked up, in order, in a sidecar file
beside the shard (``SHARD.tar.idx.npz``, which ``mocov3 shards`` writes, so converted shards
are never scanned), then in a per-machine cache (``$MOCOV3_CACHE/shard-index``, default
``~/.cache/mocov3``, keyed by the shard's path, size and mtime), else the shard is scanned
and the cache filled. A sidecar is trusted while the shard keeps its size, so copies of a
shard set (with new mtimes) keep theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import resource
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mocov3.errors import DatasetError, one_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset("jpg jpeg png webp bmp gif tif tiff ppm pgm".split())
SIDECAR_SUFFIX = ".idx.npz"

# --------------------------------------------------------------------------- shard index

_CACHE_VERSION = 1
# WebDataset's key convention (webdataset.tariterators.base_plus_ext): the key is the path up
# to the first dot of the basename, the extension is the rest
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class ShardIndex:
    """One shard's readable samples, and the ones left out (key '' stands for the shard)."""

    members: np.ndarray  # S: the image member's name
    offsets: np.ndarray  # int64: where its data starts
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64: the .cls value, -1 without one
    drop_keys: np.ndarray  # S
    drop_why: np.ndarray  # S


def encode_names(names: list[str]) -> np.ndarray:
    """Names as one numpy bytes array (tar names may hold undecodable bytes)."""
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=bytes)


def decode_name(raw: bytes) -> str:  # the inverse of encode_names
    return raw.decode("utf-8", "surrogateescape")


def _cache_path(path: str, st: os.stat_result) -> Path:
    root = os.environ.get("MOCOV3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "mocov3"
    )
    key = f"{_CACHE_VERSION}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return Path(root).expanduser() / "shard-index" / f"{digest}.npz"


def _load_index(file: Path, shard_size: int | None = None) -> ShardIndex | None:
    """A saved index; None when missing, unreadable, or (a sidecar) for another shard size."""
    try:
        with np.load(file, allow_pickle=False) as z:
            if shard_size is not None and int(z["shard_size"]) != shard_size:
                return None
            return ShardIndex(**{name: z[name] for name in ShardIndex.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt or stale-format file is rebuilt, never fatal
        logger.debug("ignoring shard index %s: %s", file, e)
        return None


def _save_index(file: Path, index: ShardIndex, shard_size: int) -> None:
    """Write atomically (temp file + rename): ranks indexing the same shard may race."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, shard_size=np.int64(shard_size), **vars(index))
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, file)
    except OSError as e:  # a read-only home must not stop training: index again next time
        logger.warning("cannot save the shard index %s (%s): set MOCOV3_CACHE", file, e)
        tmp.unlink(missing_ok=True)


def sidecar_path(path: str) -> Path:
    return Path(path + SIDECAR_SUFFIX)


def write_sidecar(path: str) -> None:
    """Index ``path`` and save the index beside it (what the converter does per shard)."""
    size = os.stat(path).st_size
    _save_index(sidecar_path(path), _scan_shard(path, size), size)


def index_shard(path: str) -> ShardIndex:
    """The shard's index: its sidecar, else the cache when the file is unchanged since the
    cache entry was made, else a scan (which fills the cache)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DatasetError(f"cannot read shard {path}: {one_line(e)}") from e
    index = _load_index(sidecar_path(path), st.st_size)
    if index is None:
        cache = _cache_path(path, st)
        index = _load_index(cache)
        if index is None:
            try:
                index = _scan_shard(path, st.st_size)
            except OSError as e:  # unreadable (permissions, I/O): one line, not a traceback
                raise DatasetError(f"cannot read shard {path}: {one_line(e)}") from e
            _save_index(cache, index, st.st_size)
    return index


def _group(tar: tarfile.TarFile) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members with one key form a sample, as webdataset groups them. A
    ReadError past the first member (its data cut off) ends the walk."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    with contextlib.suppress(tarfile.ReadError):
        for info in tar:
            match = _KEY.match(info.name)
            if not info.isfile() or not match or info.name.rsplit("/", 1)[-1].startswith("."):
                continue  # directories, names without an extension, macOS "._x.jpg" forks
            key, ext = match.group(1), match.group(2).lower()
            if not groups or groups[-1][0] != key:
                groups.append((key, {}))
            groups[-1][1].setdefault(ext, info)
    return groups


def _open_tar(path: str, f: BinaryIO) -> tarfile.TarFile:
    if f.read(2) == b"\x1f\x8b":
        raise DatasetError(f"{path} is gzip-compressed: random access needs plain .tar; gunzip it")
    f.seek(0)
    try:
        return tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise DatasetError(
            f"{path} is not a tar file ({one_line(e)}): shards must be uncompressed .tar files"
        ) from e


def _scan_shard(path: str, file_size: int) -> ShardIndex:
    """Walk the tar headers once; keep the samples with an image member and all their data
    inside the file (a truncated copy keeps its readable part)."""
    keep: list[tuple[tarfile.TarInfo, int]] = []
    dropped: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        tar = _open_tar(path, f)
        for key, members in _group(tar):
            image = next((m for ext, m in members.items() if ext in IMAGE_EXTENSIONS), None)
            if any(m.offset_data + m.size > file_size for m in members.values()):
                dropped.append((key, "truncated: its data runs past the end of the shard"))
            elif image is None:
                dropped.append((key, f"no image member (has .{', .'.join(members)})"))
            else:
                keep.append((image, _read_label(path, f, members.get("cls"))))
        if not dropped or not dropped[-1][1].startswith("truncated"):
            if not _ends_well(f, tar.offset):
                why = f"no tar header at byte {tar.offset}: later samples lost; copy it again"
                dropped.append(("", why))
    return ShardIndex(
        encode_names([m.name for m, _ in keep]),
        np.array([m.offset_data for m, _ in keep], dtype=np.int64),
        np.array([m.size for m, _ in keep], dtype=np.int64),
        np.array([label for _, label in keep], dtype=np.int64),
        encode_names([key for key, _ in dropped]),
        encode_names([why for _, why in dropped]),
    )


def _ends_well(f: BinaryIO, offset: int) -> bool:
    """Whether the walk stopped at the tar end marker (a zero block), not at a cut or junk."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def _read_label(path: str, f: BinaryIO, info: tarfile.TarInfo | None) -> int:
    """The .cls member's class number; -1 when the sample has none."""
    if info is None:
        return -1
    f.seek(info.offset_data)
    text = f.read(min(info.size, 64)).decode("ascii", "replace").strip()
    if not text.isdigit():
        raise DatasetError(
            f"{path}:{info.name} holds {text[:20]!r}, not a class number: write each label "
            "as a decimal integer >= 0"
        )
    return int(text)


def open_file_budget() -> int:
    """Shard files one thread may keep open: a sixteenth of this process's open-file limit
    (``ulimit -n``: 64 at the common 1024, 4096 at 65536), at least 16. Random access
    touches every shard, so the more stay open, the fewer reads pay an ``open``; a
    sixteenth leaves room for the 8 threads of a reading pool and the process's other
    files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 16) if soft != resource.RLIM_INFINITY else 4096


class OpenShards:
    """The shard files open in this thread, at most ``limit`` (least recently used closed
    first; None: :func:`open_file_budget`). Per thread, because in-memory loading and the
    converter read from a thread pool, where one thread could close a file another is
    reading; a thread's files close when it ends, and a forked worker closes the ones it
    inherited and opens its own."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = open_file_budget() if limit is None else limit
        self._local = threading.local()

    def _files(self) -> OrderedDict[int, BinaryIO]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.files = os.getpid(), OrderedDict()
        return local.files

    def fd(self, shard: int, path: str) -> int:
        files = self._files()
        if shard in files:
            files.move_to_end(shard)
            return files[shard].fileno()
        while len(files) >= self.limit:
            files.popitem(last=False)[1].close()
        files[shard] = open(path, "rb", buffering=0)  # noqa: SIM115  kept open on purpose
        return files[shard].fileno()

    def close(self) -> None:
        """Close this thread's files."""
        files = self._files()
        while files:
            files.popitem()[1].close()

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}  # open files do not travel

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])  # type: ignore[misc]
