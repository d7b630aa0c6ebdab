"""Tests for mocov3.data.stream: the streamed pipeline, its views and its failure modes."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mocov3.data.stream as stream
from mocov3.config import Config
from mocov3.data import crops
from mocov3.data.counters import sample_keys
from mocov3.data.crops import decode_pending, decode_views
from mocov3.data.datasets import load_folder, load_split
from mocov3.data.decode import decode_image
from mocov3.data.images import ImageDataset
from mocov3.data.sampling import StepSampler
from mocov3.data.sources import resolve_loader
from mocov3.data.stream import (
    BatchDecoder,
    CropSettings,
    StreamIndex,
    StreamingBatches,
    default_workers,
    request_for,
)
from mocov3.errors import ConfigError, DatasetError

SIZE = 24
CPU = torch.device("cpu")
SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work

# --------------------------------------------------------------------------- files


def smooth(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth random image: resamplers then differ by a grey level, not by aliasing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).convert(mode)


def rgba(seed: int) -> Image.Image:
    img = smooth(seed, (40, 30)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    img.putalpha(Image.fromarray(alpha))
    return img


def grey16(seed: int) -> Image.Image:
    arr = np.asarray(smooth(seed, (30, 45), "L"), dtype=np.uint16) * 257
    return Image.fromarray(arr)


def rotated_jpeg(path: Path, seed: int) -> None:
    """A JPEG stored sideways with an EXIF orientation tag (6: rotate 90 degrees to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth(seed, (50, 30)).save(path, quality=95, exif=exif.tobytes())


Writer = Callable[[Path, int], None]
WRITERS: list[tuple[str, Writer]] = [
    ("png", lambda p, s: smooth(s, (40, 30)).save(p)),
    ("jpg", lambda p, s: smooth(s, (30, 50)).save(p, quality=95)),
    ("png", lambda p, s: smooth(s, (36, 36), "L").save(p)),
    ("jpg", lambda p, s: smooth(s, (60, 40), "L").save(p, quality=95)),
    ("png", lambda p, s: rgba(s).save(p)),
    ("jpg", rotated_jpeg),
    ("png", lambda p, s: grey16(s).save(p)),
    ("gif", lambda p, s: smooth(s, (30, 30)).convert("P").save(p)),
    ("bmp", lambda p, s: smooth(s, (20, 16)).save(p)),  # upscaled
    ("jpeg", lambda p, s: smooth(s, (64, 48)).save(p, quality=90)),
    ("png", lambda p, s: smooth(s, (24, 24)).save(p)),  # already at size
    ("jpg", lambda p, s: smooth(s, (45, 30)).save(p, quality=95)),
]


def write_folder(root: Path, corrupt: bool = False) -> Path:
    """12 images in two classes (interleaved a, b, a, b, ...), optionally one corrupt JPEG
    sorted last in class a, which makes it the last item (index 12)."""
    for i, (ext, write) in enumerate(WRITERS):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"{i:02d}.{ext}", i)
    if corrupt:
        (root / "a" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("bad_images"), corrupt=True)


