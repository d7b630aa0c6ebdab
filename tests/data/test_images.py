"""The in-memory split: subsets that own their memory, and the antialiased resize."""

from __future__ import annotations

import torch

from mocov3.data.images import resize_images
from mocov3.data.synthetic import make_synthetic


def test_resize_images_is_antialiased() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 1, 64, 64), generator=g, dtype=torch.uint8)
    out = resize_images(noise, 16)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.uint8
    # an antialiased 4x shrink averages ~16 pixels (std ~12); point-sampling bilinear
    # averages 4 and keeps most of the noise (std ~35)
    assert 100 < out.float().mean() < 155 and out.float().std() < 20
    assert resize_images(noise, 64) is noise


def test_subset_copies_the_first_items() -> None:
    ds = make_synthetic("train", 50, 8)
    sub = ds.subset(5)
    assert torch.equal(sub.images, ds.images[:5]) and sub.mean == ds.mean
    assert sub.images.untyped_storage().nbytes() == sub.images.numel()  # not a view of ds
    assert len(ds.subset(500)) == 50
