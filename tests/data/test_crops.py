"""Tests for mocov3.data.crops: full-resolution random crops against torchvision's."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from mocov3.config import AugmentConfig
from mocov3.data.augment import TwoViewAugment
from mocov3.data.counters import sample_keys
from mocov3.data.crops import (
    Box,
    Pending,
    SizeMismatch,
    cut_views,
    decode_pending,
    decode_views,
    reduction,
    resized_crop,
    view_boxes,
)
from mocov3.data.decode import Header, decode_full, read_header

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
DRAWS = 20_000
# Two-sample Kolmogorov-Smirnov: with n = m = 20,000 the statistic exceeds
# 1.95 * sqrt(2 / 20,000) = 0.0195 with probability 0.001 when both draw from one law.
KS_LIMIT = 0.0195


def photo(width: int, height: int, quality: int = 90) -> bytes:
    """A real photograph (scikit-image's coffee cup) cut to an ImageNet-like size, as JPEG."""
    skimage_data = pytest.importorskip("skimage.data")
    image = Image.fromarray(skimage_data.coffee()).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two
    empirical distribution functions."""
    both = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), both, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), both, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def torchvision_boxes(height: int, width: int, n: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    return np.array([RandomResizedCrop.get_params(image, SCALE, RATIO) for _ in range(n)])


def our_boxes(height: int, width: int, n: int) -> np.ndarray:
    keys = sample_keys(0, 0, torch.arange(n))
    size = torch.full((n,), float(height)), torch.full((n,), float(width))
    boxes = view_boxes(keys, size[0], size[1], SCALE, RATIO)
    return boxes[:, 0].numpy()  # view 0; view 1 draws from other streams alike


@pytest.mark.parametrize("height, width", [(375, 500), (1000, 100)])
def test_crop_boxes_follow_torchvision_get_params(height: int, width: int) -> None:
    """Area fraction and aspect ratio of 20,000 boxes against torchvision's; the 1000x100
    image (aspect 0.1, far outside 3/4..4/3) sends most draws to the centre fallback."""
    theirs, ours = torchvision_boxes(height, width, DRAWS), our_boxes(height, width, DRAWS)
    for boxes in (theirs, ours):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    area = [b[:, 2] * b[:, 3] / (height * width) for b in (theirs, ours)]
    aspect = [b[:, 3] / b[:, 2] for b in (theirs, ours)]
    assert ks_statistic(*area) < KS_LIMIT
    assert ks_statistic(*aspect) < KS_LIMIT
    if height == 1000:
        # torchvision's centre fallback: the whole width, aspect clamped to 3/4, centred
        centre = np.array([433, 0, 133, 100])
        fallback = [float(np.mean((b == centre).all(axis=1))) for b in (theirs, ours)]
        assert 0.5 < fallback[0] < 1.0  # the fallback path is really exercised
        # two proportions of 20,000: 4 standard errors apart at most
        se = math.sqrt(2 * fallback[0] * (1 - fallback[0]) / DRAWS)
        assert abs(fallback[0] - fallback[1]) < 4 * se


def test_both_views_draw_independent_boxes() -> None:
    keys = sample_keys(3, 1, torch.arange(2000))
    boxes = view_boxes(keys, torch.full((2000,), 375.0), torch.full((2000,), 500.0), SCALE, RATIO)
    assert not torch.equal(boxes[:, 0], boxes[:, 1])
    first, second = [(boxes[:, v, 2] * boxes[:, v, 3]).numpy() for v in (0, 1)]
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.1


def test_a_view_equals_the_references_pil_crop_within_one_grey_level() -> None:
    """The reference crops with PIL (``RandomResizedCrop`` on a PIL image: crop, then
    bilinear resize with PIL's antialiasing); our view of the same box, from torchvision's
    decoder and tensor resize, is within one grey level of it."""
    data = photo(500, 375)
    header = read_header(data)
    keys = sample_keys(0, 0, torch.arange(40))
    boxes = view_boxes(keys, torch.full((40,), 375.0), torch.full((40,), 500.0), SCALE, RATIO)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    for i in range(40):
        views = cut_views(data, header, boxes[i], 112, 3, reduce=False)
        for view, box in enumerate(boxes[i].tolist()):
            top, left, h, w = (int(v) for v in box)
            reference = TVF.resized_crop(
                pil, top, left, h, w, [112, 112], InterpolationMode.BILINEAR
            )
            expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1)
            assert (views[view].int() - expected.int()).abs().max() <= 1


def test_fractional_boxes_on_a_pil_image_match_whole_pixel_crops() -> None:
    """The reduced path's sub-pixel resize, given a whole-pixel box, is torchvision's crop
    within one grey level (the same filter; only the rounding differs)."""
    data = photo(500, 375)
    tensor = decode_full(data, 3)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    for box in (Box(10, 20, 300, 280), Box(0, 0, 375, 500), Box(200, 300, 90, 120)):
        ours = resized_crop(pil, box, 96)
        theirs = resized_crop(tensor, box, 96)
        assert ours.shape == theirs.shape == (3, 96, 96)
        assert (ours.int() - theirs.int()).abs().max() <= 1


def test_reduction_needs_every_box_large_enough() -> None:
    assert reduction([Box(0, 0, 900, 1000), Box(0, 0, 460, 500)], 224) == 2
    assert reduction([Box(0, 0, 900, 1000), Box(0, 0, 440, 500)], 224) == 1
    assert reduction([Box(0, 0, 1800, 1900)], 224) == 8
    assert reduction([Box(0, 0, 1000, 1000)], 224) == 4


def test_reduced_decoding_stays_close_to_full_decoding() -> None:
    """A 1600x1200 photo cut at 64 px: most crops decode at 1/2-1/8 size. Each view stays
    within 1.5 grey levels (mean absolute difference) of the full-size decode's."""
    data = photo(1600, 1200)
    header = read_header(data)
    keys = sample_keys(0, 0, torch.arange(60))
    boxes = view_boxes(keys, torch.full((60,), 1200.0), torch.full((60,), 1600.0), SCALE, RATIO)
    reduced = [reduction([Box(*b) for b in boxes[i].tolist()], 64) for i in range(60)]
    assert sum(r > 1 for r in reduced) > 30 and 8 in reduced
    for i in range(60):
        full = cut_views(data, header, boxes[i], 64, 3, reduce=False).float()
        fast = cut_views(data, header, boxes[i], 64, 3, reduce=True).float()
        assert (full - fast).abs().mean() < 1.5, (i, reduced[i])


def test_exif_rotated_jpeg_is_cropped_as_viewed() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    stored = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    header = read_header(buffer.getvalue())
    assert (header.height, header.width, header.reducible) == (60, 40, False)
    views = decode_views(buffer.getvalue(), sample_keys(0, 0, torch.arange(1)), 16, 3, SCALE, RATIO)
    assert views.shape == (2, 3, 16, 16)


def test_grey_and_png_images_cut_to_the_requested_channels() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(80, dtype=np.uint8), (60, 1))).save(buffer, "PNG")
    key = sample_keys(0, 0, torch.arange(1))
    assert decode_views(buffer.getvalue(), key, 24, 1, SCALE, RATIO).shape == (2, 1, 24, 24)
    colour = decode_views(buffer.getvalue(), key, 24, 3, SCALE, RATIO)
    assert colour.shape == (2, 3, 24, 24) and torch.equal(colour[:, 0], colour[:, 2])


