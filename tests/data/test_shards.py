"""Tests for mocov3.data.shards: converting datasets to WebDataset shards that read back
exactly like their source."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocov3.data.datasets import load_split
from mocov3.data.records import FolderRecords, open_records
from mocov3.data.shards import write_shards
from mocov3.errors import DatasetError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCOV3_CACHE", str(cache))
    return cache


def make_folder(root: Path, n: int = 4) -> Path:
    """root/{a,b}/ (no split folders: root is the train split), JPEG and PNG mixed."""
    rng = np.random.default_rng(0)
    for name in "ab":
        (root / name).mkdir(parents=True)
        for k in range(n):
            pixels = rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)
            ext = ".JPEG" if k % 2 else ".png"
            Image.fromarray(pixels).save(root / name / f"{k}{ext}")
    return root


def one_line_error(excinfo: pytest.ExceptionInfo[DatasetError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_synthetic_round_trips_pixels_exactly_through_png(tmp_path: Path) -> None:
    summary = write_shards(
        "synthetic", tmp_path / "out", max_count=3, synthetic_size=8, image_size=16, seed=0
    )
    source = load_split("synthetic", "train", synthetic_size=8, image_size=16, seed=0)
    train = summary["splits"]["train"]
    assert train["shards"] == 3 and train["samples"] == 8
    assert train["pattern"] == f"wds:{tmp_path / 'out'}/train-{{000000..000002}}.tar"
    assert summary["splits"]["test"]["samples"] == 512  # synthetic test split: max(512, n/4)
    assert summary["classes"] == source.classes
    records = open_records(train["pattern"])
    assert len(records) == 8
    for i in range(8):
        assert records.name(i).endswith(f"{i:08d}.png")
        pixels = np.asarray(Image.open(io.BytesIO(records.read(i))))
        assert np.array_equal(pixels, source.images[i, 0].numpy())
    assert records.labels is not None and source.labels is not None
    assert records.labels.tolist() == source.labels.tolist()


def test_folder_bytes_are_copied_under_their_own_extension(tmp_path: Path) -> None:
    folder = FolderRecords(make_folder(tmp_path / "images"))
    summary = write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "out", max_bytes=1)
    train = summary["splits"]["train"]
    assert list(summary["splits"]) == ["train"]  # no val/ folder: no test split
    assert train["shards"] == len(folder) == 8  # max_bytes=1: one sample per shard
    assert folder.name(2).endswith("a/1.JPEG")  # classes interleave: a/0, b/0, a/1, ...
    with tarfile.open(tmp_path / "out" / "train-000002.tar") as tar:
        assert tar.getnames() == ["00000002.cls", "00000002.jpeg"]
        assert tar.extractfile("00000002.jpeg").read() == folder.read(2)
    assert train["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.tar"))
    records = open_records(train["pattern"])
    assert [records.read(i) for i in range(8)] == [folder.read(i) for i in range(8)]
    # the class names travel in classes.txt beside the shards
    assert (tmp_path / "out" / "classes.txt").read_text() == "a\nb\n"
    assert records.classes == folder.classes == ["a", "b"]
    (tmp_path / "out" / "classes.txt").write_text("only one\n")  # too few: ids as names
    assert open_records(train["pattern"]).classes == ["0", "1"]


def test_shards_convert_to_shards_again(tmp_path: Path) -> None:
    make_folder(tmp_path / "images")
    first = write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "one", max_count=3)
    second = write_shards(first["splits"]["train"]["pattern"], tmp_path / "two", max_count=5)
    a, b = open_records(first["splits"]["train"]["pattern"]), open_records(f"wds:{tmp_path}/two")
    assert second["splits"]["train"]["shards"] == 2
    assert [a.read(i) for i in range(8)] == [b.read(i) for i in range(8)]
    assert a.labels.tolist() == b.labels.tolist()


def test_refuses_an_out_dir_that_holds_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("notes")  # other files are no obstacle
    write_shards("synthetic", out, synthetic_size=4, image_size=8, subset=4)
    with pytest.raises(DatasetError) as e:
        write_shards("synthetic", out, synthetic_size=4, image_size=8, subset=4)
    assert "already holds shards" in one_line_error(e)


def test_a_failed_conversion_leaves_no_shards(tmp_path: Path, monkeypatch) -> None:
    make_folder(tmp_path / "images")

    def failing_read(self: FolderRecords, i: int) -> bytes:
        if i == 5:
            raise PermissionError(13, "Permission denied")
        return self.path(i).read_bytes()

    monkeypatch.setattr(FolderRecords, "read", failing_read)
    with pytest.raises(DatasetError) as e:
        write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "out", max_count=2)
    assert "Permission denied" in one_line_error(e) and "images/b/2.png" in str(e.value)
    assert not list((tmp_path / "out").glob("*.tar"))  # so that a rerun is not refused


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "images")
    with pytest.raises(DatasetError) as e:
        write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "out", image_size=32)
    assert "original files" in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        write_shards("synthetic", tmp_path / "out", max_count=0)
    assert "max_count" in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        write_shards("nonsense", tmp_path / "out")
    assert "folder:PATH, wds:PATTERN or hf:PATH" in one_line_error(e)


def test_hf_source_keeps_its_stored_bytes(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    make_folder(tmp_path / "images", n=2)
    files = sorted((tmp_path / "images").rglob("*.*"))
    features = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files]}, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    summary = write_shards(f"hf:{tmp_path / 'hf'}", tmp_path / "out")
    assert list(summary["splits"]) == ["train", "test"]
    records = open_records(summary["splits"]["train"]["pattern"])
    assert records.labels is None
    assert [records.read(i) for i in range(4)] == [f.read_bytes() for f in files]
    assert [Path(records.name(i)).suffix for i in range(4)] == [".png", ".jpg", ".png", ".jpg"]
