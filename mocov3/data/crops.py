"""Random resized crops from the full-resolution image: the paper's input for streamed data.

The reference applies ``RandomResizedCrop(224, scale=(0.08, 1))`` to each full-size image
(Chen, Xie, He, ICCV 2021, Sec. 4 and its ``main_moco.py``): a crop's scale and aspect ratio
are relative to the whole picture, and crops reach its borders. A streamed image is decoded
once; each view's box is drawn in the original image's coordinates with
``RandomResizedCrop.get_params``' rule (:func:`~mocov3.data.augment.sample_crop_boxes`: 10
tries, then the centre fallback) from the sample's counter-based streams, the same streams
the in-memory path crops with; the box is cut and resized to the output size with
antialiasing. The flip, colour, blur and solarisation then run batched on the device
(:meth:`~mocov3.data.augment.TwoViewAugment.__call__` with pre-cropped views). Every number
depends on (seed, epoch, sample index) only, so world-size invariance and bit-exact resume
hold as for in-memory data.

Reduced-size decoding: when every view's box is at least ``r`` times the output size on its
shorter side, an upright JPEG of a megapixel or more decodes at ``1 / r`` (r = 2, 4, 8;
libjpeg's DCT scaling) and the boxes are divided by ``r``, sub-pixel exact, before resizing:
the same crops from less decoding work (1.5-3x faster on 2-12 MP photos; ImageNet-sized
JPEGs decode at full size, where reducing would not pay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from mocov3.data.augment import crop_stream, sample_crop_boxes
from mocov3.data.decode import Header, decode_full, decode_reduced, read_header

REDUCTIONS = (8, 4, 2)  # libjpeg's DCT scalings, largest first
# Below about a megapixel a reduced decode saves less than it costs: libjpeg's entropy
# decoding, which no scaling skips, dominates, and PIL's sub-pixel resize is slower than
# torchvision's. Per image, one core, two views (benchmarks in docs/input.md): 500x375 at
# 112 px 1.05 ms full vs 1.19 reduced; 1000x750 at 224 px 3.3 vs 3.7; 2000x1500 at 224 px
# 11.5 vs 7.7; 4000x3000 at 224 px 60 vs 19.
REDUCE_MIN_PIXELS = 1_000_000
VIEWS = 2


class Box(NamedTuple):
    """A crop box in an image's pixel coordinates (floats: a reduced image's are fractional)."""

    top: float
    left: float
    height: float
    width: float

    def scaled(self, factor: int) -> Box:
        return Box(*(value / factor for value in self))


def view_boxes(
    keys: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> torch.Tensor:
    """float64 ``[B, 2, 4]`` (top, left, h, w) of both views of each sample, view ``v`` drawn
    from the crop streams of view ``v`` as the in-memory path draws them; ``heights`` and
    ``widths``: each image's full size. One call for a batch (per image, the ~20 small torch
    operations of the draw would cost as much as decoding it)."""
    views = [
        torch.stack(sample_crop_boxes(keys, crop_stream(v), heights, widths, scale, ratio), 1)
        for v in range(VIEWS)
    ]
    return torch.stack(views, dim=1)


def reduction(boxes: Sequence[Box], size: int) -> int:
    """The largest DCT reduction that keeps every box at least ``size`` pixels on its
    shorter side (so no view is upsampled from a reduced image); 1 when none does."""
    shortest = min(min(box.height, box.width) for box in boxes)
    return next((r for r in REDUCTIONS if shortest >= r * size), 1)


def resized_crop(image: torch.Tensor | Image.Image, box: Box, size: int) -> torch.Tensor:
    """``box`` of ``image`` resized to ``size`` x ``size`` (bilinear, antialiased), uint8
    ``[C, size, size]``: the crop-then-resize of ``RandomResizedCrop``.

    A tensor takes whole-pixel boxes (torchvision's ``resized_crop``, as the reference).
    A PIL image (a reduced decode) takes fractional boxes: PIL's resize with a sub-pixel
    ``box``, after cutting the pixels the box overlaps so that, like a crop, no pixel
    outside it contributes. Both are the same triangle filter widened by the scale factor
    (torchvision's antialiasing is a port of PIL's)."""
    if isinstance(image, torch.Tensor):
        top, left, h, w = (int(v) for v in box)
        return TF.resized_crop(
            image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True
        )
    x0, y0 = math.floor(box.left), math.floor(box.top)
    x1 = min(math.ceil(box.left + box.width), image.width)
    y1 = min(math.ceil(box.top + box.height), image.height)
    inside = (box.left - x0, box.top - y0, box.left + box.width - x0, box.top + box.height - y0)
    region = image.crop((x0, y0, x1, y1))
    out = region.resize((size, size), Image.Resampling.BILINEAR, box=inside)
    array = torch.from_numpy(np.array(out))
    return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1)


def cut_views(
    data: bytes, header: Header, boxes: torch.Tensor, size: int, channels: int, reduce: bool = True
) -> torch.Tensor:
    """The views ``boxes`` (``[V, 4]``, in the full image's coordinates) of one encoded image,
    uint8 ``[V, C, size, size]``, decoded once at full size or, when the boxes allow and
    ``reduce``, at a DCT-reduced size. Raises when the image cannot be decoded."""
    view_list = [Box(*row) for row in boxes.tolist()]
    large = header.height * header.width >= REDUCE_MIN_PIXELS
    factor = reduction(view_list, size) if reduce and large and header.reducible else 1
    if factor > 1:
        reduced, factor = decode_reduced(data, factor, channels)
        return torch.stack([resized_crop(reduced, box.scaled(factor), size) for box in view_list])
    image = decode_full(data, channels)
    if tuple(image.shape[-2:]) != (header.height, header.width):
        raise SizeMismatch(*image.shape[-2:])
    return torch.stack([resized_crop(image, box, size) for box in view_list])


class SizeMismatch(ValueError):
    """The decoded image's size is not the header's (a format whose orientation the header
    reading missed): the boxes must be drawn again for the real size."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__(f"decoded size {height}x{width} differs from the header's")
        self.header = Header(height, width, False)


def sample_boxes(
    key: torch.Tensor, header: Header, scale: Sequence[float], ratio: Sequence[float]
) -> torch.Tensor:
    """Both views' boxes ``[2, 4]`` of one sample (``key``: its int64 [1] key) in an image
    of the header's size: :func:`view_boxes` for a batch of one."""
    heights, widths = torch.tensor([header.height]), torch.tensor([header.width])
    return view_boxes(key, heights, widths, scale, ratio)[0]


def cut_sample(
    data: bytes,
    header: Header,
    key: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    channels: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    reduce: bool = True,
) -> torch.Tensor:
    """:func:`cut_views` of one sample's ``boxes``, drawn again from ``key`` for the decoded
    size when the header misled. Raises when the image cannot be decoded."""
    try:
        return cut_views(data, header, boxes, size, channels, reduce)
    except SizeMismatch as mismatch:
        boxes = sample_boxes(key, mismatch.header, scale, ratio)
        return cut_views(data, mismatch.header, boxes, size, channels, reduce)


def decode_views(
    data: bytes,
    key: torch.Tensor,
    size: int,
    channels: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    reduce: bool = True,
) -> torch.Tensor:
    """Both views of one encoded image (``key``: its int64 [1] augmentation key), uint8
    ``[2, C, size, size]``; what the streaming workers compute for each sample of a batch."""
    header = read_header(data)
    boxes = sample_boxes(key, header, scale, ratio)
    return cut_sample(data, header, key, boxes, size, channels, scale, ratio, reduce)


# --------------------------------------------------------------------------- on the device


# JPEGs decoded per nvJPEG call, a bound on the device memory full-size images take at once:
# 32 twelve-megapixel photos are about 1.2 GB (the best chunk for speed is not measured yet)
DEVICE_DECODE_CHUNK = 32


@dataclass
class Pending:
    """A JPEG left for the main process to decode on the device: its batch position, bytes
    and both views' boxes."""

    position: int
    data: bytes
    boxes: torch.Tensor


def decode_pending(
    views: torch.Tensor, pending: list[Pending], size: int, channels: int
) -> list[Pending]:
    """Decode the batch's pending JPEGs on ``views``' device (nvJPEG on CUDA, through
    torchvision) and cut their views into ``views``; returns the items the device could
    not decode (the caller decodes them on the CPU). ``DEVICE_DECODE_CHUNK`` images at a
    time, so that full-size decoded images never hold more than that much device memory."""
    failed = []
    for start in range(0, len(pending), DEVICE_DECODE_CHUNK):
        chunk = pending[start : start + DEVICE_DECODE_CHUNK]
        for item, image in zip(chunk, _decode_chunk(chunk, channels, views.device), strict=True):
            if image is None:
                failed.append(item)
                continue
            for view, box in enumerate(item.boxes.tolist()):
                views[item.position, view] = resized_crop(image, Box(*box), size)
    return failed


def _decode_chunk(
    chunk: list[Pending], channels: int, device: torch.device
) -> list[torch.Tensor | None]:
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    encoded = [torch.frombuffer(bytearray(p.data), dtype=torch.uint8) for p in chunk]
    try:
        return list(decode_jpeg(encoded, mode=mode, device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # one refused JPEG fails the whole list: decode them one by one
        return [_decode_one(data, mode, device) for data in encoded]


def _decode_one(
    data: torch.Tensor, mode: ImageReadMode, device: torch.device
) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # an encoding nvJPEG does not support: libjpeg may still read it
        return None
