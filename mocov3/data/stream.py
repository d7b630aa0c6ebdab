"""Streaming input pipeline for datasets too large to decode into memory: image folders,
WebDataset shards and Hugging Face datasets (:mod:`mocov3.data.records`).

In-memory datasets hold every image as one uint8 tensor at ``data.image_size`` and crop on
the device. A streamed dataset is cropped as the paper crops: DataLoader worker processes
read each batch's encoded images, draw both views' boxes in the full-resolution image's
coordinates from the samples' counter-based streams and cut them (:mod:`mocov3.data.crops`),
the main process copies the uint8 views ``[b, 2, C, S, S]`` to the device (pinned memory and
a non-blocking copy on CUDA), and the rest of the batched augmentation runs there. With
``data.decode: gpu`` the workers read the bytes and draw the boxes, and the main process
decodes the batch's JPEGs with nvJPEG (torchvision) and cuts the same boxes on the GPU.
Index ``i`` names the same file as item ``i`` of the in-memory loader's listing (same
order, same class interleaving; the in-memory set then leaves unreadable files out, which
shifts its later indices), and a shard written from a folder keeps its order, so a sample's
keys are the same whichever way it is read.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mocov3.config import Config
from mocov3.data.counters import sample_keys
from mocov3.data.crops import (
    VIEWS,
    Pending,
    cut_sample,
    decode_pending,
    sample_boxes,
    view_boxes,
)
from mocov3.data.decode import (
    Header,
    one_thread,
    palette_is_grey,
    read_header,
    unreadable_reason,
)
from mocov3.data.records import ImageRecords, open_records, try_decode_record
from mocov3.data.sampling import StepSampler
from mocov3.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

STATS_SAMPLE = 1000  # images decoded to estimate channels and normalisation statistics
# 12 workers decode and crop about 5,000 ImageNet-sized JPEGs/s (about 2 ms each), more than
# one GPU's ViT-S step consumes; more workers would only cost memory
MAX_WORKERS = 12
_SUBSTITUTE_TRIES = 64  # consecutive unreadable files tolerated before giving up
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
Decode = Literal["cpu", "gpu"]


# --------------------------------------------------------------------------- the index


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``min(n, k)`` distinct indices from a fixed seed, sorted (read in listing order)."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def _header_is_colour(records: ImageRecords, i: int) -> bool | None:
    """Whether the in-memory path would decode image ``i`` as colour, from its header alone
    (palette images excepted); None when it cannot be read."""
    try:
        with Image.open(io.BytesIO(records.read(i))) as img:
            if img.mode in _GREY_MODES or img.mode.startswith("I;"):
                return False
            if img.mode == "P":
                return not palette_is_grey(img)
            return True
    except Exception:  # noqa: BLE001  PIL plugins raise many types on corrupt input
        return None


def _strict_message(name: str, reason: str) -> str:
    return (
        f"cannot read image {name} ({reason}): fix or delete it, or train without data.strict "
        "to substitute unreadable images"
    )


class StreamIndex:
    """The images and labels of one split of a streamed dataset, listed but not decoded:
    its :class:`~mocov3.data.records.ImageRecords`, the channels to decode to and the
    normalisation statistics of a fixed sample."""

    def __init__(
        self,
        records: ImageRecords,
        image_size: int,
        channels: int | None = None,
        strict: bool = False,
        stats_seed: int = 0,
    ) -> None:
        if image_size < 1:
            raise DatasetError(f"image_size must be >= 1, got {image_size}")
        self.records, self.image_size, self.strict = records, image_size, strict
        self.stats_seed = stats_seed
        self.classes, self.labels = records.classes, records.labels
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
        stats_seed: int = 0,
    ) -> StreamIndex:
        """The index of a ``folder:``, ``wds:`` or ``hf:`` spec (DatasetError otherwise)."""
        if subset is not None and subset < 1:
            raise DatasetError(f"subset must be >= 1 (or unset), got {subset}")
        records = open_records(spec, split, subset)
        return cls(records, image_size, channels, strict, stats_seed)

    def __len__(self) -> int:
        return len(self.records)

    def name(self, i: int) -> str:
        return self.records.name(i)

    def _sample(self) -> list[int]:
        return _sample(len(self), STATS_SAMPLE, self.stats_seed)

    @cached_property
    def channels(self) -> int:
        """The explicit channels, else 3 if any sampled image is colour (the in-memory rule,
        applied to a sample: a dataset with a rare colour image may be read as grey)."""
        if self._channels is not None:
            return self._channels
        colour = (_header_is_colour(self.records, i) for i in self._sample())
        return 3 if any(colour) else 1

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of a fixed, seeded sample of at most ``STATS_SAMPLE``
        images, centre-cropped at the training size. Exact statistics would cost an extra
        epoch of decoding; the mean over 1000 random images is within about 1% of the full
        set's, far below what normalisation cares about. The fixed seed makes every rank and
        every resumed run normalise identically."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        with one_thread():
            for i in self._sample():
                image = try_decode_record(self.records, i, self.image_size, self.channels)
                if isinstance(image, str) and self.strict:  # fail before training starts
                    raise DatasetError(_strict_message(self.name(i), image))
                if isinstance(image, str):
                    continue
                x = image.to(torch.float64).div_(255.0).flatten(1)
                total += x.sum(dim=1)
                total_sq += x.square_().sum(dim=1)
                count += x.shape[1]
        if not count:
            raise DatasetError(
                f"none of the {len(self._sample())} sampled images of {self.records.source} "
                f"could be read (first: {self.name(self._sample()[0])}): check the files"
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


# --------------------------------------------------------------------------- the workers


@dataclass(frozen=True)
class CropSettings:
    """What the workers need to cut a sample's views: output size and channels, the crop
    distribution, the seed its keys derive from, and where the JPEGs are decoded."""

    size: int
    channels: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    seed: int
    reduce: bool = True  # decode at 1/2, 1/4, 1/8 size where every box allows
    decode: Decode = "cpu"


def crop_settings(config: Config, channels: int) -> CropSettings:
    """The :class:`CropSettings` of a run's config, for ``channels`` (resolved) channels."""
    d, a = config.data, config.augment
    return CropSettings(
        d.image_size, channels, a.crop_scale, a.crop_ratio, config.train.seed,
        d.reduced_decode, d.decode,  # type: ignore[arg-type]
    )  # fmt: skip


