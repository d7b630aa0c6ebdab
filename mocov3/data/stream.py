"""Streaming input pipeline for image folders too large to decode into memory.

In-memory datasets (:mod:`mocov3.data.datasets`) hold every image as one uint8 tensor and
augment batches on the training device. A streamed folder keeps the second half of that
design and replaces the first: DataLoader worker processes decode each batch's files with
the one decoder (:func:`~mocov3.data.decode.decode_image`: fixed-size uint8 ``[C, S, S]``,
shorter side resized to ``S`` with antialiasing, centre crop), the main process copies the
stacked batch to the device (pinned memory and a non-blocking copy on CUDA), and the same
batched augmentation runs on it. Index ``i`` names the same file as item ``i`` of
:func:`~mocov3.data.datasets.load_folder` (same listing, same class interleaving), so
sampling and augmentation keys agree between the two paths as long as every file is
readable (the in-memory path drops unreadable files, which shifts its later indices).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from mocov3.config import Config
from mocov3.data.decode import one_thread, palette_is_grey, try_decode
from mocov3.data.folders import check_split, folder_root, list_folder_split
from mocov3.data.sampling import StepSampler
from mocov3.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

STATS_SAMPLE = 1000  # images decoded to estimate channels and normalisation statistics
# 12 workers decode thousands of 224-px JPEGs/s (2-4 ms each), more than one GPU's MoCo step
# consumes; more workers would only cost memory
MAX_WORKERS = 12
_SUBSTITUTE_TRIES = 64  # consecutive unreadable files tolerated before giving up
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


# --------------------------------------------------------------------------- the index


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``min(n, k)`` distinct indices from a fixed seed, sorted (files read in listing order)."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def _header_is_colour(path: Path) -> bool | None:
    """Whether the in-memory path would decode ``path`` as colour, from its header alone
    (palette images excepted); None when the file cannot be opened."""
    try:
        with Image.open(path) as img:
            if img.mode in _GREY_MODES or img.mode.startswith("I;"):
                return False
            if img.mode == "P":
                return not palette_is_grey(img)
            return True
    except Exception:  # noqa: BLE001  PIL plugins raise many types on corrupt input
        return None


class FolderIndex:
    """The files and labels of one folder split, listed but not decoded.

    Same listing, order and labels as :func:`~mocov3.data.datasets.load_folder`; ``subset``
    keeps the first N files. Paths live in one numpy bytes array rather than a list of
    Path objects: DataLoader workers forked from this process then share its pages, where
    a million Python objects would be copied into every worker by reference counting.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        channels: int | None = None,
        strict: bool = False,
        subset: int | None = None,
        stats_seed: int = 0,
    ) -> None:
        if subset is not None and subset < 1:
            raise DatasetError(f"subset must be >= 1 (or unset), got {subset}")
        self.root = Path(root).expanduser()
        self.folder, self.classes, items = list_folder_split(self.root, split, image_size, channels)
        items = items[:subset]
        self.split, self.image_size, self.strict = check_split(split), image_size, strict
        self.stats_seed = stats_seed
        self.paths = np.array([os.fsencode(p) for _, p in items])
        labels = torch.tensor([label for label, _ in items], dtype=torch.int64)
        self.labels: torch.Tensor | None = labels if self.classes else None
        self._channels = channels

    @classmethod
    def from_spec(
        cls,
        spec: str,
        split: str,
        image_size: int,
        channels: int | None = None,
        strict: bool = False,
        subset: int | None = None,
    ) -> FolderIndex:
        """The index of a ``folder:PATH`` spec; a DatasetError for any other dataset."""
        root = folder_root(spec)
        if root is None:
            raise DatasetError(f"dataset {spec!r} is not an image folder: write folder:PATH")
        return cls(root, split, image_size, channels, strict, subset)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def name(self, i: int) -> str:
        """File name relative to the root, as in :attr:`ImageDataset.names`."""
        return self.path(i).relative_to(self.root).as_posix()

    def _sample(self) -> list[int]:
        return _sample(len(self), STATS_SAMPLE, self.stats_seed)

    @cached_property
    def channels(self) -> int:
        """The explicit channels, else 3 if any sampled file is colour (the in-memory rule,
        applied to a sample: a folder with a rare colour image may be read as grey)."""
        if self._channels is not None:
            return self._channels
        colour = (_header_is_colour(self.path(i)) for i in self._sample())
        return 3 if any(colour) else 1

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of a fixed, seeded sample of at most ``STATS_SAMPLE``
        decoded images. A streamed folder is large by definition, and exact statistics would
        cost an extra epoch of decoding; the mean over 1000 random images is within about
        1% of the full set's, far below what normalisation cares about. The fixed seed makes
        every rank and every resumed run normalise identically."""
        dataset = FolderStream(self.paths, self.image_size, self.channels, self.strict)
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        with one_thread():
            for i in self._sample():
                image = dataset.try_decode(i)
                if isinstance(image, str) and self.strict:  # fail before training starts
                    raise DatasetError(_strict_message(str(self.path(i)), image))
                if isinstance(image, str):
                    continue
                x = image.to(torch.float64).div_(255.0).flatten(1)
                total += x.sum(dim=1)
                total_sq += x.square_().sum(dim=1)
                count += x.shape[1]
        if not count:
            raise DatasetError(
                f"none of the {len(self._sample())} sampled image files in {self.folder} could "
                f"be read (first: {self.path(self._sample()[0])}): check the files"
            )
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt().clamp_min(1.0 / 255.0)
        return tuple(mean.tolist()), tuple(std.tolist())

    @property
    def mean(self) -> tuple[float, ...]:
        return self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats[1]

    def dataset(self) -> FolderStream:
        """The decoding dataset over this index (channels resolved now)."""
        return FolderStream(self.paths, self.image_size, self.channels, self.strict)


# --------------------------------------------------------------------------- the dataset


class _Item(NamedTuple):
    """One decoded sample; ``image`` None when it failed for good (under strict, or after
    ``_SUBSTITUTE_TRIES`` unreadable files in a row), the main process raising it."""

    image: torch.Tensor | None
    failures: tuple[tuple[int, str, str], ...]  # (index, path, reason) of unreadable files


def _strict_message(path: str, reason: str) -> str:
    return (
        f"cannot read image {path} ({reason}): fix or delete it, or train without data.strict "
        "to substitute unreadable files"
    )


class FolderStream(Dataset[_Item]):
    """Decodes item ``i`` of a :class:`FolderIndex` to uint8 ``[C, S, S]``.

    An unreadable file never raises here: the next readable file stands in, so the batch
    keeps its size and the substitution is deterministic; under ``strict`` (or when no file
    is readable for ``_SUBSTITUTE_TRIES`` in a row) the item carries the failure for the main
    process to raise as a one-line DatasetError, where an exception raised in a worker would
    reach the user wrapped in the worker's traceback.
    """

    def __init__(self, paths: np.ndarray, image_size: int, channels: int, strict: bool) -> None:
        self.paths, self.image_size, self.channels = paths, image_size, channels
        self.strict = strict
        self._unreadable: dict[int, str] = {}  # per process: skip known-bad files at once

    def __len__(self) -> int:
        return len(self.paths)

    def try_decode(self, i: int) -> torch.Tensor | str:
        """The image, or the reason it cannot be read."""
        if i in self._unreadable:
            return self._unreadable[i]
        image = try_decode(os.fsdecode(self.paths[i]), self.image_size, self.channels)
        if isinstance(image, str):
            self._unreadable[i] = image
        return image

    def __getitem__(self, i: int) -> _Item:
        failures: list[tuple[int, str, str]] = []
        for j in itertools.islice(itertools.count(i), min(len(self), _SUBSTITUTE_TRIES)):
            j %= len(self)
            image = self.try_decode(j)
            if not isinstance(image, str):
                return _Item(image, tuple(failures))
            failures.append((j, os.fsdecode(self.paths[j]), image))
            if self.strict:
                break
        return _Item(None, tuple(failures))


@dataclass
class _Batch:
    """A collated batch: images ``[b, C, S, S]`` (None when a strict read failed), the
    requested indices (not the substitutes': augmentation keys follow the sampler) and
    the unreadable files met."""

    images: torch.Tensor | None
    indices: torch.Tensor
    failures: list[tuple[int, str, str]]

    def pin_memory(self) -> _Batch:
        """DataLoader's pin-memory thread calls this; only the images are worth pinning."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _collate(items: list[tuple[int, _Item]]) -> _Batch:
    """Stack a batch (module level, so that spawned workers can pickle it)."""
    failures = [f for _, item in items for f in item.failures]
    indices = torch.tensor([i for i, _ in items], dtype=torch.int64)
    if any(item.image is None for _, item in items):
        return _Batch(None, indices, failures)
    # default_collate stacks straight into shared memory inside a worker: no extra copy when
    # the batch crosses to the main process.
    return _Batch(default_collate([item.image for _, item in items]), indices, failures)


class _Indexed(Dataset[tuple[int, _Item]]):
    """Pairs each item with its requested index, so collate can return the indices."""

    def __init__(self, stream: FolderStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> tuple[int, _Item]:
        return i, self.stream[i]


class _StepBatches:
    """Batch sampler: ``sampler.indices(step)`` for ``step = start, start + 1, ...``.

    One endless pass rather than one pass per epoch, so the workers decode the next epoch's
    first batches while this epoch's last ones train: no pipeline drain at epoch ends.
    """

    def __init__(self, sampler: StepSampler, start: int, stop: int | None) -> None:
        # a private copy: the trainer's sampler caches one epoch's order, and the prefetch
        # running ahead into the next epoch would make it recompute the order every step
        self.sampler = copy.copy(sampler)
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[list[int]]:
        steps = itertools.count(self.start) if self.stop is None else range(self.start, self.stop)
        for step in steps:
            yield self.sampler.indices(step).tolist()


# --------------------------------------------------------------------------- batches


def _available_cpus() -> int:
    """CPUs this process may run on (taskset/cgroup cpusets included), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(
    local_processes: int = 1, cpus: int | None = None, device_type: str = "cuda"
) -> int:
    """Decode workers per training process: the process's share of the CPUs, less one.

    One core stays with the training thread, which launches the GPU work and copies
    batches; a worker competing for it slows every step by more than the decoding it adds.
    So a process with at most one core decodes in its own thread (0 workers: no IPC, no
    contention), one with 2 cores gets 1 worker, and so on, capped at ``MAX_WORKERS``.
    Training on the CPU gets 0: its step already occupies every core, so workers add only
    IPC. Measured on 2 busy shared cores (2000 500x375 JPEGs -> 224 px): with the main
    thread waiting 70 ms per batch of 64 (a GPU step) 0/1/2 workers gave 228/360/287 and
    229/280/288 images/s in two runs; with a CPU step 183/163/131.
    """
    if device_type == "cpu":
        return 0
    cpus = _available_cpus() if cpus is None else cpus
    per_process = cpus // max(1, local_processes)
    return max(0, min(per_process - 1, MAX_WORKERS))


LoaderKind = Literal["memory", "stream"]


def resolve_loader(
    config: Config, num_images: int | None = None, channels: int | None = None
) -> LoaderKind:
    """``data.loader`` resolved: auto -> memory for Fashion-MNIST and synthetic data, and for
    folders whose decoded uint8 images (N * C * S * S bytes, ``data.subset`` applied; C is
    ``channels``, else ``data.channels``, else 3) fit in ``data.memory_limit_gb`` (10^9
    bytes); stream otherwise. ``num_images``: the folder's file count (a FolderIndex's len).
    """
    d = config.data
    is_folder = folder_root(d.name) is not None
    if d.loader == "stream" and not is_folder:
        raise ConfigError(
            f"data.loader=stream decodes image folders only, and {d.name!r} is not one: use "
            "data.loader=memory or auto"
        )
    if d.loader in ("memory", "stream"):
        return d.loader  # type: ignore[return-value]
    if not is_folder:
        return "memory"
    if num_images is None:
        raise ValueError("resolve_loader needs num_images for a folder dataset")
    n = min(num_images, d.subset or num_images)
    c = channels or d.channels or 3
    decoded = n * c * d.image_size * d.image_size
    return "memory" if decoded <= d.memory_limit_gb * 1e9 else "stream"


class StreamingBatches:
    """Batches of a streamed folder, a :class:`~mocov3.data.sources.BatchSource`:
    ``self(step)`` -> (uint8 images ``[b, C, S, S]`` on ``device``, indices ``[b]``).

    Steps are expected in increasing order from ``start_step``; any other step restarts the
    pipeline there (costing one prefetch of decoding). ``workers`` None: see
    :func:`default_workers`. ``stop_step``: the step after the last one, so that the
    prefetch decodes nothing past the end. Call :meth:`close` on every exit path (or use
    ``with``); it is idempotent.
    """

    def __init__(
        self,
        index: FolderIndex,
        sampler: StepSampler,
        device: torch.device,
        workers: int | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        local_processes: int = 1,
    ) -> None:
        if sampler.num_images != len(index):
            raise ValueError(f"sampler covers {sampler.num_images} images, index {len(index)}")
        self.index, self.sampler, self.device = index, sampler, device
        if workers is None:
            workers = default_workers(local_processes, device_type=device.type)
        self.workers = workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self.unreadable: dict[int, str] = {}  # index -> path of each unreadable file met
        self._batch_sampler = _StepBatches(sampler, start_step, stop_step)
        self._loader: DataLoader | None = self._make_loader(index.dataset())
        self._iterator: Iterator[_Batch] | None = None
        self._next_step = start_step

    def _make_loader(self, stream: FolderStream) -> DataLoader:
        """A DataLoader over the step batches; >= 4 batches in flight smooth out slow files."""
        extra: dict[str, object] = {}
        if self.workers:
            extra = {"persistent_workers": True, "prefetch_factor": max(2, -(-4 // self.workers))}
        return DataLoader(
            _Indexed(stream),
            batch_sampler=self._batch_sampler,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **extra,  # type: ignore[arg-type]
        )

    @property
    def skipped(self) -> int:
        """Unreadable files met so far (each substituted by the next readable one)."""
        return len(self.unreadable)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader is None:
            raise RuntimeError("StreamingBatches used after close()")
        if self._iterator is None or step != self._next_step:
            self._batch_sampler.start = step
            self._iterator = iter(self._loader)  # persistent workers: reset, not re-forked
        batch = self._next_batch(step)
        self._next_step = step + 1
        self._note(batch)
        assert batch.images is not None  # _note raised otherwise
        return batch.images.to(self.device, non_blocking=True), batch.indices

    def _next_batch(self, step: int) -> _Batch:
        """The next batch; a worker's exception becomes a one-line DatasetError."""
        assert self._iterator is not None
        try:
            if self.workers:
                return next(self._iterator)
            with one_thread():  # decoding happens right here
                return next(self._iterator)
        except StopIteration:
            raise RuntimeError(f"step {step} is at or past stop_step") from None
        except Exception as error:
            raise DatasetError(
                f"the data loader failed at step {step} ({_last_line(error)}); with "
                "data.workers=0 the error shows where it comes from"
            ) from error

    def _note(self, batch: _Batch) -> None:
        """Raise a strict failure; warn once about substitutions and count them."""
        if batch.images is None:
            _, path, reason = batch.failures[0]
            if self.index.strict:
                raise DatasetError(_strict_message(path, reason))
            raise DatasetError(
                f"{_SUBSTITUTE_TRIES} image files in a row from {path} cannot be read "
                f"({reason}): check the folder"
            )
        for i, path, reason in batch.failures:
            if i in self.unreadable:
                continue
            if not self.unreadable:
                logger.warning(
                    "unreadable image %s (%s): the next readable image stands in for it; "
                    "further unreadable files are counted and reported at the end",
                    path,
                    reason,
                )
            self.unreadable[i] = path

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._loader is None:
            return
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self.unreadable:
            logger.warning(
                "%d unreadable image file(s) were substituted (first: %s)",
                len(self.unreadable),
                next(iter(self.unreadable.values())),
            )

    def __enter__(self) -> StreamingBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_line(error: BaseException) -> str:
    """The last non-empty line of an error text: an exception re-raised from a worker
    carries the worker's whole traceback in its message, and ends with the original."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
