"""Tests for the batched two-view augmentation, checked against torchvision's per-image ops."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from mocov3.config import AugmentConfig
from mocov3.data import augment as aug
from mocov3.data import counters
from mocov3.data.augment import (
    STREAMS_PER_VIEW,
    TwoViewAugment,
    crop_flip_views,
    sample_crop_boxes,
)
from mocov3.data.counters import counter_uniform, counter_uniforms, sample_keys

# Everything off and the crop the whole image: the pipeline is then exactly a normalisation.
OFF = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0, 0.0),
    solarize_p=(0.0, 0.0),
)
Z = 4.5  # z-score for the statistical checks: false alarm ~1e-5 per check


def _off(**changes: object) -> AugmentConfig:
    return dataclasses.replace(OFF, **changes)


def _images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), generator=generator).to(torch.uint8)


def _raw(config: AugmentConfig, size: int, channels: int) -> TwoViewAugment:
    """An augmenter that leaves the [0, 1] range as is (mean 0, std 1)."""
    return TwoViewAugment(config, size, [0.0] * channels, [1.0] * channels)


def _close_to(value: float, expected: float, std: float, n: int) -> bool:
    return abs(value - expected) <= Z * std / math.sqrt(n)


# ----------------------------------------------------------------------------- hashing


def _splitmix64_reference(x: int) -> int:
    """Plain-Python unsigned splitmix64 finaliser, to check the signed-int64 torch version."""
    mask = (1 << 64) - 1
    x &= mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_mix64_matches_unsigned_reference_including_negative_words() -> None:
    values = [0, 1, 12345, -1, -(2**63), 2**63 - 1, -987654321987654321]
    got = counters._mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    want = [counters._signed64(_splitmix64_reference(v)) for v in values]
    assert got == want


def test_counter_uniform_range_mean_and_independent_streams() -> None:
    n = 10_000
    keys = sample_keys(0, 0, torch.arange(n))
    streams = [0, 1, 2, 33, STREAMS_PER_VIEW, STREAMS_PER_VIEW + 33]
    values = torch.stack([counter_uniform(keys, s) for s in streams])
    assert values.dtype == torch.float32
    assert values.min() >= 0.0 and values.max() < 1.0
    for row in values:
        assert _close_to(row.mean().item(), 0.5, math.sqrt(1 / 12), n)
    corr = torch.corrcoef(values.double())
    off_diagonal = corr - torch.eye(len(streams), dtype=torch.float64)
    assert off_diagonal.abs().max() < 0.05
    # Neighbouring keys are uncorrelated too (sample i vs sample i + 1, same stream).
    lagged = torch.corrcoef(torch.stack([values[0, :-1], values[0, 1:]]).double())[0, 1]
    assert abs(lagged) < 0.05
    # The batched form is the same numbers.
    assert torch.equal(counter_uniforms(keys, streams).T, values)


def test_sample_keys_depend_on_seed_epoch_and_index_only() -> None:
    indices = torch.arange(1000)
    keys = sample_keys(3, 7, indices)
    assert keys.dtype == torch.int64 and keys.shape == (1000,)
    assert keys.unique().numel() == 1000
    assert torch.equal(keys, sample_keys(3, 7, indices))
    # A shard of the dataset (rank 1 of 4) gets exactly the same keys for the same indices.
    assert torch.equal(sample_keys(3, 7, indices[1::4]), keys[1::4])
    for other in (sample_keys(4, 7, indices), sample_keys(3, 8, indices)):
        assert (other != keys).float().mean() > 0.99


# ----------------------------------------------------------------------------- crops


def _torchvision_boxes(size: int, n: int, scale, ratio) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.zeros(1, size, size)
    return torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("size", [28, 224])
def test_crop_box_statistics_match_torchvision(size: int) -> None:
    # Ours are cheap, torchvision's cost ~40 us each: 20k vs 8k keeps the test under 1 s and
    # still resolves a uniform-in-ratio (instead of log-ratio) bug, a 0.025 shift in the mean.
    n, m = 20_000, 8000
    cfg = AugmentConfig()
    keys = sample_keys(1, 0, torch.arange(n))
    top, left, h, w = sample_crop_boxes(keys, 0, size, size, cfg.crop_scale, cfg.crop_ratio)
    ours = torch.stack([top, left, h, w], 1)
    theirs = _torchvision_boxes(size, m, cfg.crop_scale, cfg.crop_ratio)
    # Boxes are whole pixels inside the image.
    assert torch.equal(ours, ours.round())
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    for name, stat in (
        ("area fraction", lambda b: b[:, 2] * b[:, 3] / size**2),
        ("log aspect ratio", lambda b: torch.log(b[:, 3] / b[:, 2])),
        ("relative centre x", lambda b: (b[:, 1] + b[:, 3] / 2) / size),
    ):
        a, b = stat(ours), stat(theirs)
        tolerance = Z * math.sqrt(a.var() / n + b.var() / m)
        assert abs(a.mean() - b.mean()) < tolerance, name
        # Same spread as well, not just the same mean (a 25% change would be caught).
        assert abs(a.std() / b.std() - 1.0) < 0.1, name


def test_crop_fallback_is_torchvisions_centre_crop() -> None:
    # No attempt can fit: aspect ratio >= 3 with >= 90% of the area of a square image.
    scale, ratio = (0.9, 1.0), (3.0, 4.0)
    keys = sample_keys(0, 0, torch.arange(16))
    top, left, h, w = sample_crop_boxes(keys, 0, 28, 28, scale, ratio)
    expected = RandomResizedCrop.get_params(torch.zeros(1, 28, 28), list(scale), list(ratio))
    for box in zip(top.tolist(), left.tolist(), h.tolist(), w.tolist(), strict=True):
        assert box == tuple(float(v) for v in expected)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_matches_torchvision_resized_crop(flip: bool) -> None:
    images = _images(12, 3, 24)
    keys = sample_keys(0, 0, torch.arange(12))
    cfg = dataclasses.replace(OFF, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3))
    cfg = dataclasses.replace(cfg, flip_p=1.0 if flip else 0.0)
    out = _raw(cfg, 16, 3).view(images, keys, 1)
    boxes = sample_crop_boxes(keys, STREAMS_PER_VIEW, 24, 24, cfg.crop_scale, cfg.crop_ratio)
    for i in range(12):
        top, left, h, w = (int(b[i]) for b in boxes)
        want = TF.resized_crop(images[i].float() / 255, top, left, h, w, [16, 16], antialias=False)
        if flip:
            want = TF.hflip(want)
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)


def test_flip_rate_is_half() -> None:
    n = 2000
    images = _images(n, 1, 6)
    out = _raw(_off(flip_p=0.5), 6, 1).view(images, sample_keys(0, 0, torch.arange(n)), 0)
    x = images.float() / 255
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert (same | mirrored).all()
    assert _close_to(mirrored.float().mean().item(), 0.5, 0.5, n)


# ----------------------------------------------------------------------------- colour


def _matches(out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (out - want).abs().amax(dim=(1, 2, 3)) < 1e-6


def test_grayscale_rate_values_and_independence_from_flip() -> None:
    n = 4000
    images = _images(n, 3, 6)
    out = _raw(_off(grayscale_p=0.2, flip_p=0.5), 6, 3).view(
        images, sample_keys(0, 0, torch.arange(n)), 0
    )
    x = images.float() / 255
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    grey = _matches(out, luma) | _matches(out, luma.flip(-1))
    colour = _matches(out, x) | _matches(out, x.flip(-1))
    flipped = _matches(out, x.flip(-1)) | _matches(out, luma.flip(-1))
    assert (grey ^ colour).all()  # every output is exactly one of the four
    assert _close_to(grey.float().mean().item(), 0.2, 0.4, n)
    # Separate decisions must use separate streams: P(grey and flipped) = 0.2 * 0.5.
    assert _close_to((grey & flipped).float().mean().item(), 0.1, 0.3, n)


def test_solarize_rate_per_view() -> None:
    n = 2000
    images = torch.full((n, 1, 4, 4), 200, dtype=torch.uint8)
    keys = sample_keys(0, 0, torch.arange(n))
    view0, view1 = _raw(_off(solarize_p=(0.0, 0.2)), 4, 1)(images, keys)
    x = 200 / 255
    assert torch.allclose(view0, torch.full_like(view0, x))
    solarized = (view1[:, 0, 0, 0] - (1 - x)).abs() < 1e-6
    assert (solarized | ((view1[:, 0, 0, 0] - x).abs() < 1e-6)).all()
    assert _close_to(solarized.float().mean().item(), 0.2, 0.4, n)


def test_solarize_threshold_is_pil_128() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    out = aug.solarize(x.float() / 255)
    want = TF.solarize(x, 128).float() / 255
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_factor_range_is_uniform(channels: int) -> None:
    n = 3000
    cfg = _off(jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    images = torch.full((n, channels, 4, 4), 100, dtype=torch.uint8)
    out = _raw(cfg, 4, channels).view(images, sample_keys(0, 0, torch.arange(n)), 0)
    ratio = out / (100 / 255)
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio))  # one factor per image
    ratio = ratio[:, 0, 0, 0]
    assert ratio.min() >= 0.6 - 1e-5 and ratio.max() <= 1.4 + 1e-5
    assert ratio.min() < 0.62 and ratio.max() > 1.38
    width = 0.8
    assert _close_to(ratio.mean().item(), 1.0, width / math.sqrt(12), n)
    assert _close_to(ratio.var().item(), width**2 / 12, width**2 / math.sqrt(180), n)


def _factors(n: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    uniform = torch.rand(4, n, generator=generator)
    # brightness, contrast in [0.6, 1.4], saturation in [0.8, 1.2], hue in [-0.1, 0.1]
    low = torch.tensor([0.6, 0.6, 0.8, -0.1]).view(4, 1)
    width = torch.tensor([0.8, 0.8, 0.4, 0.2]).view(4, 1)
    return tuple(low + width * uniform)


def test_colour_ops_match_torchvision_per_image() -> None:
    n = 8
    x = _images(n, 3, 10).float() / 255
    brightness, contrast, saturation, hue = _factors(n)
    ops = (
        (aug.adjust_brightness, TF.adjust_brightness, brightness, 1e-6),
        # torchvision's tensor grayscale uses 0.2989 for red, PIL and this module 0.299.
        (aug.adjust_contrast, TF.adjust_contrast, contrast, 1e-4),
        (aug.adjust_saturation, TF.adjust_saturation, saturation, 1e-4),
        (aug.adjust_hue, TF.adjust_hue, hue, 1e-5),
    )
    for ours, theirs, factor, atol in ops:
        got = ours(x, factor)
        want = torch.stack([theirs(x[i], factor[i].item()) for i in range(n)])
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=ours.__name__)


def test_hsv_round_trip_and_torchvision_hsv() -> None:
    x = _images(4, 3, 8).float() / 255
    x[0] = 0.5  # grey pixels: hue and saturation 0
    hsv = aug.rgb_to_hsv(x)
    from torchvision.transforms import _functional_tensor as FT

    torch.testing.assert_close(hsv, FT._rgb2hsv(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(aug.hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(aug.hsv_to_rgb(hsv), FT._hsv2rgb(hsv), atol=1e-6, rtol=0)


def test_color_jitter_applies_each_samples_own_order() -> None:
    permutations = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders
    n = len(permutations)
    x = _images(n, 3, 8).float() / 255
    factors = _factors(n)
    apply = torch.ones(n, dtype=torch.bool)
    apply[-1] = False
    got = aug.color_jitter(x.clone(), apply, permutations, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        want = x[i]
        for op in permutations[i].tolist() if apply[i] else []:
            want = ops[op](want, factors[op][i].item())
        torch.testing.assert_close(got[i], want, atol=2e-4, rtol=0, msg=f"order {i}")
    # The order matters: brightness-then-contrast differs from contrast-then-brightness here.
    assert not torch.allclose(got[0], got[6], atol=1e-3)


def test_jitter_order_is_a_uniform_random_permutation() -> None:
    n = 12_000
    keys = sample_keys(0, 0, torch.arange(n))
    augment = TwoViewAugment(AugmentConfig(), 8, [0.5] * 3, [0.25] * 3)
    apply, order, (brightness, contrast, saturation, hue) = augment.jitter_params(keys, 0)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert counts.numel() == 24
    assert all(_close_to(c / n, 1 / 24, math.sqrt(1 / 24 * 23 / 24), n) for c in counts.tolist())
    assert _close_to(apply.float().mean().item(), 0.8, 0.4, n)
    for factor, low, high in (
        (brightness, 0.6, 1.4),
        (contrast, 0.6, 1.4),
        (saturation, 0.8, 1.2),
        (hue, -0.1, 0.1),
    ):
        assert factor.min() >= low and factor.max() <= high
        assert _close_to(factor.mean().item(), (low + high) / 2, (high - low) / math.sqrt(12), n)
    # Factors are drawn independently of each other.
    corr = torch.corrcoef(torch.stack([brightness, contrast, saturation, hue]).double())
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 0.05


def test_grey_images_skip_saturation_and_hue() -> None:
    n = 64
    images = _images(n, 1, 8)
    cfg = _off(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.9, hue=0.5)
    out = _raw(dataclasses.replace(cfg, grayscale_p=1.0), 8, 1).view(
        images, sample_keys(0, 0, torch.arange(n)), 0
    )
    assert torch.equal(out, images.float() / 255)


# ----------------------------------------------------------------------------- blur


def test_blur_with_fixed_sigma_matches_torchvision() -> None:
    images = _images(4, 3, 20)
    cfg = _off(blur_p=(1.0, 1.0), blur_sigma=(1.0, 1.0))
    out = _raw(cfg, 20, 3).view(images, sample_keys(0, 0, torch.arange(4)), 0)
    radius = math.ceil(3 * 1.0)
    want = TF.gaussian_blur(images.float() / 255, [2 * radius + 1] * 2, [1.0, 1.0])
    torch.testing.assert_close(out[..., 4:-4, 4:-4], want[..., 4:-4, 4:-4], atol=1e-4, rtol=0)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)  # reflect padding at the border too


def test_blur_uses_each_samples_own_sigma() -> None:
    x = _images(5, 3, 16).float() / 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    radius = aug.blur_radius(2.0, 16)
    assert radius == 6 and aug.blur_radius(2.0, 8) == 3  # capped so 2r + 1 <= 8
    got = aug.gaussian_blur(x, sigma, radius)
    for i in range(5):
        size = 2 * radius + 1
        want = TF.gaussian_blur(x[i], [size, size], [sigma[i].item()] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_blur_rate_per_view() -> None:
    n = 2000
    images = _images(n, 1, 8)
    # sigma >= 1 so that every blurred image visibly changes (sigma 0.1 is a float32 no-op).
    cfg = _off(blur_p=(1.0, 0.1), blur_sigma=(1.0, 2.0))
    view0, view1 = _raw(cfg, 8, 1)(images, sample_keys(0, 0, torch.arange(n)))
    x = images.float() / 255
    changed0 = (view0 - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    changed1 = (view1 - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert changed0.all()
    assert _close_to(changed1.float().mean().item(), 0.1, 0.3, n)


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("channels", [1, 3])
def test_deterministic_and_independent_of_batch_composition(channels: int) -> None:
    images = _images(8, channels, 20)
    keys = sample_keys(5, 2, torch.arange(100, 108))
    augment = TwoViewAugment(AugmentConfig(), 16, [0.5] * channels, [0.25] * channels)
    view0, view1 = augment(images, keys)
    again0, again1 = augment(images, keys)
    assert torch.equal(view0, again0) and torch.equal(view1, again1)
    for part in (slice(0, 4), slice(4, 8), slice(1, 8, 3)):
        part0, part1 = augment(images[part], keys[part])
        assert torch.equal(part0, view0[part]) and torch.equal(part1, view1[part])
    # The same sample at another position in the batch: same views.
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled0, _ = augment(images[order], keys[order])
    assert torch.equal(shuffled0, view0[order])
    assert not torch.allclose(view0, view1)


def test_dense_and_gathered_masking_agree() -> None:
    images = _images(16, 3, 12)
    keys = sample_keys(0, 0, torch.arange(16))
    augment = TwoViewAugment(AugmentConfig(), 12, [0.5] * 3, [0.25] * 3)
    augment.dense_masking = False
    sparse = augment(images, keys)
    augment.dense_masking = True
    dense = augment(images, keys)
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_different_keys_give_different_crops_and_views() -> None:
    keys = sample_keys(0, 0, torch.arange(200))
    boxes = torch.stack(sample_crop_boxes(keys, 0, 224, 224, (0.08, 1.0), (0.75, 4 / 3)), 1)
    assert boxes.unique(dim=0).shape[0] > 190
    images = _images(1, 3, 20).expand(2, 3, 20, 20)
    two_keys = sample_keys(0, 0, torch.tensor([0, 1]))
    view0, view1 = TwoViewAugment(AugmentConfig(), 16, [0.5] * 3, [0.25] * 3)(images, two_keys)
    assert not torch.allclose(view0[0], view0[1])
    assert not torch.allclose(view0[0], view1[0])


def test_shapes_and_dtypes() -> None:
    keys = sample_keys(0, 0, torch.arange(4))
    grey = TwoViewAugment(AugmentConfig(), 28, [0.286], [0.353])(_images(4, 1, 28), keys)
    for view in grey:
        assert view.dtype == torch.float32 and view.shape == (4, 1, 28, 28)
        assert torch.isfinite(view).all()
    rgb = TwoViewAugment(AugmentConfig(), 32, [0.5] * 3, [0.25] * 3)(_images(4, 3, 40), keys)
    for view in rgb:
        assert view.dtype == torch.float32 and view.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError):
        TwoViewAugment(AugmentConfig(), 28, [0.5] * 3, [0.25] * 3)(_images(4, 1, 28), keys)


@pytest.mark.parametrize(
    ("channels", "mean", "std"), [(1, [0.3], [0.4]), (3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])]
)
def test_normalisation_only_when_everything_is_off(
    channels: int, mean: list[float], std: list[float]
) -> None:
    images = _images(4, channels, 28)
    keys = sample_keys(0, 0, torch.arange(4))
    view0, view1 = TwoViewAugment(OFF, 28, mean, std)(images, keys)
    shape = (1, channels, 1, 1)
    want = (images.float() / 255 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    torch.testing.assert_close(view0, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(view1, want, atol=1e-5, rtol=0)


def test_resize_only_matches_torchvision_resize() -> None:
    images = _images(4, 3, 40)
    keys = sample_keys(0, 0, torch.arange(4))
    out = _raw(OFF, 32, 3).view(images, keys, 0)
    want = TF.resize(images.float() / 255, [32, 32], antialias=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_float_input_is_not_modified() -> None:
    images = _images(4, 3, 12).float()
    before = images.clone()
    augment = TwoViewAugment(AugmentConfig(), 12, [0.5] * 3, [0.25] * 3)
    augment(images, sample_keys(0, 0, torch.arange(4)))
    assert torch.equal(images, before)


def test_crop_flip_views_at_scale_one_is_the_whole_image_or_its_mirror():
    """The one-view augmentation of the probe and fine-tuning (crop_min 1: flip only)."""
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    keys = torch.arange(16)
    # ratio (3/4, 4/3) contains 1, so scale (1, 1) leaves the whole square image
    out = crop_flip_views(images, keys, (1.0, 1.0), (0.0,), (1.0,))
    plain = images.float() / 255
    same = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - plain.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    cropped = crop_flip_views(images, keys, (0.25, 1.0), (0.0,), (1.0,))
    assert not torch.allclose(cropped, out)
