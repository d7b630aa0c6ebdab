"""The one decoder on its own: channels kept or forced, the fast and the PIL paths alike,
and unreadable files reported in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.data.decode import decode_image, resize_centre_crop, try_decode


def smooth(mode: str, size: tuple[int, int]) -> Image.Image:
    small = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).convert(mode)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp"])
def test_channels_are_kept_or_forced(tmp_path: Path, ext: str) -> None:
    grey, colour = tmp_path / f"grey.{ext}", tmp_path / f"colour.{ext}"
    smooth("L", (30, 20)).save(grey)
    smooth("RGB", (30, 20)).save(colour)
    assert decode_image(grey, 16).shape == (1, 16, 16)
    assert decode_image(colour, 16).shape == (3, 16, 16)
    forced = decode_image(grey, 16, channels=3)
    assert forced.shape == (3, 16, 16) and torch.equal(forced[0], forced[2])
    assert decode_image(colour, 16, channels=1).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        decode_image(grey, 16, channels=2)


def test_png_and_bmp_of_one_image_decode_alike(tmp_path: Path) -> None:
    """libpng (the fast path) and PIL (BMP) give the same pixels: one resampler after them."""
    image = smooth("RGB", (40, 25))
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "a.bmp")
    assert torch.equal(decode_image(tmp_path / "a.png", 16), decode_image(tmp_path / "a.bmp", 16))


def test_resize_then_centre_crop_keeps_a_square_at_its_size() -> None:
    square = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    assert torch.equal(resize_centre_crop(square, 12), square)
    wide = torch.zeros(1, 10, 30, dtype=torch.uint8)
    wide[:, :, 10:20] = 255  # the centre third survives the crop whole
    white = torch.full((1, 10, 10), 255, dtype=torch.uint8)
    assert torch.equal(resize_centre_crop(wide, 10), white)


def test_an_unreadable_file_is_a_one_line_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)))
    reason = try_decode(bad, 8)
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert ".cpp:" not in reason  # torchvision's source location is left out
    assert isinstance(try_decode(tmp_path / "missing.png", 8), str)
