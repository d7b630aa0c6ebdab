"""What a run trains and evaluates on, and where its batches come from.

A dataset small enough is decoded once into a uint8 tensor (:class:`MemoryBatches` indexes
it); a folder, shard set or Hugging Face dataset too large for memory is streamed
(:class:`~mocov3.data.stream.StreamingBatches` cuts each batch's views from the
full-resolution images in DataLoader workers). Both give ``source(step)`` -> (uint8 images
on the device, sample indices ``[b]``) for the sampler's batch of that step: whole images
``[b, C, H, W]`` from memory, both views' crops ``[b, 2, C, S, S]`` when streamed; the
augmentation takes either (:class:`~mocov3.data.augment.TwoViewAugment`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mocov3.config import Config, apply_overrides, config_from_dict
from mocov3.data.datasets import load_split
from mocov3.data.images import ImageDataset
from mocov3.data.records import has_test_split, record_spec
from mocov3.data.sampling import StepSampler
from mocov3.data.stream import StreamIndex, StreamingBatches, crop_settings
from mocov3.errors import ConfigError


class BatchSource(Protocol):
    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


class MemoryBatches:
    """Batches of an in-memory uint8 dataset: ``self(step)`` -> (images ``[b, C, H, W]``
    uint8 on ``device``, sample indices ``[b]``), ``b`` the per-process batch."""

    def __init__(self, images: torch.Tensor, sampler: StepSampler, device: torch.device) -> None:
        self.images, self.sampler, self.device = images, sampler, device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.sampler.indices(step)
        return self.images[indices].to(self.device, non_blocking=True), indices

    def close(self) -> None:
        """Nothing to release (streaming sources stop their workers here)."""


def load_data(config: Config, with_test: bool = True) -> tuple[ImageDataset, ImageDataset | None]:
    """The training split (``data.subset`` applied) and, when labelled, the test split, in
    memory."""
    d = config.data
    common = dict(
        data_dir=d.data_dir,
        download=d.download,
        image_size=d.image_size,
        synthetic_size=d.synthetic_size,
        seed=config.train.seed,
        strict=d.strict,
    )
    train_set = load_split(d.name, "train", channels=d.channels, subset=d.subset, **common)
    test_set = None
    if with_test and train_set.labels is not None and has_test_split(d.name):
        # the test split takes the train split's channel count so features are comparable
        test_set = load_split(d.name, "test", channels=train_set.channels, **common)
    return train_set, test_set


@dataclass
class TrainingData:
    """What a run trains and evaluates on.

    ``kind`` memory: ``images`` holds every training image as uint8; stream: ``index``
    lists a dataset's images, cropped batch by batch in DataLoader workers. ``knn_memory`` /
    ``test_set``: labelled images in memory for kNN (None when there are none); when
    streaming, ``knn_memory`` is the first ``eval.train_subset`` training images.
    """

    kind: str
    num_images: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor | None = None
    index: StreamIndex | None = None
    knn_memory: ImageDataset | None = None
    test_set: ImageDataset | None = None
    skipped: int = 0  # unreadable images left out of the in-memory training set

    def batch_source(
        self,
        sampler: StepSampler,
        device: torch.device,
        config: Config,
        start_step: int = 0,
        stop_step: int | None = None,
        local_processes: int = 1,
        unreadable: dict[int, str] | None = None,
    ) -> BatchSource:
        """The batches of steps ``start_step`` to ``stop_step`` (streaming prefetches no
        further); ``local_processes`` share this node's CPUs for decoding; ``unreadable``
        collects the images a stream substitutes (index -> name), across the sources a run
        makes."""
        if self.images is not None:
            return MemoryBatches(self.images, sampler, device)
        assert self.index is not None
        settings = crop_settings(config, self.channels)
        return StreamingBatches(
            self.index, sampler, device, settings, config.data.workers, start_step, stop_step,
            local_processes, unreadable,
        )  # fmt: skip


LoaderKind = Literal["memory", "stream"]


def resolve_loader(
    config: Config, num_images: int | None = None, channels: int | None = None
) -> LoaderKind:
    """``data.loader`` resolved: auto -> memory for Fashion-MNIST and synthetic data, and for
    folders, shards and Hugging Face datasets whose decoded uint8 images (N * C * S * S bytes;
    C is ``channels``, else ``data.channels``, else 3) fit in ``data.memory_limit_gb`` (10^9
    bytes); stream otherwise. ``num_images``: the split's image count, any subset applied
    (a StreamIndex's len).
    """
    d = config.data
    streamable = record_spec(d.name) is not None
    if d.loader == "stream" and not streamable:
        raise ConfigError(
            f"data.loader=stream reads image folders, shards and Hugging Face datasets, and "
            f"{d.name!r} is none of them: use data.loader=memory or auto"
        )
    if d.loader in ("memory", "stream"):
        return d.loader  # type: ignore[return-value]
    if not streamable:
        return "memory"
    if num_images is None:
        raise ValueError("resolve_loader needs num_images for a streamable dataset")
    c = channels or d.channels or 3
    decoded = num_images * c * d.image_size * d.image_size
    return "memory" if decoded <= d.memory_limit_gb * 1e9 else "stream"


def load_training_data(config: Config, with_test: bool = True) -> TrainingData:
    """The run's data: in memory (``load_data``), or streamed (a folder, shards or a Hugging
    Face dataset) when ``data.loader`` says stream, or says auto and the decoded images
    would exceed ``data.memory_limit_gb``."""
    d = config.data
    if record_spec(d.name) is None or d.loader == "memory":
        resolve_loader(config)  # refuses data.loader=stream for a dataset it cannot stream
        train_set, test_set = load_data(config, with_test)
        labelled = train_set if train_set.labels is not None else None
        return TrainingData(
            "memory",
            len(train_set),
            train_set.channels,
            train_set.mean,
            train_set.std,
            images=train_set.images,
            knn_memory=labelled,
            test_set=test_set,
            skipped=train_set.skipped,
        )
    index = StreamIndex.from_spec(
        d.name, "train", d.image_size, d.channels, d.strict, d.subset, config.train.seed
    )
    if resolve_loader(config, len(index), index.channels) == "memory":
        in_memory = apply_overrides(config_from_dict(config.to_dict()), ["data.loader=memory"])
        return load_training_data(in_memory, with_test)
    data = TrainingData("stream", len(index), index.channels, index.mean, index.std, index=index)
    if with_test and index.labels is not None and has_test_split(d.name):
        size, channels = d.image_size, index.channels
        memory = load_split(
            d.name, "train", image_size=size, channels=channels, strict=d.strict,
            subset=knn_memory_size(config, index),
        )  # fmt: skip
        # normalised as training normalises (the memory subset's own statistics differ a bit)
        data.knn_memory = dataclasses.replace(memory, mean=index.mean, std=index.std)
        data.test_set = load_split(
            d.name, "test", image_size=size, channels=channels, strict=d.strict,
            subset=config.eval.test_subset,
        )  # fmt: skip
    return data


def knn_memory_size(config: Config, index: StreamIndex) -> int:
    """``eval.train_subset``, or as many images as a quarter of ``data.memory_limit_gb``
    holds: a streamed dataset is too large to hold whole for kNN."""
    if config.eval.train_subset:
        return min(config.eval.train_subset, len(index))
    per_image = index.channels * config.data.image_size**2
    return max(1, min(len(index), int(config.data.memory_limit_gb * 1e9 / 4 / per_image)))
