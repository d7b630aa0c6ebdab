"""Batched, counter-based two-view augmentation (MoCo v3, Chen, Xie, He, ICCV 2021).

The paper (Sec. 4, "Implementation details") uses the asymmetric BYOL recipe (Grill et al.,
2020) for its two views: RandomResizedCrop (scale 0.08-1), horizontal flip, colour jitter
(0.4, 0.4, 0.2, 0.1) applied with p 0.8, grayscale with p 0.2, Gaussian blur with p 1.0 / 0.1
and solarisation with p 0.0 / 0.2 for view 1 / view 2. This module applies that recipe to a
whole uint8 batch at once, on whatever device the batch lives on, with one set of independent
random parameters per sample and no Python loop over samples.

Randomness. Every random number is ``counter_uniform(key, stream)``: a splitmix64 hash of a
per-sample key and a fixed stream id. Keys come from ``sample_keys(seed, epoch, index)``, so a
sample's two views depend only on (seed, epoch, dataset index): they are the same whether the
run uses 1 or N processes and whatever batch the sample lands in (world-size invariance), and
they need no generator state to checkpoint. Each decision has its own stream and the two views
use disjoint stream ranges, so turning one augmentation off does not change the others.

How the ops map onto torchvision's per-image transforms:

* crop + resize + flip: one ``grid_sample`` with a per-sample sampling grid that reproduces
  ``resized_crop(..., antialias=False)`` (bilinear, half-pixel centres, edge clamping) and
  mirrors the x axis for flipped samples. The BYOL pipeline flips after the colour ops, blur
  and solarize, but all of those commute with a mirror, so folding it into the crop changes
  nothing.
  Downscaling is not antialiased (torchvision's PIL path is).
* colour jitter: brightness, contrast, saturation and hue in a random order per sample, as
  ``ColorJitter`` does; brightness/contrast/saturation are the same blends as torchvision's
  tensor ops, hue goes through batched RGB -> HSV -> RGB.
* grayscale: ITU-R 601-2 luma (0.299, 0.587, 0.114), replicated to 3 channels.
* Gaussian blur: per-sample sigma, separable, reflect padding, kernel radius
  ``ceil(3 * sigma_max)`` capped so the kernel fits the image.
* solarize: ``x >= 0.5 -> 1 - x`` on [0, 1] floats (PIL's threshold 128 on uint8 values).

All ops work on float32 in [0, 1] with no requantisation to uint8 between them (the reference
code goes through PIL uint8 after each op); the result is then normalised with mean/std.

How grey images are handled. A 1-channel image has no chroma, so saturation, hue and
grayscale are the identity on it (torchvision agrees: its saturation/hue return a 1-channel
image unchanged, and its grayscale of a grey image is the image); they are skipped. Brightness
and contrast still apply, the contrast mean being the image's own mean. Their random numbers
are still drawn, so a grey and an RGB run see the same crops, flips and factors.

Throughput, batch 256, both views, default recipe (best of 5 runs of 10 batches;
``python benchmarks/augment_throughput.py`` re-measures):

* 2 CPU cores (shared with other jobs, so +-25%), torch 2.14: 28x28 grey ~26,600 img/s
  (1 thread ~23,700); 32x32 RGB ~6,400 img/s (1 thread ~5,500). Hue (HSV round trip) and
  the blur dominate RGB.
* one H200, torch 2.11 (launch-bound at this batch size): 28x28 grey ~28,000 img/s, 32x32
  RGB ~14,000, 224x224 RGB ~7,200 with ``dense_masking`` (default on GPU) and ~12,100 with
  gathered masking. CUDA outputs match the CPU's to 1.1e-5 (in normalised units).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mocov3.config import AugmentConfig
from mocov3.data.counters import counter_uniform, counter_uniforms

# ----------------------------------------------------------------------------- streams

# Fixed stream ids inside one view; view v adds v * STREAMS_PER_VIEW, so views are disjoint.
_CROP_ATTEMPTS = 10
_STREAM_CROP = 0  # 2 per attempt (area, log-ratio) + 2 (top, left): 0 .. 21
_CROP_STREAMS = 2 * _CROP_ATTEMPTS + 2
_STREAM_FLIP = 32
_STREAM_JITTER = 33
_STREAM_ORDER = 34  # 4 streams: 34 .. 37
_STREAM_BRIGHTNESS = 38
_STREAM_CONTRAST = 39
_STREAM_SATURATION = 40
_STREAM_HUE = 41
_STREAM_GRAYSCALE = 42
_STREAM_BLUR = 43
_STREAM_SIGMA = 44
_STREAM_SOLARIZE = 45
STREAMS_PER_VIEW = 64
_FIRST_STREAM, _LAST_STREAM = _STREAM_FLIP, _STREAM_SOLARIZE  # drawn in one batch
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


def crop_stream(view: int) -> int:
    """The first crop stream of view ``view``: where both crop paths draw its box from."""
    return view * STREAMS_PER_VIEW + _STREAM_CROP


def flip_stream(view: int) -> int:
    """The flip stream of view ``view``: a view cut elsewhere is flipped from it."""
    return view * STREAMS_PER_VIEW + _STREAM_FLIP


# ----------------------------------------------------------------------------- crop + flip


def sample_crop_boxes(
    keys: torch.Tensor,
    stream_base: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(top, left, h, w)`` with ``RandomResizedCrop.get_params`` semantics.

    Up to 10 attempts, each with area uniform in ``scale * H * W`` and log aspect ratio uniform
    in ``log(ratio)``; the first attempt that fits wins. All attempts are drawn at once and the
    first valid one is picked per sample. If none fits: torchvision's centre crop with the
    aspect ratio clamped to ``ratio``. ``height`` and ``width``: one size for the batch, or
    one per sample (streamed images differ). Boxes are whole pixels, as float64 tensors.
    """
    height = torch.as_tensor(height, dtype=torch.float64, device=keys.device).reshape(-1, 1)
    width = torch.as_tensor(width, dtype=torch.float64, device=keys.device).reshape(-1, 1)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = counter_uniforms(keys, range(stream_base, stream_base + _CROP_STREAMS)).double()
    u_area, u_ratio = u[:, 0 : 2 * _CROP_ATTEMPTS : 2], u[:, 1 : 2 * _CROP_ATTEMPTS : 2]
    u_top, u_left = u[:, 2 * _CROP_ATTEMPTS], u[:, 2 * _CROP_ATTEMPTS + 1]
    # float64 like torchvision's Python-float arithmetic, so rounding ties land the same way.
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first max
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = valid.any(dim=1)

    height, width = height.squeeze(1), width.squeeze(1)
    fallback_h, fallback_w = _centre_crop_size(height, width, ratio)
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)
    # randint(0, n) == floor(u * n) for u in [0, 1).
    top = torch.where(found, torch.floor(u_top * (height - h + 1)), (height - h).div(2).floor())
    left = torch.where(found, torch.floor(u_left * (width - w + 1)), (width - w).div(2).floor())
    return top, left, h, w