def test_device_decoding_cuts_the_same_views() -> None:
    """The ``data.decode: gpu`` path (decode in the main process with torchvision's
    ``decode_jpeg`` on the views' device, then the same crop) gives the worker's views; on
    this CPU the device is the CPU, on a GPU nvJPEG rounds within a grey level or two."""
    datas = [photo(500, 375, q) for q in (85, 90, 95)]
    keys = sample_keys(0, 0, torch.arange(3))
    boxes = view_boxes(keys, torch.full((3,), 375.0), torch.full((3,), 500.0), SCALE, RATIO)
    views = torch.zeros(3, 2, 3, 64, 64, dtype=torch.uint8)
    broken = Pending(2, datas[2][:200], boxes[2])  # cut short: refused
    pending = [Pending(0, datas[0], boxes[0]), Pending(1, datas[1], boxes[1]), broken]
    assert decode_pending(views, pending, 64, 3) == [broken]  # left for the CPU
    for i in (0, 1):
        expected = cut_views(datas[i], read_header(datas[i]), boxes[i], 64, 3, reduce=False)
        assert torch.equal(views[i], expected)


def test_precropped_views_augment_like_whole_images() -> None:
    """With crops that keep the whole (square) image, the pre-cropped path (flip and colour
    on the device) gives the in-memory path's views: same flip and colour streams."""
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    augment = TwoViewAugment(config, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 16, 16), generator=generator, dtype=torch.uint8)
    keys = sample_keys(0, 0, torch.arange(32))
    whole = augment(images, keys)
    cropped = augment(torch.stack([images, images], dim=1), keys)
    for a, b in zip(whole, cropped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="16x16"):
        augment(torch.zeros(2, 2, 3, 8, 8, dtype=torch.uint8), keys[:2])


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "MPO", "JPEG"])
def test_exif_rotation_of_every_format_is_read_from_the_header(fmt: str) -> None:
    """The decoders rotate PNG, WebP and MPO (a camera's JPEG) by their EXIF orientation as
    well as JPEG: the header must say the rotated size, or every view would be drawn for
    the wrong shape."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    stored = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif.tobytes())
    data = buffer.getvalue()
    header = read_header(data)
    assert tuple(decode_full(data, 3).shape[1:]) == (header.height, header.width) == (60, 40)
    views = decode_views(data, sample_keys(0, 0, torch.arange(1)), 16, 3, SCALE, RATIO)
    assert views.shape == (2, 3, 16, 16)


def test_a_header_that_misleads_gets_boxes_for_the_decoded_size() -> None:
    """Whatever the header says, the views are drawn for the decoded image's real size."""
    data = photo(500, 375)
    wrong = Header(200, 100, False)
    keys = sample_keys(0, 0, torch.arange(1))
    boxes = view_boxes(keys, torch.tensor([200.0]), torch.tensor([100.0]), SCALE, RATIO)[0]
    with pytest.raises(SizeMismatch) as mismatch:
        cut_views(data, wrong, boxes, 32, 3)
    assert (mismatch.value.header.height, mismatch.value.header.width) == (375, 500)