@pytest.fixture(scope="module")
def memory(folder: Path) -> ImageDataset:
    return load_folder(folder, "train", SIZE)


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def assert_one_line(err: pytest.ExceptionInfo[DatasetError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- index and decode


def index_of(folder: Path, **kwargs: object) -> StreamIndex:
    return StreamIndex.from_spec(f"folder:{folder}", "train", SIZE, **kwargs)  # type: ignore[arg-type]


def settings_for(index: StreamIndex, seed: int = 0, reduce: bool = True) -> CropSettings:
    return CropSettings(SIZE, index.channels, SCALE, RATIO, seed, reduce)


def expected_views(
    index: StreamIndex, indices: torch.Tensor, epoch: int, seed: int
) -> torch.Tensor:
    """Each sample's two views computed alone, from its file and its key."""
    keys = sample_keys(seed, epoch, indices)
    return torch.stack(
        [
            decode_views(index.records.read(i), keys[n : n + 1], SIZE, index.channels, SCALE, RATIO)
            for n, i in enumerate(indices.tolist())
        ]
    )


def test_index_lists_like_load_folder(folder: Path, memory: ImageDataset) -> None:
    index = index_of(folder)
    assert len(index) == len(memory) == 12 and index.classes == memory.classes == ["a", "b"]
    assert index.labels is not None and memory.labels is not None
    assert torch.equal(index.labels, memory.labels)
    assert [Path(index.name(i)).relative_to(folder).as_posix() for i in range(12)] == memory.names
    assert index.channels == memory.channels == 3
    # the sample covers all 12 images here, so the statistics should agree closely
    assert index.mean == pytest.approx(memory.mean, abs=0.01)
    assert index.std == pytest.approx(memory.std, abs=0.01)
    assert len(index_of(folder, subset=5)) == 5
    with pytest.raises(DatasetError, match="synthetic"):
        StreamIndex.from_spec("synthetic", "train", SIZE)


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_matches_memory_path(folder: Path, channels: int) -> None:
    # one decoder for both paths: the streamed image is the in-memory one, bit for bit
    reference = load_folder(folder, "train", SIZE, channels=channels)
    index = index_of(folder, channels=channels)
    for i in range(len(index)):
        image = decode_image(index.records.read(i), SIZE, channels)
        assert image.shape == (channels, SIZE, SIZE) and image.dtype == torch.uint8
        assert torch.equal(image, reference.images[i]), index.name(i)


def test_grey_folder_is_one_channel(tmp_path: Path) -> None:
    smooth(0, (30, 30), "L").save(tmp_path / "a.jpg")
    smooth(1, (30, 30), "L").convert("P").save(tmp_path / "b.png")  # a grey palette
    assert index_of(tmp_path).channels == 1


# --------------------------------------------------------------------------- batches


def collect(batches: StreamingBatches, steps: range) -> dict[int, tuple[torch.Tensor, ...]]:
    return {step: batches(step) for step in steps}


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_follow_the_sampler(folder: Path, workers: int) -> None:
    index = index_of(folder)
    sampler = StepSampler(len(index), global_batch=4, seed=3)
    settings = settings_for(index, seed=3)
    with StreamingBatches(index, sampler, CPU, settings, workers=workers) as batches:
        got = collect(batches, range(2 * sampler.steps_per_epoch))  # two epochs
        assert batches(1)[1].tolist() == sampler.indices(1).tolist()  # out of order: restart
        assert batches(2)[1].tolist() == sampler.indices(2).tolist()
    for step, (views, indices) in got.items():
        assert torch.equal(indices, sampler.indices(step))
        assert views.shape == (4, 2, 3, SIZE, SIZE) and views.dtype == torch.uint8
        epoch = sampler.epoch_and_position(step)[0]
        assert torch.equal(views, expected_views(index, indices, epoch, seed=3))
    assert not torch.equal(got[0][0][:, 0], got[0][0][:, 1])  # two different views
    with StreamingBatches(index, sampler, CPU, settings, workers=workers, start_step=4) as resumed:
        for step in (4, 5):
            views, indices = resumed(step)
            assert torch.equal(indices, got[step][1]) and torch.equal(views, got[step][0])


def test_two_ranks_see_every_sample_once_per_epoch(folder: Path) -> None:
    index = index_of(folder)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        sampler = StepSampler(len(index), global_batch=4, seed=7, rank=rank, world_size=2)
        with StreamingBatches(index, sampler, CPU, settings_for(index, 7), workers=0) as batches:
            for step in range(2 * sampler.steps_per_epoch):
                views, indices = batches(step)
                epoch = sampler.epoch_and_position(step)[0]
                assert len(indices) == 2
                assert torch.equal(views, expected_views(index, indices, epoch, seed=7))
                seen[epoch].extend(indices.tolist())
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(12))


def test_strict_raises_one_line_error(bad_folder: Path) -> None:
    index = index_of(bad_folder, channels=3, strict=True)
    sampler = StepSampler(len(index), global_batch=len(index), seed=0)
    with StreamingBatches(index, sampler, CPU, settings_for(index), workers=1) as batches:
        with pytest.raises(DatasetError) as err:
            batches(0)
    msg = assert_one_line(err)
    assert "zz_corrupt.jpg" in msg and "data.strict" in msg and "Traceback" not in msg
    with pytest.raises(DatasetError, match="zz_corrupt"):
        index.mean  # noqa: B018  the statistics sample (all 13 files) fails early too


def test_non_strict_substitutes_the_next_readable(
    bad_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = index_of(bad_folder)
    assert len(index) == 13 and index.name(12).endswith("a/zz_corrupt.jpg")
    sampler = StepSampler(len(index), global_batch=len(index), seed=0)
    with caplog.at_level(logging.WARNING, logger="mocov3.data.stream"):
        with StreamingBatches(index, sampler, CPU, settings_for(index), workers=1) as batches:
            for step in range(3):
                views, indices = batches(step)
                assert views.shape[0] == 13 and sorted(indices.tolist()) == list(range(13))
                where = indices.tolist().index(12)
                # (12 + 1) % 13: the first image stands in, cut with the requested key
                key = sample_keys(0, step, torch.tensor([12]))
                data = index.records.read(0)
                stand_in = decode_views(data, key, SIZE, 3, SCALE, RATIO)
                assert torch.equal(views[where], stand_in)
            assert batches.skipped == 1
    warnings = [r.getMessage() for r in caplog.records if "zz_corrupt" in r.getMessage()]
    assert len(warnings) == 2  # once when met, once in the summary at close()
    assert "stands in" in warnings[0] and "1 unreadable" in warnings[1]


def test_close_stops_the_workers(folder: Path) -> None:
    index = index_of(folder)
    sampler = StepSampler(len(index), global_batch=4, seed=0)
    batches = StreamingBatches(index, sampler, CPU, settings_for(index), workers=2)
    batches(0)
    workers = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert len(workers) >= 2
    batches.close()
    batches.close()  # idempotent
    assert not any(p.is_alive() for p in workers)
    with pytest.raises(RuntimeError, match="close"):
        batches(1)


def test_worker_exception_becomes_one_line(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> object:
        raise ValueError("view boxes broke\nacross lines")

    monkeypatch.setattr(stream, "view_boxes", broken)  # inherited by the forked worker
    index = index_of(folder, channels=3)
    sampler = StepSampler(len(index), global_batch=4, seed=0)
    with StreamingBatches(index, sampler, CPU, settings_for(index), workers=1) as batches:
        with pytest.raises(DatasetError) as err:
            batches(0)
    assert "across lines" in assert_one_line(err) and "data.workers=0" in str(err.value)


def test_gpu_decoding_is_refused_without_a_gpu(folder: Path) -> None:
    index = index_of(folder)
    sampler = StepSampler(len(index), global_batch=4, seed=0)
    settings = CropSettings(SIZE, 3, SCALE, RATIO, 0, True, "gpu")
    with pytest.raises(ConfigError, match="data.decode=cpu"):
        StreamingBatches(index, sampler, CPU, settings, workers=0)


# --------------------------------------------------------------------------- policies


def test_default_workers_keeps_a_core_for_training() -> None:
    assert default_workers(1, cpus=1) == 0
    assert default_workers(1, cpus=2) == 1
    assert default_workers(2, cpus=2) == 0  # one core each: decode in the training thread
    assert default_workers(4, cpus=16) == 3
    assert default_workers(1, cpus=128) == stream.MAX_WORKERS
    assert default_workers(1, cpus=16, device_type="cpu") == 0  # the CPU step uses every core
    assert default_workers() >= 0


def test_resolve_loader() -> None:
    config = Config()
    assert resolve_loader(config) == "memory"  # fashion-mnist
    config.data.loader = "stream"
    with pytest.raises(ConfigError, match="none of them"):
        resolve_loader(config)
    config.data.name, config.data.image_size, config.data.memory_limit_gb = "folder:/x", 100, 1.0
    assert resolve_loader(config, 10) == "stream"
    config.data.loader = "auto"
    assert resolve_loader(config, 33_333) == "memory"  # 33_333 * 3 * 100 * 100 < 1e9 bytes
    assert resolve_loader(config, 33_334) == "stream"
    assert resolve_loader(config, 99_999, channels=1) == "memory"
    # the count is the split's as read, any subset applied: data.subset is not taken again
    # (it names the train split's size; a test split of 10**7 is 10**7)
    config.data.subset = 1000
    assert resolve_loader(config, 10**7) == "stream"
    assert resolve_loader(config, 1000) == "memory"


def test_load_split_decodes_only_the_subset(bad_folder: Path, tmp_path: Path) -> None:
    # the corrupt file is the last item: strict fails on the whole folder, not on a subset
    with pytest.raises(DatasetError, match="zz_corrupt"):
        load_split(f"folder:{bad_folder}", "train", image_size=SIZE, strict=True)
    subset = load_split(f"folder:{bad_folder}", "train", image_size=SIZE, strict=True, subset=5)
    full = load_folder(bad_folder, "train", SIZE)
    assert len(subset) == 5 and torch.equal(subset.images, full.images[:5])
    assert subset.names == (full.names or [])[:5]
    (write_folder(tmp_path) / "a" / "00.png").write_bytes(b"not a png")  # the first item
    fill = load_split(f"folder:{tmp_path}", "train", image_size=SIZE, subset=5)
    assert len(fill) == 5 and fill.skipped == 1  # the 6th file makes up for the bad one
    assert fill.names == (load_folder(tmp_path, "train", SIZE).names or [])[:5]


def test_jpegs_the_device_refuses_are_decoded_on_the_cpu(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.decode=gpu leaves plain JPEGs to the device; one it refuses (an encoding nvJPEG
    lacks) is decoded on the CPU with the same boxes: the views are the worker path's."""
    index = index_of(folder)
    sampler = StepSampler(len(index), global_batch=12, seed=3)
    gpu = CropSettings(SIZE, 3, SCALE, RATIO, 3, True, "gpu")
    batch = BatchDecoder(index.records, gpu, False)[request_for(sampler, 0)]
    assert batch.views is not None and len(batch.pending) >= 3  # the folder's plain JPEGs

    def refuse(*args: object, **kwargs: object) -> object:
        raise RuntimeError("nvJPEG: unsupported encoding")

    monkeypatch.setattr(crops, "decode_jpeg", refuse)
    failed = decode_pending(batch.views, batch.pending, SIZE, 3)
    assert failed == batch.pending
    fallback = BatchDecoder(index.records, gpu, False)
    assert all(fallback.fill_on_cpu(batch, item) for item in failed)
    assert torch.equal(batch.views, expected_views(index, batch.indices, 0, seed=3))
    assert not batch.failures
