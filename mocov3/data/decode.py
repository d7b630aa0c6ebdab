"""The one image decoder: an image file to uint8 ``[C, S, S]``, the way every path reads it.

In-memory folders (:mod:`mocov3.data.datasets`), streamed folders
(:mod:`mocov3.data.stream`) and ``mocov3 embed`` all call :func:`decode_image`, so they
find the same files unreadable and give the same pixels.

- JPEG and non-palette PNG decode with ``torchvision.io`` (libjpeg-turbo / libpng, about
  twice PIL's speed, EXIF orientation applied); everything else (GIF, BMP, TIFF, WebP,
  palette PNG, CMYK JPEG) and any file libjpeg / libpng refuse goes through PIL.
- Modes: grey and 1-bit stay grey; 16-bit samples become 8-bit (``x / 257`` rounded);
  32-bit integer and float grey are scaled by their range; grey+alpha, RGBA and palette
  transparency are composited over white (how viewers show transparency); palette, CMYK,
  YCbCr and the rest become RGB, except a palette of only greys, which stays grey. RGB to
  grey uses PIL's fixed-point ITU-R 601-2 luma.
- Geometry: shorter side resized to ``S`` (bilinear, antialiased), then a centre crop.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, read_file
from torchvision.io import decode_image as tv_decode_image
from torchvision.transforms import InterpolationMode

from mocov3.errors import one_line

# torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec (a separate
# package with FFmpeg); they still work, and the warning would repeat for every file.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_PLAIN_COLOUR_TYPES = (0, 2, 4, 6)  # grey, RGB, grey+alpha, RGBA (3 is palette)
_TV_PREFIX = re.compile(r"^\w+, \S+\.(?:cpp|h):\d+, ")  # torchvision's "func, file:line, "
_PIL_MODES = {1: "L", 3: "RGB"}


def unreadable_reason(error: BaseException) -> str:
    """Why a file could not be decoded, on one line, without torchvision's C++ location."""
    return f"{type(error).__name__}: {_TV_PREFIX.sub('', one_line(error))}"


@contextmanager
def one_thread() -> Iterator[None]:
    """Decode with one intra-op thread. Per-image resizes are too small to split across
    threads, and on a busy machine OpenMP's spinning threads made them 10x slower (0.9 ms ->
    12 ms per image measured on 2 shared cores). DataLoader workers already run with one
    thread; this covers decoding in the main process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- PIL modes


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with alpha over WHITE (how viewers show transparency) -> RGB."""
    if img.mode == "La":  # premultiplied: PIL converts it to RGBA only via LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey.

    Integers inside 0..65535 are read as 16-bit (divide by 257, so 65535 -> 255), floats
    inside [0, 1] as fractions; anything else is min-max stretched, its scale being unknown.
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    full = 1.0 if img.mode == "F" else 65535.0
    if 0.0 <= lo and hi <= full:
        scaled = arr / full
    else:
        scaled = (arr - lo) / max(hi - lo, 1e-12)
    return Image.fromarray(np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8))


def palette_is_grey(img: Image.Image) -> bool:
    """Whether a palette image's palette holds only greys."""
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to 8-bit 'L' (grey) or 'RGB' (colour); alpha goes over white."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img)
    if mode == "P":
        out = _flatten_alpha(img) if "transparency" in img.info else img.convert("RGB")
        return out.convert("L") if palette_is_grey(img) else out
    if mode in ("LA", "La"):
        return _flatten_alpha(img).convert("L")
    if "A" in mode or "a" in mode:  # RGBA, RGBa, PA
        return _flatten_alpha(img)
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _decode_pil(path: Path, channels: int | None) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        out = _to_l_or_rgb(ImageOps.exif_transpose(img))
    if channels is not None and out.mode != _PIL_MODES[channels]:
        out = out.convert(_PIL_MODES[channels])
    arr = np.array(out)  # a copy: PIL's buffer view is read-only
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)


# --------------------------------------------------------------------------- torchvision


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit PNG samples -> 8 bits, rounding ``x / 257``."""
    if image.dtype == torch.uint8:
        return image
    return image.to(torch.int32).add_(128).div_(257, rounding_mode="floor").to(torch.uint8)


def _over_white(image: torch.Tensor) -> torch.Tensor:
    """Composite grey+alpha or RGBA over white, as PIL's path (and viewers) do."""
    colour, alpha = image[:-1].to(torch.int32), image[-1:].to(torch.int32)
    mixed = colour * alpha + 255 * (255 - alpha) + 127
    return mixed.div_(255, rounding_mode="floor").to(torch.uint8)


def _to_grey(image: torch.Tensor) -> torch.Tensor:
    """RGB -> grey with PIL's fixed-point ITU-R 601-2 luma, so both decoders agree exactly."""
    r, g, b = image.to(torch.int32)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).to(torch.uint8)[None]


def _decode_fast(data: torch.Tensor, channels: int | None) -> torch.Tensor | None:
    """JPEG and non-palette PNG via torchvision; None for anything else (palette PNGs are
    PIL's: torchvision returns their raw palette indices in UNCHANGED mode)."""
    head = bytes(data[:26].tolist())
    if head.startswith(_JPEG_MAGIC):
        mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}
        image = tv_decode_image(data, mode=mode[channels], apply_exif_orientation=True)
        return image if image.shape[0] in (1, 3) else None  # CMYK: PIL converts it
    if not head.startswith(_PNG_MAGIC) or len(head) < 26 or head[25] not in _PNG_PLAIN_COLOUR_TYPES:
        return None
    image = _to_uint8(tv_decode_image(data, ImageReadMode.UNCHANGED, apply_exif_orientation=True))
    if image.shape[0] in (2, 4):
        image = _over_white(image)
    if channels == 1 and image.shape[0] == 3:
        image = _to_grey(image)
    return image


# --------------------------------------------------------------------------- the decoder


def resize_centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bilinear, antialiased), then a centre crop to ``size``."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image.contiguous()
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = TF.resize(image, [nh, nw], InterpolationMode.BILINEAR, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def decode_image(path: str | Path, size: int, channels: int | None = None) -> torch.Tensor:
    """One image file as uint8 ``[C, size, size]``; raises on an unreadable file.

    ``channels`` 1 or 3 forces grey or colour; None keeps the file's own (1 for grey
    images, 3 for the rest)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    try:
        image = _decode_fast(read_file(str(path)), channels)
    except Exception:  # noqa: BLE001  let PIL try: it reads some files libjpeg/libpng refuse
        image = None
    if image is None:
        image = _decode_pil(Path(path), channels)
    image = resize_centre_crop(image, size)
    if channels is not None and image.shape[0] != channels:
        image = image.expand(channels, -1, -1).contiguous()
    return image


def try_decode(path: str | Path, size: int, channels: int | None = None) -> torch.Tensor | str:
    """The decoded image, or the one-line reason it cannot be read."""
    try:
        return decode_image(path, size, channels)
    except Exception as error:  # noqa: BLE001  decoders raise many types on corrupt input
        return unreadable_reason(error)
