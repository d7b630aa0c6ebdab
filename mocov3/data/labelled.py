"""A split to evaluate on, in memory or streamed, read in batches of backbone inputs.

The evaluation commands (kNN, linear probes, fine-tuning, embeddings, the report) read
their images through :class:`EvalSplit`. A split that fits in ``data.memory_limit_gb``
decoded is held as uint8 (:class:`~mocov3.data.images.ImageDataset`, the pretraining
loader's); a larger folder, shard set or Hugging Face dataset is streamed: DataLoader
workers decode each batch's records, so a process holds only the batches in flight. Each
image becomes the backbone's input as :class:`Views` says:

- ``whole``: shorter side to the image size, centre crop, as the in-memory loader decodes
  (the kNN and cached-feature protocols; the two paths give the same pixels);
- ``centre``: shorter side to ``size * 256 / 224``, centre crop to ``size``: the
  reference's validation transform (``Resize(256)``, ``CenterCrop(224)``);
- ``crop``: ``RandomResizedCrop(size, scale)`` + horizontal flip, the reference probe's and
  fine-tuning's training view, drawn from the sample's counter-based streams (seed, epoch,
  index) as pretraining's view 0 is, so a view does not depend on the process count. A
  streamed image is cut at full resolution (:mod:`mocov3.data.crops`), an in-memory one at
  the stored size. ``rand_augment`` adds timm's RandAugment (DeiT's fine-tuning recipe),
  per image on PIL images after the crop and flip, before normalisation, as DeiT's
  transform does: in the decoding workers for a streamed split, on the CPU for an in-memory
  one; Python's and NumPy's generators are seeded from the sample's key right before each
  image, so its choices too depend on (seed, epoch, index) only.

Under torchrun each process reads the indices it is given (see
:func:`~mocov3.runtime.distributed.shard_range`). Unreadable images of a streamed split are
left out and counted, as the in-memory loader leaves them out; ``data.strict`` stops instead.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from mocov3.config import Config
from mocov3.data.augment import (
    CROP_RATIO,
    flip_stream,
    normalize,
    random_resized_crop_flip,
)
from mocov3.data.counters import counter_uniform, sample_keys
from mocov3.data.crops import cut_sample, sample_boxes
from mocov3.data.datasets import load_split
from mocov3.data.decode import decode_full, read_header, unreadable_reason
from mocov3.data.images import ImageDataset
from mocov3.data.records import FileRecords, ImageRecords, record_spec
from mocov3.data.sources import resolve_loader
from mocov3.data.stream import StreamIndex, default_workers
from mocov3.errors import DatasetError

ViewKind = Literal["whole", "centre", "crop"]
VIEW_KINDS = ("whole", "centre", "crop")
EVAL_RESIZE = 256 / 224  # the reference's validation resize relative to its crop


@dataclass(frozen=True)
class Views:
    """How an image becomes the backbone's input (see the module docstring). ``scale``,
    ``seed`` and ``epoch`` matter to ``crop`` only."""

    kind: ViewKind = "whole"
    scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0
    epoch: int = 0
    rand_augment: str | None = None  # timm's RandAugment config, e.g. "rand-m9-mstd0.5-inc1"

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"views must be one of {VIEW_KINDS}, got {self.kind!r}")
        if self.rand_augment and self.kind != "crop":
            raise ValueError("rand_augment applies to the 'crop' view only")


WHOLE = Views()  # the default: images as the in-memory loader decodes them


def centre_size(size: int) -> int:
    """The shorter side the ``centre`` view resizes to before cutting ``size``."""
    return round(size * EVAL_RESIZE)


# --------------------------------------------------------------------------- RandAugment


@functools.lru_cache(maxsize=8)
def _rand_augment_op(config: str, size: int, fill: tuple[int, ...]) -> Callable:
    """timm's RandAugment with the hyper-parameters DeiT's ``create_transform`` gives it:
    translations up to 45% of the image side, the mean colour as fill, bicubic resampling."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": fill,
        "interpolation": Image.Resampling.BICUBIC,
    }
    transform = rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize  # this instance's op only; timm itself is left alone
    return transform