def _centre_crop_size(
    height: torch.Tensor, width: torch.Tensor, ratio: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's fallback crop: the whole image, its aspect ratio clamped to ``ratio``
    (``torch.round`` rounds halves to even, as Python's ``round``)."""
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = torch.where(narrow, torch.round(width / min(ratio)), height)
    w = torch.where(wide, torch.round(height * max(ratio)), width)
    return h, w


def _source_coords(
    start: torch.Tensor, length: torch.Tensor, size: int, out_size: int
) -> torch.Tensor:
    """[B, out] source pixel coordinates of a bilinear resize of ``[start, start + length)``.

    Half-pixel centres (``align_corners=False``) and clamping to the box's edge pixels, as
    ``torch.nn.functional.interpolate`` does on the cropped image; then mapped to
    ``grid_sample``'s [-1, 1] coordinates of the full image.
    """
    out = torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5
    scale = (length / out_size).unsqueeze(1)
    src = (out * scale - 0.5).clamp(min=0.0)
    src = torch.minimum(src, (length - 1).unsqueeze(1)) + start.unsqueeze(1)
    return ((2.0 * src + 1.0) / size - 1.0).float()


def resized_crop_flip(
    images: torch.Tensor,
    boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    flip: torch.Tensor,
    out_size: int,
) -> torch.Tensor:
    """Crop each sample's box, resize it to ``out_size`` (bilinear) and mirror where ``flip``.

    One ``grid_sample`` for the batch. The crop is axis-aligned, so the grid is the outer
    product of per-sample x and y coordinate vectors (what ``affine_grid`` would build, plus the
    edge clamping of a real crop-then-resize).
    """
    top, left, h, w = boxes
    batch, _, height, width = images.shape
    xs = _source_coords(left, w, width, out_size)
    ys = _source_coords(top, h, height, out_size)
    xs = torch.where(flip.unsqueeze(1), xs.flip(1), xs)
    grid = torch.stack(
        (
            xs.unsqueeze(1).expand(batch, out_size, out_size),
            ys.unsqueeze(2).expand(batch, out_size, out_size),
        ),
        dim=-1,
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_flip(
    images: torch.Tensor,
    keys: torch.Tensor,
    out_size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = CROP_RATIO,
    flip_p: float = 0.5,
    stream_base: int = 0,
    flip_uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """``RandomResizedCrop(out_size, scale, ratio)`` then ``RandomHorizontalFlip(flip_p)`` of
    a float batch in [0, 1], each sample's box and flip drawn from its key: the crop from
    streams ``stream_base + 0..21``, the flip from ``stream_base + 32`` (view 0's streams
    when ``stream_base`` is 0). ``flip_uniform``: that stream's uniforms when the caller
    hashed them already (with its other streams, in one call)."""
    boxes = sample_crop_boxes(
        keys, stream_base + _STREAM_CROP, images.shape[2], images.shape[3], scale, ratio
    )
    if flip_uniform is None:
        flip_uniform = counter_uniform(keys, stream_base + _STREAM_FLIP)
    return resized_crop_flip(images, boxes, flip_uniform < flip_p, out_size)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """``(x - mean) / std`` per channel in float32: uint8 images are first scaled to [0, 1]
    (ToTensor, then Normalize); float images must already be in [0, 1]. ``inplace``
    overwrites a float input instead of allocating the result."""
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(shape)
    if images.dtype == torch.uint8:
        images, inplace = images.float().div_(255.0), True
    if inplace:
        return images.sub_(mean_t).div_(std_t)
    return (images - mean_t) / std_t


def crop_flip_views(
    images: torch.Tensor,
    keys: torch.Tensor,
    scale: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One view of each uint8 image: random resized crop (area ``scale``) and flip (p 0.5)
    at the input's size, normalised. The linear probe's and fine-tuning's augmentation:
    pretraining's view 0 without the colour operations."""
    keys = keys.to(device=images.device, dtype=torch.int64)
    x = images.float().div_(255.0)
    return normalize(random_resized_crop_flip(x, keys, images.shape[-1], scale), mean, std, True)


# ----------------------------------------------------------------------------- colour

# ITU-R 601-2, as PIL's "L" mode (torchvision's tensor path rounds red to 0.2989).
_LUMA = (0.299, 0.587, 0.114)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma; a 1-channel batch is returned as is."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``factor * img + (1 - factor) * other`` clamped to [0, 1]."""
    factor = _per_sample(factor)
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_brightness``: blend with black."""
    return (images * _per_sample(factor)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_contrast``: blend with the mean of the image's grayscale."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_saturation``: blend with the grayscale image (identity on grey)."""
    if images.shape[1] == 1:
        return images
    return _blend(images, rgb_to_grayscale(images), factor)


def _hsv_parts(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue, saturation, value), each [B, H, W], with torchvision's ``_rgb2hsv`` formulas."""
    r, g, b = images.unbind(dim=1)
    # Elementwise max/min of the three planes: a reduction over the strided channel axis is
    # several times slower on CPU.
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc  # hue and saturation are 0 there; avoid dividing by zero
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    sat = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    hue = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return hue, sat, maxc


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """Batched RGB -> HSV on [0, 1] floats, the same formulas as torchvision's ``_rgb2hsv``."""
    return torch.stack(_hsv_parts(images), dim=1)


def _hsv_parts_to_rgb(hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """[B, H, W] h, s, v -> [B, 3, H, W] RGB via ``v - v s clamp(min(k, 4 - k), 0, 1)``.

    ``k = (n + 6 h) mod 6`` with n = 5, 3, 1 for R, G, B. It equals torchvision's six-sector
    ``_hsv2rgb`` but needs no per-sector masks, stacks and einsum, which matters on CPU.
    """
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    val = val.unsqueeze(1)
    return (val - (val * sat.unsqueeze(1)) * ramp).clamp_(0.0, 1.0)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Batched HSV -> RGB on [0, 1] floats (closed form; see :func:`_hsv_parts_to_rgb`)."""
    return _hsv_parts_to_rgb(*hsv.unbind(dim=1))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_hue``: rotate the hue by ``shift`` turns (identity on grey)."""
    if images.shape[1] == 1:
        return images
    hue, sat, val = _hsv_parts(images)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    return _hsv_parts_to_rgb(hue, sat, val)


def color_jitter(
    images: torch.Tensor,
    apply: torch.Tensor,
    order: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dense: bool = False,
) -> torch.Tensor:
    """``ColorJitter`` with per-sample factors and a per-sample random order, batched.

    ``order`` is [B, 4]: per sample, which op (0 brightness, 1 contrast, 2 saturation, 3 hue,
    -1 none) runs at each of the 4 positions, as ``ColorJitter``'s ``randperm(4)``. Brightness,
    contrast and saturation are all torchvision blends, ``f x + (1 - f) partner`` with partner
    black, the grayscale mean or the grayscale image, so at each position one per-sample affine
    ``clamp(a x + b gray + c)`` covers all three (a = 1, b = c = 0 is an exact no-op for the
    samples doing something else there). Hue runs only on the samples that have it at that
    position. Samples with ``apply`` False pass through unchanged. Grey images skip saturation
    and hue (identities on them).
    """
    brightness, contrast, saturation, hue = factors
    rgb = images.shape[1] == 3
    for position in range(4):
        op = torch.where(apply, order[:, position], torch.full_like(order[:, position], -1))
        gray = rgb_to_grayscale(images)
        mean = gray.mean(dim=(1, 2, 3))
        a = torch.ones_like(brightness)
        b = torch.zeros_like(brightness)
        c = torch.zeros_like(brightness)
        a = torch.where(op == 0, brightness, a)
        a = torch.where(op == 1, contrast, a)
        c = torch.where(op == 1, (1.0 - contrast) * mean, c)
        if rgb:
            a = torch.where(op == 2, saturation, a)
            b = torch.where(op == 2, 1.0 - saturation, b)
        out = (images * _per_sample(a)).add_(_per_sample(c))
        if rgb:
            out.addcmul_(_per_sample(b), gray)
        images = out.clamp_(0.0, 1.0)
        if rgb:
            images = masked_apply(
                images, op == 3, lambda x, idx: adjust_hue(x, hue[idx]), dense=dense
            )
    return images


def masked_apply(
    images: torch.Tensor,
    mask: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dense: bool = False,
) -> torch.Tensor:
    """``fn(images[idx], idx)`` on the samples where ``mask`` holds; the others unchanged.

    ``dense=False`` gathers the masked samples, runs ``fn`` on them only and scatters back:
    cheapest on CPU when few samples need it (hue: ~1 in 4 per position, blur in view 2: 1 in
    10), but ``nonzero`` synchronises a GPU. ``dense=True`` runs ``fn`` on the whole batch and
    selects with ``torch.where``: no host sync, the better trade on accelerators. Every ``fn``
    here is per-sample, so both give the same values.
    """
    if dense:
        idx = torch.arange(images.shape[0], device=images.device)
        return torch.where(_per_sample(mask), fn(images, idx), images)
    idx = mask.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return images
    if idx.numel() == images.shape[0]:
        return fn(images, idx)
    # In place: every caller passes a batch this module created and owns.
    return images.index_copy_(0, idx, fn(images.index_select(0, idx), idx))


# ----------------------------------------------------------------------------- blur


def blur_radius(sigma_max: float, size: int) -> int:
    """Kernel radius ``ceil(3 sigma_max)``, capped so the kernel (2r + 1) fits the image."""
    return max(0, min(math.ceil(3.0 * sigma_max), (size - 1) // 2))


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """[B, 2r + 1] normalised 1-D Gaussian kernels, torchvision's ``_get_gaussian_kernel1d``."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma.float().unsqueeze(1)) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding.

    The batch is folded into the channel axis so one grouped ``conv2d`` per axis applies each
    sample's own 1-D kernel (groups = B * C); on 2 CPU cores this is ~4x faster than a
    weighted sum of shifted slices and ~10x faster than an unfold + einsum.
    """
    if radius == 0:
        return images
    batch, channels, height, width = images.shape
    size = 2 * radius + 1
    kernels = gaussian_kernels(sigma, radius).to(images.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, 1, size), groups=batch * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


def _grayscale_rgb(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """``RandomGrayscale`` output: the luma in all 3 channels (a real copy, later ops write)."""
    return rgb_to_grayscale(images).expand_as(images).contiguous()


def solarize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``solarize(threshold=128)`` on [0, 1] floats: invert the pixels at or above 0.5."""
    return torch.where(images >= 0.5, 1.0 - images, images)


# ----------------------------------------------------------------------------- pipeline


class TwoViewAugment:
    """The paper's asymmetric two-view recipe applied to a uint8 batch, per-sample random.

    ``dense_masking``: None picks per device (gather/scatter on CPU, ``torch.where`` elsewhere,
    see :func:`masked_apply`); True/False force one. Outputs do not depend on it.
    """

    def __init__(
        self,
        config: AugmentConfig,
        output_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean {mean} and std {std} need 1 or 3 matching values")
        if output_size < 1:
            raise ValueError(f"output_size must be positive, got {output_size}")
        self.config = config
        self.output_size = output_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.dense_masking: bool | None = None

    def __call__(
        self, images: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [B] keys and uint8 images -> two normalised float32 [B, C, S, S] views.

        ``images`` [B, C, H, W]: whole images, both views cropped here. [B, 2, C, S, S]: views
        already cropped from the full-resolution images (streamed data,
        :mod:`mocov3.data.crops`, from the same crop streams); the flip and the rest run here.
        """
        if images.dim() == 5:
            return self.view(images[:, 0], keys, 0, True), self.view(images[:, 1], keys, 1, True)
        return self.view(images, keys, 0), self.view(images, keys, 1)

    def view(
        self, images: torch.Tensor, keys: torch.Tensor, view_index: int, cropped: bool = False
    ) -> torch.Tensor:
        """One view (0 or 1); view ``v`` draws from its own block of streams. ``cropped``:
        ``images`` are this view's crops at the output size (only the flip is left)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
        if cropped and images.shape[-2:] != (self.output_size, self.output_size):
            size = self.output_size
            raise ValueError(f"cropped views must be {size}x{size}, got {tuple(images.shape)}")
        if view_index not in (0, 1):
            raise ValueError(f"view_index must be 0 or 1, got {view_index}")
        if len(self.mean) not in (1, images.shape[1]):
            channels = images.shape[1]
            raise ValueError(f"mean/std have {len(self.mean)} values for {channels} channels")
        cfg = self.config
        base = view_index * STREAMS_PER_VIEW
        keys = keys.to(device=images.device, dtype=torch.int64)
        dense = self.dense_masking
        if dense is None:
            dense = images.device.type != "cpu"
        draws = _Draws(keys, base)
        x = torch.div(images.to(torch.float32), 255.0)  # ToTensor's [0, 1] range, a new tensor

        if cropped:
            flip = _per_sample(draws(_STREAM_FLIP) < cfg.flip_p)
            x = torch.where(flip, x.flip(-1), x)
        else:
            x = random_resized_crop_flip(
                x, keys, self.output_size, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p, base,
                draws(_STREAM_FLIP),
            )  # fmt: skip
        x = color_jitter(x, *self._jitter_params(draws), dense=dense)
        if x.shape[1] == 3:  # grayscale is the identity on a grey image
            gray = draws(_STREAM_GRAYSCALE) < cfg.grayscale_p
            x = masked_apply(x, gray, _grayscale_rgb, dense)
        blur = draws(_STREAM_BLUR) < cfg.blur_p[view_index]
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * draws(_STREAM_SIGMA)
        radius = blur_radius(cfg.blur_sigma[1], self.output_size)
        x = masked_apply(x, blur, lambda v, idx: gaussian_blur(v, sigma[idx], radius), dense)
        solar = draws(_STREAM_SOLARIZE) < cfg.solarize_p[view_index]
        x = masked_apply(x, solar, lambda v, _: solarize(v), dense)
        return normalize(x, self.mean, self.std, inplace=True)

    def jitter_params(
        self, keys: torch.Tensor, view_index: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(apply, order, factors) that :meth:`view` hands to :func:`color_jitter`."""
        return self._jitter_params(_Draws(keys, view_index * STREAMS_PER_VIEW))

    def _jitter_params(
        self, draws: _Draws
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(apply, order, factors) for :func:`color_jitter`, like ``ColorJitter.get_params``."""
        cfg = self.config
        apply = draws(_STREAM_JITTER) < cfg.jitter_p
        # argsort of 4 iid uniforms is a uniformly random permutation (torch.randperm(4)).
        order = draws.columns(_STREAM_ORDER, 4).argsort(dim=1)
        if cfg.hue == 0.0:  # torchvision skips a zero-range op; hue 0 must be an exact no-op
            order = torch.where(order == 3, torch.full_like(order, -1), order)
        factors = (
            draws.between(_STREAM_BRIGHTNESS, 1.0 - cfg.brightness, 1.0 + cfg.brightness),
            draws.between(_STREAM_CONTRAST, 1.0 - cfg.contrast, 1.0 + cfg.contrast),
            draws.between(_STREAM_SATURATION, 1.0 - cfg.saturation, 1.0 + cfg.saturation),
            draws.between(_STREAM_HUE, -cfg.hue, cfg.hue),
        )
        return apply, order, factors


class _Draws:
    """One view's non-crop uniforms, hashed in one batch; ``draws(stream)`` is a [B] column."""

    def __init__(self, keys: torch.Tensor, base: int) -> None:
        self.base = base
        self.values = counter_uniforms(keys, range(base + _FIRST_STREAM, base + _LAST_STREAM + 1))

    def __call__(self, stream: int) -> torch.Tensor:
        return self.values[:, stream - _FIRST_STREAM]

    def columns(self, stream: int, count: int) -> torch.Tensor:
        return self.values[:, stream - _FIRST_STREAM : stream - _FIRST_STREAM + count]

    def between(self, stream: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * self(stream)