class _Request(NamedTuple):
    epoch: int
    indices: list[int]


@dataclass
class _Batch:
    """A decoded batch: views ``[b, 2, C, S, S]`` (None when a strict read failed), the
    requested indices (not the substitutes': augmentation keys follow the sampler), the
    unreadable images met and the JPEGs left for device decoding."""

    views: torch.Tensor | None
    indices: torch.Tensor
    epoch: int
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)

    def pin_memory(self) -> _Batch:
        """DataLoader's pin-memory thread calls this; only the views are worth pinning."""
        if self.views is not None:
            self.views = self.views.pin_memory()
        return self


class _Readable(NamedTuple):
    index: int
    data: bytes
    header: Header


class BatchDecoder(Dataset[_Batch]):
    """Cuts both views of every sample of a requested batch (a DataLoader worker's job).

    An unreadable image never raises here: the next readable one stands in (keeping the
    requested sample's key), so the batch keeps its size and the substitution is
    deterministic; under ``strict`` (or after ``_SUBSTITUTE_TRIES`` unreadable images in a
    row) the batch carries the failure for the main process to raise as one line, where an
    exception raised in a worker would reach the user wrapped in the worker's traceback.
    """

    def __init__(self, records: ImageRecords, settings: CropSettings, strict: bool) -> None:
        self.records, self.settings, self.strict = records, settings, strict
        self._unreadable: dict[int, str] = {}  # per process: skip known-bad images at once

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, i: int) -> _Readable | str:
        """Image ``i``'s bytes and header, or why they cannot be read."""
        if i in self._unreadable:
            return self._unreadable[i]
        try:
            data = self.records.read(i)
        except OSError as error:  # maybe passing (a network file system): not remembered
            return unreadable_reason(error)
        try:
            return _Readable(i, data, read_header(data))
        except Exception as error:  # noqa: BLE001  PIL raises many types on corrupt input
            self._unreadable[i] = unreadable_reason(error)
            return self._unreadable[i]

    def __getitem__(self, request: _Request) -> _Batch:  # type: ignore[override]
        s = self.settings
        indices = torch.tensor(request.indices, dtype=torch.int64)
        keys = sample_keys(s.seed, request.epoch, indices)
        found = [self._read(i) for i in request.indices]
        sizes = [
            (r.header.height, r.header.width) if isinstance(r, _Readable) else (1, 1) for r in found
        ]
        heights, widths = torch.tensor(sizes, dtype=torch.float64).unbind(1)
        boxes = view_boxes(keys, heights, widths, s.scale, s.ratio)
        views = torch.empty(len(found), VIEWS, s.channels, s.size, s.size, dtype=torch.uint8)
        batch = _Batch(views, indices, request.epoch)
        for position, readable in enumerate(found):
            if not self._fill(
                batch, position, readable, keys[position : position + 1], boxes[position]
            ):
                batch.views = None
                break
        return batch

    def _fill(
        self,
        batch: _Batch,
        position: int,
        readable: _Readable | str,
        key: torch.Tensor,
        boxes: torch.Tensor | None,
        on_device: bool = True,
    ) -> bool:
        """Put sample ``position``'s views into the batch (or, for ``data.decode: gpu``, its
        JPEG into ``batch.pending``), substituting unreadable images; False when it failed
        for good. ``boxes``: the requested image's, when already drawn."""
        i = int(batch.indices[position])
        for tries in range(min(len(self), _SUBSTITUTE_TRIES)):
            j = (i + tries) % len(self)
            if tries:
                readable, boxes = self._read(j), None
            if isinstance(readable, _Readable):
                if boxes is None:
                    boxes = self._boxes(key, readable.header)
                if on_device and self.settings.decode == "gpu" and readable.header.reducible:
                    batch.pending.append(Pending(position, readable.data, boxes))
                    return True
                views = self._cut(readable, key, boxes)
                if isinstance(views, torch.Tensor):
                    assert batch.views is not None
                    batch.views[position] = views
                    return True
                readable = views
            batch.failures.append((j, self.records.name(j), readable))
            if self.strict:
                return False
        return False

    def _boxes(self, key: torch.Tensor, header: Header) -> torch.Tensor:
        return sample_boxes(key, header, self.settings.scale, self.settings.ratio)

    def _cut(
        self, readable: _Readable, key: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor | str:
        """Both views of a read image, or why it cannot be decoded (remembered)."""
        s = self.settings
        try:
            return cut_sample(
                readable.data, readable.header, key, boxes, s.size, s.channels, s.scale,
                s.ratio, s.reduce,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001  decoders raise many types
            self._unreadable[readable.index] = unreadable_reason(error)
            return self._unreadable[readable.index]

    def fill_on_cpu(self, batch: _Batch, item: Pending) -> bool:
        """A JPEG the device could not decode: decode it here (the main process), or
        substitute it as a worker would; False when it failed for good."""
        i = int(batch.indices[item.position])
        key = sample_keys(self.settings.seed, batch.epoch, torch.tensor([i]))
        readable = self._read(i)
        return self._fill(batch, item.position, readable, key, item.boxes, on_device=False)


class _StepBatches:
    """Batch requests ``(epoch, sampler.indices(step))`` for ``step = start, start + 1, ...``.

    One endless pass rather than one pass per epoch, so the workers decode the next epoch's
    first batches while this epoch's last ones train: no pipeline drain at epoch ends.
    """

    def __init__(self, sampler: StepSampler, start: int, stop: int | None) -> None:
        # a private copy: the trainer's sampler caches one epoch's order, and the prefetch
        # running ahead into the next epoch would make it recompute the order every step
        self.sampler = copy.copy(sampler)
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[_Request]:
        steps = itertools.count(self.start) if self.stop is None else range(self.start, self.stop)
        for step in steps:
            yield request_for(self.sampler, step)


def request_for(sampler: StepSampler, step: int) -> _Request:
    """What a worker decodes for ``step``: the epoch (for the keys) and this process's
    sample indices."""
    return _Request(sampler.epoch_and_position(step)[0], sampler.indices(step).tolist())


def _identity(batch: _Batch) -> _Batch:
    """The collate function: a batch is already whole (module level, so spawned workers can
    pickle it)."""
    return batch


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


class StreamingBatches:
    """Batches of a streamed dataset, a :class:`~mocov3.data.sources.BatchSource`:
    ``self(step)`` -> (uint8 views ``[b, 2, C, S, S]`` on ``device``, indices ``[b]``), each
    view cut from the full-resolution image (:mod:`mocov3.data.crops`).

    Steps are expected in increasing order from ``start_step``; any other step restarts the
    pipeline there (costing one prefetch of decoding). ``workers`` None: see
    :func:`default_workers`. ``stop_step``: the step after the last one, so that the
    prefetch decodes nothing past the end. Call :meth:`close` on every exit path (or use
    ``with``); it is idempotent.
    """

    def __init__(
        self,
        index: StreamIndex,
        sampler: StepSampler,
        device: torch.device,
        settings: CropSettings,
        workers: int | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        local_processes: int = 1,
        unreadable: dict[int, str] | None = None,
    ) -> None:
        if sampler.num_images != len(index):
            raise ValueError(f"sampler covers {sampler.num_images} images, index {len(index)}")
        if settings.decode == "gpu" and device.type != "cuda":
            raise ConfigError(
                f"data.decode=gpu decodes with nvJPEG on a CUDA device, and this run trains "
                f"on {device.type}: use data.decode=cpu"
            )
        self.index, self.sampler, self.device = index, sampler, device
        self.settings = settings
        if workers is None:
            workers = default_workers(local_processes, device_type=device.type)
        self.workers = workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        # index -> name of each unreadable image met; a dict given by the caller is shared
        # with earlier sources of the run, and the caller reports it
        self._reports = unreadable is None
        self.unreadable: dict[int, str] = {} if unreadable is None else unreadable
        self._batch_sampler = _StepBatches(sampler, start_step, stop_step)
        decoder = BatchDecoder(index.records, settings, index.strict)
        self._loader: DataLoader | None = self._make_loader(decoder)
        self._cpu_decoder: BatchDecoder | None = None  # JPEGs the device refuses
        self._iterator: Iterator[_Batch] | None = None
        self._next_step = start_step

    def _make_loader(self, decoder: BatchDecoder) -> DataLoader:
        """A DataLoader over the step requests; >= 4 batches in flight smooth out slow files."""
        extra: dict[str, object] = {}
        if self.workers:
            extra = {"persistent_workers": True, "prefetch_factor": max(2, -(-4 // self.workers))}
        return DataLoader(
            decoder,  # type: ignore[arg-type]
            sampler=self._batch_sampler,  # type: ignore[arg-type]
            batch_size=None,  # each request is a whole batch, decoded by one worker
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=self.device.type == "cuda",
            **extra,  # type: ignore[arg-type]
        )

    @property
    def skipped(self) -> int:
        """Unreadable images met so far (each substituted by the next readable one)."""
        return len(self.unreadable)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader is None:
            raise RuntimeError("StreamingBatches used after close()")
        if self._iterator is None or step != self._next_step:
            self._batch_sampler.start = step
            self._iterator = iter(self._loader)  # persistent workers: reset, not re-forked
        batch = self._next_batch(step)
        self._next_step = step + 1
        self._note(batch.views is None, batch.failures)
        assert batch.views is not None  # _note raised otherwise
        views = batch.views.to(self.device, non_blocking=True)
        failed = decode_pending(views, batch.pending, self.settings.size, self.settings.channels)
        if failed:
            self._decode_on_cpu(views, batch, failed)
        return views, batch.indices

    def _decode_on_cpu(self, views: torch.Tensor, batch: _Batch, failed: list[Pending]) -> None:
        """JPEGs the device refused (rare: the workers parsed every header): decoded here on
        the CPU, or substituted as a worker substitutes, into the device's views."""
        if self._cpu_decoder is None:
            self._cpu_decoder = BatchDecoder(self.index.records, self.settings, self.index.strict)
        on_device = _Batch(views, batch.indices, batch.epoch)
        done = all(self._cpu_decoder.fill_on_cpu(on_device, item) for item in failed)
        self._note(not done, on_device.failures)

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

    def _note(self, failed: bool, failures: list[tuple[int, str, str]]) -> None:
        """Raise a batch that failed for good; warn once about substitutions and count them."""
        if failed:
            _, name, reason = failures[0]
            if self.index.strict:
                raise DatasetError(_strict_message(name, reason))
            raise DatasetError(
                f"{_SUBSTITUTE_TRIES} images in a row from {name} cannot be read "
                f"({reason}): check the dataset"
            )
        for i, name, reason in failures:
            if i in self.unreadable:
                continue
            if not self.unreadable:
                logger.warning(
                    "unreadable image %s (%s): the next readable image stands in for it; "
                    "further unreadable images are counted and reported at the end",
                    name,
                    reason,
                )
            self.unreadable[i] = name

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._loader is None:
            return
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self.unreadable and self._reports:
            report_unreadable(self.unreadable)

    def __enter__(self) -> StreamingBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def report_unreadable(unreadable: dict[int, str]) -> None:
    """The warning that sums up a stream's substituted images."""
    first = next(iter(unreadable.values()))
    logger.warning("%d unreadable image(s) were substituted (first: %s)", len(unreadable), first)


def _last_line(error: BaseException) -> str:
    """The last non-empty line of an error text: an exception re-raised from a worker
    carries the worker's whole traceback in its message, and ends with the original."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