def _posterize(image: Any, bits: int, **_: Any) -> Any:
    """timm's posterize as the Pillow DeiT ran with computed it: magnitude 10 of
    ``PosterizeIncreasing`` keeps 0 bits, a black image, which recent Pillow (13) refuses."""
    from PIL import Image, ImageOps

    if bits >= 8:
        return image
    if bits < 1:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def rand_augment(
    images: torch.Tensor, keys: torch.Tensor, config: str, mean: Sequence[float] | None = None
) -> torch.Tensor:
    """timm's RandAugment ``config`` applied to each uint8 ``[B, C, H, W]`` CPU image (C 1
    or 3) as a PIL image, Python's and NumPy's generators seeded from the image's key
    (:func:`~mocov3.data.counters.sample_keys`) right before it and restored afterwards."""
    from PIL import Image

    channels, size = images.shape[1], min(images.shape[-2:])
    fill = tuple(min(255, round(255 * m)) for m in (mean or (0.5,) * 3)[:channels])
    op = _rand_augment_op(config, size, fill)
    saved = random.getstate(), np.random.get_state()
    out = torch.empty_like(images)
    try:
        for i, (image, key) in enumerate(zip(images, keys.tolist(), strict=True)):
            key &= (1 << 64) - 1  # the int64 key's bits as an unsigned seed
            random.seed(key)
            np.random.seed([key & 0xFFFFFFFF, key >> 32])
            array = image.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[..., 0] if channels == 1 else array)
            result = np.asarray(op(pil)).reshape(array.shape)
            out[i] = torch.from_numpy(result.copy()).permute(2, 0, 1)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return out


def _rand_augment_float(
    x: torch.Tensor, keys: torch.Tensor, config: str, mean: Sequence[float]
) -> torch.Tensor:
    """:func:`rand_augment` of a float batch in [0, 1] (an in-memory crop), back in [0, 1]
    on its device: quantised to uint8 as DeiT's PIL pipeline holds it."""
    images = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
    augmented = rand_augment(images, keys.cpu(), config, mean)
    return augmented.to(x.device, non_blocking=True).float().div_(255.0)


# --------------------------------------------------------------------------- workers


@dataclass
class _Decoded:
    """One request's images (uint8 ``[n, C, S, S]``), the indices among those requested
    that were read (in request order), and the ones that were not (index, name, reason)."""

    images: torch.Tensor
    indices: torch.Tensor
    failures: list[tuple[int, str, str]] = field(default_factory=list)

    def pin_memory(self) -> _Decoded:
        self.images = self.images.pin_memory()
        return self


class _RecordDecoder(Dataset[_Decoded]):
    """Decodes a requested list of records into backbone-sized uint8 images (a worker's
    job). Never raises for a bad image: it is reported back, for the caller to count or,
    under ``data.strict``, to stop on in one line."""

    def __init__(
        self,
        records: ImageRecords,
        size: int,
        channels: int,
        views: Views,
        mean: Sequence[float] | None = None,
    ) -> None:
        self.records, self.size, self.channels, self.views = records, size, channels, views
        self.mean = mean  # RandAugment's fill colour

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, request: list[int]) -> _Decoded:  # type: ignore[override]
        images, kept, failures = [], [], []
        for i in request:
            try:
                images.append(self._decode(i))
                kept.append(i)
            except Exception as error:  # noqa: BLE001  decoders raise many types
                failures.append((i, self.records.name(i), unreadable_reason(error)))
        shape = (len(images), self.channels, self.size, self.size)
        stacked = torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8)
        return _Decoded(stacked, torch.tensor(kept, dtype=torch.int64), failures)

    def _decode(self, i: int) -> torch.Tensor:
        data = self.records.read(i)
        kind, size = self.views.kind, self.size
        if kind == "crop":
            v = self.views
            key = sample_keys(v.seed, v.epoch, torch.tensor([i]))
            header = read_header(data)
            # view 0's box only: the streams the in-memory crop draws from
            boxes = sample_boxes(key, header, v.scale, CROP_RATIO)[:1]
            views = cut_sample(data, header, key, boxes, size, self.channels, v.scale, CROP_RATIO)
            if not v.rand_augment:
                return views[0]
            # RandAugment is not flip-equivariant (shears, translations): flip first, here
            flip = bool(counter_uniform(key, flip_stream(0))[0] < 0.5)
            view = views[0].flip(-1) if flip else views[0]
            return rand_augment(view[None], key, v.rand_augment, self.mean)[0]

        image = decode_full(data, self.channels)
        return _resize_centre(image, centre_size(size) if kind == "centre" else size, size)


