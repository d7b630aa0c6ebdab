"""Checkpoint files: atomic writes, ``weights_only`` loads, and every RNG's state.

Every file appears by an atomic rename (temporary file in the same directory, fsync,
rename, fsync of the directory): a crash or ``kill -9`` at any moment leaves the old file or
the new one, plus at worst a hidden ``.NAME.*.tmp`` that loading ignores. Loads never run
pickled code (``weights_only=True``). Which files a run directory keeps, and which one a
resume picks, is :mod:`mocov3.train.run_dir`'s business.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocov3.errors import CheckpointError

LATEST = "checkpoint.pt"  # a run directory's newest checkpoint


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_error(path: Path, error: OSError) -> CheckpointError:
    reason = error.strerror or type(error).__name__
    name = errno.errorcode.get(error.errno or 0, "")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space there or choose another --out"
    elif error.errno == errno.EFBIG:
        hint = "raise the file-size limit (ulimit -f) or choose another --out"
    else:
        hint = "check that the run directory is writable and its disk healthy"
    return CheckpointError(
        f"cannot write checkpoint {path} ({reason}{', ' + name if name else ''}): {hint}; "
        "the previous checkpoint is intact"
    )


class _WriteRecorder:
    """A file wrapper for ``torch.save`` that keeps the OSError of a failed write (torch's
    writer replaces it with an internal message)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.stream.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash at any
    point leaves either the old checkpoint or the new one, never a partial file. A failed
    write (full disk, quota, I/O error) raises :class:`CheckpointError` and removes the
    temporary file; the file at ``path`` is then untouched."""
    path = Path(path)
    tmp_name, recorder = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            recorder = _WriteRecorder(stream)
            torch.save(state, recorder)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_directory(path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    except RuntimeError as error:  # torch.save's zip writer reports a failed write its own way
        if recorder is not None and recorder.error is not None:
            raise _write_error(path, recorder.error) from None
        raise CheckpointError(
            f"cannot write checkpoint {path} ({_first_line(error)}): if the disk is full, free "
            "space there or choose another --out; the previous checkpoint is intact"
        ) from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file (config.yaml, metrics.jsonl, summary.json) atomically."""
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def link_atomically(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` by an atomic rename of a hard link (a
    copy, fsynced, where the filesystem has no hard links)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with tmp.open("rb+") as stream:
                os.fsync(stream.fileno())
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except OSError as error:
        raise _write_error(target, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only,
    never code. Whatever goes wrong becomes one :class:`CheckpointError` line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch names the refused global on a line of its own; show that one
        named = [line for line in lines if "global" in line.lower()]
        reason = (named or lines or ["unsupported content"])[0]
        raise CheckpointError(
            f"refused to load {path}: it holds objects a weights-only load does not allow "
            f"({reason[:160]}); nothing in it was run; only load checkpoints from sources "
            "you trust"
        ) from None
    except Exception as error:  # noqa: BLE001
        # damaged bytes reach torch's legacy unpickler, which fails with whatever its opcode
        # stumbles on (RuntimeError, EOFError, IndexError, KeyError, ...): all mean unreadable
        raise CheckpointError(
            f"checkpoint {path} is unreadable or truncated ({_first_line(error)})"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A mocov3 checkpoint (a file, or a run directory's latest), loaded weights-only."""
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (pass DIR/checkpoint.pt of a run)")
    state = load_weights_only(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a mocov3 checkpoint (no 'model'/'config' entries)")
    return state


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG state (Python, NumPy, torch CPU, each CUDA device) as tensors and plain
    numbers, so that a ``weights_only`` load can read it back."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        # a CPU run on a machine with a GPU never initialises CUDA, so has no state there
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA devices present on both sides)."""
    py = state["python"]
    words = tuple(int(w) for w in py["state"].tolist())
    random.setstate((py["version"], words, py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available():
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[device], device)


def resume_file(resume: str | Path | None, default: Path) -> Path | None:
    """The checkpoint a ``--resume`` value names: None for no resume, ``auto`` for
    ``default`` when it exists (else None: start afresh), a directory for ``default``'s
    name in it, or a file; CheckpointError in one line when a named one is missing."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return default if default.is_file() else None
    path = Path(resume).expanduser()
    path = path / default.name if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path} (or use --resume auto)")
    return path
