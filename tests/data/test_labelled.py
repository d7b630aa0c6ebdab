"""Evaluation splits: a streamed folder gives the in-memory loader's pixels (whole
images), the reference's validation and training views, and leaves unreadable files out."""

from __future__ import annotations

import shutil

import pytest
import torch

from mocov3.config import load_config
from mocov3.data.augment import normalize
from mocov3.data.labelled import Views, centre_size, open_split
from mocov3.errors import DatasetError

CPU = torch.device("cpu")


def _config(folder, *extra: str):
    return load_config(
        "configs/tiny.yaml", [f"data.name=folder:{folder}", "data.image_size=28", *extra]
    )


def _both(folder):
    memory = open_split(_config(folder), "train")
    streamed = open_split(_config(folder, "data.memory_limit_gb=0.000001"), "train",
                          memory.mean, memory.std)  # fmt: skip
    assert not memory.streamed and streamed.streamed
    return memory, streamed


def _all(split, views, batch=32):
    parts = list(split.batches(torch.arange(len(split)), batch, CPU, views))
    return torch.cat([x for x, _ in parts]), torch.cat([i for _, i in parts])


def test_streamed_whole_images_are_the_in_memory_images(fashion_folder):
    memory, streamed = _both(fashion_folder)
    assert len(memory) == len(streamed) == 160 and streamed.channels == memory.channels == 1
    assert torch.equal(memory.labels, streamed.labels)
    (x_mem, i_mem), (x_str, i_str) = _all(memory, Views()), _all(streamed, Views())
    assert torch.equal(i_mem, i_str) and torch.equal(x_mem, x_str)
    expected = normalize(memory.memory.images.float() / 255, memory.mean, memory.std)
    torch.testing.assert_close(x_mem, expected)


def test_validation_view_resizes_by_256_over_224_then_cuts_the_centre(fashion_folder):
    memory, streamed = _both(fashion_folder)
    assert centre_size(224) == 256 and centre_size(28) == 32
    x_mem, _ = _all(memory, Views("centre"))
    x_str, _ = _all(streamed, Views("centre"))
    assert x_mem.shape == (160, 1, 28, 28)
    # the same resize of the same 28 px image, in float (memory) or uint8 (worker) steps
    assert (x_mem - x_str).abs().max() < 2.5 / 255 / min(memory.std)
    whole, _ = _all(memory, Views())
    assert not torch.allclose(x_mem, whole)  # a zoom by 8/7, not the image itself


def test_training_views_are_the_same_crops_and_flips_either_way(fashion_folder):
    memory, streamed = _both(fashion_folder)
    views = Views("crop", (0.08, 1.0), seed=3, epoch=1)
    x_mem, _ = _all(memory, views)
    x_str, _ = _all(streamed, views)
    again, _ = _all(streamed, views)
    other_epoch, _ = _all(streamed, Views("crop", (0.08, 1.0), seed=3, epoch=2))
    assert torch.equal(x_str, again)  # a function of (seed, epoch, index) only
    assert not torch.allclose(x_str, other_epoch)
    # same boxes and flips; bilinear on the device vs antialiased in the worker
    per_image = (x_mem - x_str).abs().flatten(1).mean(1) * min(memory.std)
    assert per_image.median() < 0.03, per_image.median()


def test_unreadable_files_are_left_out_and_named_or_stop_a_strict_read(fashion_folder, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(fashion_folder, folder)
    broken = sorted((folder / "train").rglob("*.png"))[5]
    broken.write_bytes(b"not a png")
    split = open_split(_config(folder, "data.memory_limit_gb=0.000001"), "train")
    bad = next(i for i in range(len(split)) if split.image_name(i).endswith(broken.name))
    x, kept = _all(split, Views(), batch=16)
    assert len(x) == len(kept) == 159 and bad not in kept.tolist()
    assert list(split.unreadable) == [bad] and split.unreadable[bad].endswith(broken.name)
    strict = _config(folder, "data.memory_limit_gb=0.000001", "data.strict=true")
    with pytest.raises(DatasetError, match=f"cannot read .*{broken.name}"):
        _all(open_split(strict, "train"), Views(), batch=16)