def _resize_centre(image: torch.Tensor, shorter: int, size: int) -> torch.Tensor:
    """Shorter side to ``shorter`` (bilinear, antialiased), then a centre ``size`` crop;
    ``[C, H, W]`` or ``[B, C, H, W]``."""
    h, w = image.shape[-2:]
    if min(h, w) != shorter:
        scale = shorter / min(h, w)
        nh, nw = max(shorter, round(h * scale)), max(shorter, round(w * scale))
        image = TF.resize(image, [nh, nw], InterpolationMode.BILINEAR, antialias=True)
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size].contiguous()


def _identity(decoded: _Decoded) -> _Decoded:
    return decoded


# --------------------------------------------------------------------------- the split


class EvalSplit:
    """One labelled (or unlabelled) split: ``len``, ``labels`` (int64 ``[N]`` or None),
    ``classes``, ``channels``, ``size``, and :meth:`batches` of normalised inputs. Build it
    with :func:`open_split`. ``mean``/``std``: the normalisation the backbone was trained
    with (a checkpoint's), not necessarily this split's own."""

    def __init__(
        self,
        name: str,
        split: str,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        memory: ImageDataset | None = None,
        index: StreamIndex | None = None,
    ) -> None:
        if (memory is None) == (index is None):
            raise ValueError("an EvalSplit holds either images in memory or a stream index")
        self.name, self.split, self.size = name, split, size
        self.mean, self.std = tuple(mean), tuple(std)
        self.memory, self.index = memory, index
        source = memory if memory is not None else index
        assert source is not None
        self.labels: torch.Tensor | None = source.labels
        self.classes: list[str] = list(source.classes)
        self.unreadable: dict[int, str] = {}

    @classmethod
    def of_dataset(cls, dataset: ImageDataset, split: str = "train") -> EvalSplit:
        """A split of images already in memory, normalised with their own statistics."""
        size = int(dataset.images.shape[-1])
        return cls(f"memory:{split}", split, size, dataset.mean, dataset.std, memory=dataset)

    @property
    def streamed(self) -> bool:
        return self.index is not None

    @property
    def channels(self) -> int:
        return self.memory.channels if self.memory is not None else self.index.channels  # type: ignore[union-attr]

    @property
    def num_classes(self) -> int:
        """Classes named, or the largest label + 1 (at least one)."""
        top = int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 1
        return max(len(self.classes), top)

    def __len__(self) -> int:
        return len(self.memory) if self.memory is not None else len(self.index)  # type: ignore[arg-type]

    def image_name(self, i: int) -> str:
        """Image ``i``'s name: its path relative to a folder's root, a shard member's
        ``shard.tar:key``, else ``split/i``."""
        if self.index is not None:
            records = self.index.records
            root, path = getattr(records, "root", None), getattr(records, "path", None)
            if root is not None and path is not None:
                return Path(path(i)).relative_to(root).as_posix()
            return records.name(i)
        names = self.memory.names if self.memory is not None else None
        return names[i] if names is not None else f"{self.split}/{i}"

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        device: torch.device,
        views: Views = WHOLE,
        workers: int | None = None,
        normalise: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs [b, C, S, S] float on device, indices [b])`` for ``indices`` in order,
        ``batch_size`` at a time; a streamed split's unreadable images are left out (so
        ``b`` may be smaller), recorded in ``self.unreadable``. ``normalise`` False keeps
        values in [0, 1] (the raw-pixel baseline)."""
        mean, std = (self.mean, self.std) if normalise else ((0.0,) * 3, (1.0,) * 3)
        mean, std = mean[: self.channels], std[: self.channels]
        for images, kept in self._uint8_batches(indices, batch_size, device, views):
            yield self._inputs(images, kept, views, mean, std), kept

    def _uint8_batches(
        self, indices: torch.Tensor, batch_size: int, device: torch.device, views: Views
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.memory is not None:
            for chunk in indices.split(batch_size):
                yield self.memory.images[chunk].to(device, non_blocking=True), chunk
            return
        assert self.index is not None
        decoder = _RecordDecoder(self.index.records, self.size, self.channels, views, self.mean)
        requests = [chunk.tolist() for chunk in indices.split(batch_size)]
        if workers_for(device) == 0:
            for request in requests:
                yield self._checked(decoder[request], device)
            return
        loader = DataLoader(
            decoder,  # type: ignore[arg-type]
            sampler=requests,  # type: ignore[arg-type]
            batch_size=None,
            num_workers=workers_for(device),
            collate_fn=_identity,
            pin_memory=device.type == "cuda",
            prefetch_factor=4,
        )
        for decoded in loader:
            yield self._checked(decoded, device)

    def _checked(
        self, decoded: _Decoded, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for i, name, reason in decoded.failures:
            if self.index is not None and self.index.strict:
                raise DatasetError(
                    f"cannot read {name}: {reason}; remove the file or drop data.strict to "
                    "leave unreadable images out"
                )
            self.unreadable[i] = name
        return decoded.images.to(device, non_blocking=True), decoded.indices

    def _inputs(
        self,
        images: torch.Tensor,
        indices: torch.Tensor,
        views: Views,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> torch.Tensor:
        x = images.float().div_(255.0)
        if views.kind == "crop":
            keys = sample_keys(views.seed, views.epoch, indices).to(images.device)
            if self.memory is not None:
                x = random_resized_crop_flip(x, keys, self.size, views.scale)
                if views.rand_augment:
                    x = _rand_augment_float(x, keys, views.rand_augment, self.mean)
            elif not views.rand_augment:  # cut in the worker from the full image: flip left
                flip = counter_uniform(keys, flip_stream(0)) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        elif views.kind == "centre" and self.memory is not None:
            x = _resize_centre(x, centre_size(self.size), self.size)
        return normalize(x, mean, std, True)


def workers_for(device: torch.device) -> int:
    """Decoding workers for an evaluation read: the pretraining rule
    (:func:`~mocov3.data.stream.default_workers`), at least one on a CPU when it has two
    cores or more, since evaluation's forward passes leave cores idle between batches."""
    workers = default_workers(device_type=device.type)
    if device.type == "cpu":
        workers = default_workers(device_type="cuda")
    return workers