def test_device_decoding_goes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most DEVICE_DECODE_CHUNK JPEGs per decode call (a bound on device memory), and a
    refused one only costs its own chunk a one-by-one retry."""
    from mocov3.data import crops

    calls: list[int] = []
    real = crops.decode_jpeg

    def counting(data: object, **kwargs: object) -> object:
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kwargs)

    monkeypatch.setattr(crops, "decode_jpeg", counting)
    monkeypatch.setattr(crops, "DEVICE_DECODE_CHUNK", 2)
    datas = [photo(120, 90, q) for q in (80, 85, 90, 95, 97)]
    keys = sample_keys(0, 0, torch.arange(5))
    boxes = view_boxes(keys, torch.full((5,), 90.0), torch.full((5,), 120.0), SCALE, RATIO)
    pending = [Pending(i, datas[i], boxes[i]) for i in range(5)]
    pending[3] = Pending(3, datas[3][:100], boxes[3])  # cut short: refused
    views = torch.zeros(5, 2, 3, 32, 32, dtype=torch.uint8)
    assert decode_pending(views, pending, 32, 3) == [pending[3]]
    assert calls == [2, 2, 1, 1, 1]  # chunks of 2, the second retried one by one
    for i in (0, 1, 2, 4):
        expected = cut_views(datas[i], read_header(datas[i]), boxes[i], 32, 3, reduce=False)
        assert torch.equal(views[i], expected)
