"""The one image decoder: encoded image bytes to uint8 ``[C, H, W]``, the way every path
reads them.

In-memory folders (:mod:`mocov3.data.datasets`), streamed sources (:mod:`mocov3.data.stream`,
whose random crops :mod:`mocov3.data.crops` cuts from :func:`decode_full`'s full-resolution
image) and ``mocov3 embed`` all decode here, so they find the same files unreadable and give
the same pixels.

- JPEG and non-palette PNG decode with ``torchvision.io`` (libjpeg-turbo / libpng, EXIF
  orientation applied; 0.64 ms for a 500x375 JPEG on one core against PIL's 0.79 ms, the
  same pixels); everything else (GIF, BMP, TIFF, WebP, palette PNG, CMYK JPEG) and any file
  libjpeg / libpng refuse goes through PIL. :func:`decode_reduced` decodes an upright JPEG at
  1/2, 1/4 or 1/8 size through PIL (libjpeg's DCT scaling, which torchvision does not expose).
- Modes: grey and 1-bit stay grey; 16-bit samples become 8-bit (``x / 257`` rounded);
  32-bit integer and float grey are scaled by their range; grey+alpha, RGBA and palette
  transparency are composited over white (how viewers show transparency); palette, CMYK,
  YCbCr and the rest become RGB, except a palette of only greys, which stays grey. RGB to
  grey uses PIL's fixed-point ITU-R 601-2 luma.
- Geometry of :func:`decode_image` (in-memory datasets, evaluation): shorter side resized to
  ``S`` (bilinear, antialiased), then a centre crop.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode
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
_EXIF_ORIENTATION = 0x0112


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


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.array(img)  # a copy: PIL's buffer view is read-only
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)


def _converted(img: Image.Image, channels: int | None) -> Image.Image:
    """``img`` in 'L' or 'RGB' (see the module docstring), then forced to ``channels``."""
    out = _to_l_or_rgb(img)
    if channels is not None and out.mode != _PIL_MODES[channels]:
        out = out.convert(_PIL_MODES[channels])
    return out


def _decode_pil(data: bytes, channels: int | None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return _pil_to_tensor(_converted(ImageOps.exif_transpose(img), channels))


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


def read_bytes(source: str | Path | bytes) -> bytes:
    """An image file's bytes (a ``bytes`` source is returned as is)."""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def decode_full(data: bytes, channels: int | None = None) -> torch.Tensor:
    """An encoded image as uint8 ``[C, H, W]`` at its full resolution; raises when unreadable.

    ``channels`` 1 or 3 forces grey or colour; None keeps the file's own (1 for grey
    images, 3 for the rest)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    try:
        image = _decode_fast(torch.frombuffer(bytearray(data), dtype=torch.uint8), channels)
    except Exception:  # noqa: BLE001  let PIL try: it reads some files libjpeg/libpng refuse
        image = None
    if image is None:
        image = _decode_pil(data, channels)
    if channels is not None and image.shape[0] != channels:
        image = image.expand(channels, -1, -1).contiguous()
    return image


def decode_image(
    source: str | Path | bytes, size: int, channels: int | None = None
) -> torch.Tensor:
    """One image (a file or its bytes) as uint8 ``[C, size, size]``: shorter side resized to
    ``size``, centre crop. Raises on an unreadable image."""
    return resize_centre_crop(decode_full(read_bytes(source), channels), size)


def try_decode(
    source: str | Path | bytes, size: int, channels: int | None = None
) -> torch.Tensor | str:
    """The decoded image, or the one-line reason it cannot be read."""
    try:
        return decode_image(source, size, channels)
    except Exception as error:  # noqa: BLE001  decoders raise many types on corrupt input
        return unreadable_reason(error)


# --------------------------------------------------------------------------- reduced size


class Header(NamedTuple):
    """What an image's header says before decoding: its size as viewed (EXIF rotation
    applied) and whether it is a plain JPEG (grey or YCbCr, stored upright), which decodes at
    1/2, 1/4 or 1/8 size and on a GPU."""

    height: int
    width: int
    reducible: bool


def read_header(data: bytes) -> Header:
    """The :class:`Header` of an encoded image (reads the header only); raises when PIL
    cannot identify the file."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        jpeg = img.format in ("JPEG", "MPO")  # MPO: a camera's JPEG with extra frames
        # the decoders apply every format's EXIF orientation but TIFF's, which PIL's TIFF
        # reader has applied to the size already
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if img.format != "TIFF" else 1
        plain = jpeg and orientation == 1 and img.mode in ("L", "RGB")
    if orientation in (5, 6, 7, 8):  # rotated a quarter turn: viewed sideways
        width, height = height, width
    return Header(height, width, plain)


def decode_reduced(data: bytes, reduce: int, channels: int | None) -> tuple[Image.Image, int]:
    """A JPEG decoded at ``1 / reduce`` of its size by libjpeg's DCT scaling (``reduce`` 2,
    4 or 8), as a PIL image in 'L' or 'RGB', with the reduction libjpeg applied.

    Reduced pixel ``k`` covers original pixels ``[k r, (k + 1) r)``: a box in the original's
    coordinates maps onto this image by dividing by ``r`` (the last row and column may be
    partial, which is why the size rounds up)."""
    with Image.open(io.BytesIO(data)) as img:
        width = img.size[0]
        drafted = img.draft(img.mode, (width // reduce, img.size[1] // reduce))
        img.load()
        applied = 1 if drafted is None else round(width / drafted[1][2])
        return _converted(img, channels), applied