def open_split(
    config: Config,
    split: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int | None = None,
    subset: int | None = None,
    one_pass: bool = False,
) -> EvalSplit:
    """``split`` (train | test) of ``config.data``: in memory when ``data.loader`` says so
    or its decoded images fit ``data.memory_limit_gb``, streamed otherwise. ``subset``:
    the first N images (default ``data.subset`` for train). ``mean``/``std`` None: the
    split's own statistics. ``channels`` None: ``data.channels``, else the data's own.
    ``one_pass``: the caller reads each image once (embeddings), so a folder, shard set or
    dataset is streamed whatever its size: holding it would only cost memory."""
    d = config.data
    if subset is None and split == "train":
        subset = d.subset
    channels = channels or d.channels
    if record_spec(d.name) is not None and d.loader != "memory":
        index = StreamIndex.from_spec(
            d.name, split, d.image_size, channels, d.strict, subset, config.train.seed
        )
        if one_pass or resolve_loader(config, len(index), index.channels) == "stream":
            return EvalSplit(
                f"{d.name}:{split}", split, d.image_size, mean or index.mean, std or index.std,
                index=index,
            )  # fmt: skip
    memory = load_split(
        d.name, split, data_dir=d.data_dir, image_size=d.image_size, channels=channels,
        synthetic_size=d.synthetic_size, seed=config.train.seed, strict=d.strict,
        subset=subset, download=d.download,
    )  # fmt: skip
    size = int(memory.images.shape[-1])
    return EvalSplit(
        f"{d.name}:{split}", split, size, mean or memory.mean, std or memory.std, memory=memory
    )


def open_image_files(
    folder: str, size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> EvalSplit:
    """Every image file under ``folder``, unlabelled, streamed (:class:`FileRecords`)."""
    index = StreamIndex(FileRecords(folder), size, channels)
    return EvalSplit(index.records.source, "images", size, mean, std, index=index)
