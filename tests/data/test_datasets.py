"""Tests for mocov3.data.datasets: idx reading, Fashion-MNIST, image folders, synthetic data."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ImageDataset,
    load_fashion_mnist,
    load_folder,
    load_split,
    read_idx,
)
from mocov3.errors import DatasetError

# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Encode an array as an idx file by hand: magic, big-endian dims, big-endian payload."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


def save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def rgb(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, colour)


def assert_one_line(err: pytest.ExceptionInfo[DatasetError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 2)])
def test_read_idx_round_trip(tmp_path: Path, gz: bool, shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    data = idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable  # torch.from_numpy warns on read-only arrays


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    ints = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    (tmp_path / "i").write_bytes(idx_bytes(ints, 0x0B))
    (tmp_path / "f").write_bytes(idx_bytes(floats, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), ints)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), floats)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((4, 3), dtype=np.uint8))
    cases = {
        "magic": b"\x00\x01" + good[2:],
        "type": b"\x00\x00\x07" + good[3:],
        "truncated": good[:-1],
        "header": good[:6],
        "extra": good + b"\x00",
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError) as err:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in assert_one_line(err)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-8])  # truncated gzip stream
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DatasetError):
        read_idx(tmp_path / "missing")


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_train() -> tuple[ImageDataset, float]:
    start = time.perf_counter()
    ds = load_fashion_mnist("train")
    return ds, time.perf_counter() - start


def test_fashion_mnist_train(fmnist_train: tuple[ImageDataset, float]) -> None:
    ds, seconds = fmnist_train
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous() and ds.channels == 1 and len(ds) == 60000
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.classes == FASHION_MNIST_CLASSES and len(ds.classes) == 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    assert seconds < 3.0, f"loading the train split took {seconds:.2f} s"


def test_fashion_mnist_statistics_match_the_data(fmnist_train: tuple[ImageDataset, float]) -> None:
    ds, _ = fmnist_train
    x = ds.images.double() / 255.0
    assert ds.mean == FASHION_MNIST_MEAN and ds.std == FASHION_MNIST_STD
    assert abs(x.mean().item() - ds.mean[0]) < 1e-3
    assert abs(x.std().item() - ds.std[0]) < 1e-3


def test_fashion_mnist_test_split() -> None:
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels is not None and int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert ds.mean == FASHION_MNIST_MEAN  # evaluation normalises with the train statistics
    assert load_fashion_mnist("val").images.shape == ds.images.shape


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_fashion_mnist("train", data_dir=str(tmp_path))
    msg = assert_one_line(err)
    assert "apt-get" in msg and "--data-dir" in msg and str(tmp_path) in msg
    with pytest.raises(DatasetError, match="apt-get"):
        load_split("fashion-mnist", "test", data_dir=str(tmp_path))


def test_fashion_mnist_plain_files_and_validation(tmp_path: Path) -> None:
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 256
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 9, 3, 3, 1])))
    ds = load_fashion_mnist("test", data_dir=str(tmp_path))
    assert ds.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
    assert ds.labels is not None and ds.labels.tolist() == [0, 9, 3, 3, 1]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2])))
    with pytest.raises(DatasetError, match="do not form"):
        load_fashion_mnist("test", data_dir=str(tmp_path))


def test_load_split_fashion_mnist_resize_and_rgb() -> None:
    ds = load_split("fashion-mnist", "test", image_size=32, channels=3)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert ds.mean == FASHION_MNIST_MEAN * 3 and ds.std == FASHION_MNIST_STD * 3
    small = load_split("fashion-mnist", "train", image_size=64, subset=10)
    assert small.images.shape == (10, 1, 64, 64)
    # the resize preserves content: brightness is nearly unchanged
    full = load_split("fashion-mnist", "train", subset=10)
    assert abs(small.images.float().mean() - full.images.float().mean()) < 1.0
    assert load_split("fashion-mnist", "test", image_size=28).images.shape[-1] == 28


# --------------------------------------------------------------------------- folders


def test_folder_class_subfolders(tmp_path: Path) -> None:
    save(tmp_path / "dog" / "b.png", rgb((0, 255, 0)))
    save(tmp_path / "dog" / "deep" / "c.JPG", rgb((0, 0, 255), (40, 20)))
    save(tmp_path / "cat" / "a.png", rgb((255, 0, 0)))
    save(tmp_path / "empty_class" / "notes.txt", rgb((0, 0, 0)), format="PNG")
    ds = load_folder(tmp_path, "train", image_size=8)
    assert ds.classes == ["cat", "dog"]  # sorted; a folder without images is no class
    assert ds.images.shape == (3, 3, 8, 8) and ds.images.dtype == torch.uint8
    # round-robin over classes, so that subset(2) holds both classes
    assert ds.names == ["cat/a.png", "dog/b.png", "dog/deep/c.JPG"]
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 1]
    assert ds.images[0, :, 4, 4].tolist() == [255, 0, 0] and ds.skipped == 0
    assert ds.subset(2).labels.tolist() == [0, 1]  # type: ignore[union-attr]
    assert len(ds.mean) == 3 and abs(ds.mean[0] - 1 / 3) < 0.02


def test_folder_unlabeled_and_statistics(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.png", Image.new("L", (9, 9), 51))
    (tmp_path / "._0.png").write_bytes(b"macOS resource fork, not an image")
    ds = load_folder(tmp_path, "train", image_size=4)
    assert ds.labels is None and ds.classes == [] and ds.channels == 1
    assert ds.names == ["0.png", "1.png", "2.png"] and ds.skipped == 0
    assert ds.mean == pytest.approx((0.2,)) and ds.std == pytest.approx((1 / 255,))


def test_folder_train_val_split(tmp_path: Path) -> None:
    for split, cls, colour in [
        ("train", "a", (255, 0, 0)),
        ("train", "b", (0, 255, 0)),
        ("train", "c", (0, 0, 255)),
        ("val", "c", (0, 0, 255)),
    ]:
        save(tmp_path / split / cls / "x.png", rgb(colour))
    train = load_folder(tmp_path, "train", image_size=6)
    val = load_folder(tmp_path, "test", image_size=6)
    assert train.classes == val.classes == ["a", "b", "c"]  # labels agree across splits
    assert val.labels is not None and val.labels.tolist() == [2]
    assert val.names == ["val/c/x.png"]
    via_spec = load_split(f"folder:{tmp_path}", "val", image_size=6)
    assert torch.equal(via_spec.images, val.images)
    save(tmp_path / "val" / "z" / "x.png", rgb((1, 2, 3)))
    with pytest.raises(DatasetError, match="z"):
        load_folder(tmp_path, "test", image_size=6)


def test_folder_test_folder_and_missing_eval_split(tmp_path: Path) -> None:
    save(tmp_path / "train" / "a" / "x.png", rgb((9, 9, 9)))
    with pytest.raises(DatasetError) as err:
        load_folder(tmp_path, "test", image_size=4)
    assert "no val/ or test/ folder; kNN evaluation needs one" in assert_one_line(err)
    save(tmp_path / "test" / "a" / "y.png", rgb((9, 9, 9)))
    assert load_folder(tmp_path, "test", image_size=4).names == ["test/a/y.png"]
    other = tmp_path / "only_val"
    save(other / "val" / "a" / "y.png", rgb((9, 9, 9)))
    with pytest.raises(DatasetError, match="no train/"):
        load_folder(other, "train", image_size=4)


def _unusual_images(root: Path) -> dict[str, Path]:
    """One file per awkward PIL mode or size."""
    grad = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    la = Image.fromarray(np.stack([grad, np.zeros_like(grad)], axis=-1), "LA")  # transparent
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    grey_pal = Image.new("P", (16, 16), 1)
    grey_pal.putpalette([0, 0, 0, 77, 77, 77] + [0] * 762)
    return {
        "L": save(root / "l.png", Image.fromarray(grad)),
        "LA": save(root / "la.png", la),
        "RGBA": save(root / "rgba.png", rgba),
        "P": save(root / "p.gif", pal),
        "P-grey": save(root / "p_grey.bmp", grey_pal),
        "I;16": save(root / "i16.png", Image.fromarray(np.full((8, 8), 32896, np.uint16))),
        "I": save(root / "i32.tif", Image.fromarray(np.full((8, 8), 65535, np.int32))),
        "CMYK": save(root / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)), quality=95),
        "1": save(root / "bits.png", Image.new("1", (10, 10), 1)),
        "tiny": save(root / "tiny.webp", rgb((10, 200, 30), (1, 1)), lossless=True),
        "large": save(root / "large.jpeg", rgb((200, 100, 50), (2000, 1500)), quality=95),
        "tiff": save(root / "rgb.TIFF", rgb((1, 2, 3), (30, 5))),
    }


def test_folder_unusual_modes(tmp_path: Path) -> None:
    files = _unusual_images(tmp_path)
    for mode in ("I;16", "I", "CMYK", "LA", "P", "1"):  # the files really have these modes
        with Image.open(files[mode]) as img:
            assert img.mode == mode
    ds = load_folder(tmp_path, "train", image_size=16)
    assert ds.skipped == 0 and len(ds) == len(files) and ds.labels is None
    assert ds.images.shape == (len(files), 3, 16, 16) and ds.images.dtype == torch.uint8
    px = {Path(n).name: ds.images[i] for i, n in enumerate(ds.names or [])}
    assert px["la.png"].min() == 255  # fully transparent grey composited over white
    assert px["rgba.png"][:, 8, 8].tolist() == [255, 0, 0]
    assert px["p.gif"][:, 8, 8].tolist() == [0, 128, 255]
    assert px["i16.png"].unique().tolist() == [128]  # 32896 / 257
    assert px["i32.tif"].unique().tolist() == [255]
    assert px["cmyk.jpg"].min() >= 250  # CMYK (0, 0, 0, 0) is white paper
    assert px["bits.png"].unique().tolist() == [255]
    assert (px["tiny.webp"] == torch.tensor([10, 200, 30])[:, None, None]).all()  # 1x1 upscaled
    assert (px["large.jpeg"][:, 8, 8].int() - torch.tensor([200, 100, 50])).abs().max() <= 3


def test_folder_channels_auto_and_forced(tmp_path: Path) -> None:
    save(tmp_path / "grey" / "a.png", Image.new("L", (5, 5), 77))
    save(tmp_path / "grey" / "p.gif", Image.new("L", (5, 5), 30).convert("P"))
    assert load_folder(tmp_path / "grey", "train", 4).channels == 1  # grey palette stays grey
    save(tmp_path / "mixed" / "a.png", Image.new("L", (5, 5), 77))
    save(tmp_path / "mixed" / "b.png", rgb((255, 0, 0), (5, 5)))
    auto = load_folder(tmp_path / "mixed", "train", 4)
    assert auto.channels == 3 and auto.images[0, :, 0, 0].tolist() == [77, 77, 77]
    grey = load_folder(tmp_path / "mixed", "train", 4, channels=1)
    assert grey.images.shape == (2, 1, 4, 4) and grey.images[1, 0, 0, 0] == 76  # ITU-R 601 luma
    assert load_folder(tmp_path / "grey", "train", 4, channels=3).channels == 3
    with pytest.raises(DatasetError, match="channels"):
        load_folder(tmp_path / "grey", "train", 4, channels=2)


def test_folder_resize_then_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 10:30] = 255  # a white centre band that the centre crop keeps exactly
    save(tmp_path / "wide.png", Image.fromarray(arr))
    ds = load_folder(tmp_path, "train", image_size=10)
    assert ds.images.shape == (1, 1, 10, 10)
    # shorter side -> 10 (so 20x10), centre crop = the white band; only its edge columns
    # blend with the black (bilinear support), and symmetrically, as the crop is centred.
    img = ds.images[0, 0]
    assert img[:, 1:9].min() == 255 and torch.equal(img[:, 0], img[:, 9]) and img[0, 0] > 128


def test_folder_downscale_is_antialiased(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    save(tmp_path / "noise.png", Image.fromarray(noise))
    ds = load_folder(tmp_path, "train", image_size=16)
    assert ds.images.float().std() < 20  # an 8x shrink must average, not point-sample


def _bad_files(root: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    save(root / "good.png", Image.fromarray(noise))
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "readme.txt").write_text("not an image, and not counted")


def test_folder_skips_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mocov3.data.datasets"):
        ds = load_folder(tmp_path, "train", image_size=8)
    assert len(ds) == 1 and ds.skipped == 3 and ds.names == ["good.png"]
    assert any("skipped 3 unreadable" in r.getMessage() for r in caplog.records)


def test_folder_strict_names_first_bad_file(tmp_path: Path) -> None:
    _bad_files(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_folder(tmp_path, "train", image_size=8, strict=True)
    assert "corrupt.jpg" in assert_one_line(err)  # first bad file in sorted order
    with pytest.raises(DatasetError, match="corrupt.jpg"):
        load_split(f"folder:{tmp_path}", "train", image_size=8, strict=True)


def test_folder_empty_or_unreadable_or_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_folder(tmp_path / "empty", "train", image_size=8)
    (tmp_path / "text" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "sub" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        load_folder(tmp_path / "text", "train", image_size=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="none of the 1"):
        load_folder(tmp_path / "bad", "train", image_size=8)
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder(tmp_path / "nope", "train", image_size=8)


# --------------------------------------------------------------------------- load_split


def test_load_split_synthetic_sizes() -> None:
    train = load_split("synthetic", "train", synthetic_size=100, image_size=16)
    test = load_split("synthetic", "test", synthetic_size=4000, image_size=16, channels=3)
    assert len(train) == 100 and train.images.shape[1:] == (1, 16, 16)
    assert len(test) == 1000 and test.channels == 3
    assert len(load_split("synthetic", "test", synthetic_size=100)) == 512
    assert len(load_split("synthetic", "train", synthetic_size=100, subset=7)) == 7


def test_load_split_rejects_bad_arguments() -> None:
    with pytest.raises(DatasetError) as err:
        load_split("imagenet", "train")
    msg = assert_one_line(err)
    assert "fashion-mnist" in msg and "folder:PATH" in msg and "synthetic" in msg
    with pytest.raises(DatasetError, match="split"):
        load_split("synthetic", "validation")
    with pytest.raises(DatasetError, match="folder:PATH"):
        load_split("folder:", "train")
    with pytest.raises(DatasetError, match="channels"):
        load_split("synthetic", "train", channels=4)
