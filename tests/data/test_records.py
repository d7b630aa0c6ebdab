"""Tests for mocov3.data.records: random access to encoded images of folders, shards and
Hugging Face datasets, and the one-line errors for bad input."""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from mocov3.data.records import FolderRecords, ShardRecords, expand_shards, open_records
from mocov3.data.shards import write_shards
from mocov3.errors import DatasetError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shard indexes go to the test's folder, never to the user's ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCOV3_CACHE", str(cache))
    return cache


def image_bytes(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6 + seed % 3, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, per_class: int = 3, splits: tuple[str, ...] = ("train",)) -> Path:
    """root/SPLIT/{a,b}/ with per_class images each, JPEG and PNG mixed."""
    for s, split in enumerate(splits):
        for c, name in enumerate("ab"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                ext, fmt = (".jpg", "JPEG") if k % 2 else (".png", "PNG")
                (folder / f"{k}{ext}").write_bytes(image_bytes(100 * s + 10 * c + k, fmt))
    return root


def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[DatasetError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture
def shards(tmp_path: Path) -> tuple[FolderRecords, dict]:
    """A labelled folder with train and val splits, converted to 3 + 3 shards of 2."""
    folder = make_folder(tmp_path / "images", splits=("train", "val"))
    summary = write_shards(f"folder:{folder}", tmp_path / "shards", max_count=2)
    return FolderRecords(folder, "train"), summary


# --------------------------------------------------------------------------- round trips


def test_folder_shards_round_trip_reads_alike(shards, tmp_path: Path) -> None:
    folder, summary = shards
    train = open_records(summary["splits"]["train"]["pattern"])
    assert summary["splits"]["train"]["shards"] == 3 and len(train) == len(folder) == 6
    for i in range(len(folder)):
        assert train.read(i) == folder.read(i)
        assert Path(train.name(i)).suffix == folder.path(i).suffix  # original extension kept
    assert train.labels is not None and folder.labels is not None
    assert train.labels.tolist() == folder.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert train.classes == folder.classes == ["a", "b"]  # classes.txt names them
    test = open_records(summary["splits"]["test"]["pattern"])
    folder_test = open_records(f"folder:{tmp_path / 'images'}", "val")
    assert [test.read(i) for i in range(6)] == [folder_test.read(i) for i in range(6)]


def test_brace_directory_and_glob_forms_list_the_same_samples(shards, tmp_path: Path) -> None:
    _, summary = shards
    out = tmp_path / "shards"
    names = [f"{out}/train-00000{k}.tar" for k in range(3)]
    assert expand_shards(f"{out}/train-{{000000..000002}}.tar") == names
    assert expand_shards(f"{out}/train-*.tar") == names
    assert expand_shards(str(out)) == names  # the val-*.tar beside them stay out of training
    assert expand_shards(f"{out}/val-{{000000..000001}}.tar") == [
        f"{out}/val-00000{k}.tar" for k in range(2)
    ]
    by_dir = open_records(f"wds:{out}")
    by_brace = open_records(summary["splits"]["train"]["pattern"])
    assert [by_dir.name(i) for i in range(6)] == [by_brace.name(i) for i in range(6)]


def no_tar(*args, **kwargs):
    raise AssertionError("a shard was scanned again despite its saved index")


def test_converted_shards_are_never_scanned(
    shards, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mocov3 shards` writes each shard's index beside it; a copy with a new mtime keeps
    it, a shard of another size does not."""
    folder, _ = shards
    assert len(list((tmp_path / "shards").glob("train-*.tar.idx.npz"))) == 3
    monkeypatch.setattr(tarfile, "open", no_tar)
    records = open_records(f"wds:{tmp_path / 'shards'}")
    assert [records.read(i) for i in range(6)] == [folder.read(i) for i in range(6)]
    assert not (cache_dir / "shard-index").exists()
    os.utime(tmp_path / "shards" / "train-000001.tar", ns=(1, 1))  # copied: still trusted
    open_records(f"wds:{tmp_path / 'shards'}")
    with open(tmp_path / "shards" / "train-000001.tar", "ab") as shard:
        shard.write(bytes(512))  # another size: the sidecar is not this shard's
    with pytest.raises(AssertionError, match="scanned again"):
        open_records(f"wds:{tmp_path / 'shards'}")


def test_index_cache_is_used_on_the_second_open(
    shards, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards made elsewhere have no sidecar: the first open scans them into the cache."""
    folder, _ = shards
    for sidecar in (tmp_path / "shards").glob("*.idx.npz"):
        sidecar.unlink()
    first = open_records(f"wds:{tmp_path / 'shards'}")
    assert len(list((cache_dir / "shard-index").glob("*.npz"))) == 3
    monkeypatch.setattr(tarfile, "open", no_tar)
    again = open_records(f"wds:{tmp_path / 'shards'}")
    assert [again.read(i) for i in range(6)] == [folder.read(i) for i in range(6)]
    assert again.labels.tolist() == first.labels.tolist()
    os.utime(tmp_path / "shards" / "train-000001.tar", ns=(1, 1))  # a changed shard: rescan
    with pytest.raises(AssertionError, match="scanned again"):
        open_records(f"wds:{tmp_path / 'shards'}")


def test_subset_pickle_and_few_open_files(shards, tmp_path: Path) -> None:
    folder, _ = shards
    records = ShardRecords(expand_shards(str(tmp_path / "shards")), subset=5)
    assert len(records) == 5 and records.labels is not None and len(records.labels) == 5
    copy = pickle.loads(pickle.dumps(records))
    copy._handles.limit = 1  # reads across shards reopen files instead of holding them all
    assert [copy.read(i) for i in (0, 4, 2, 0)] == [folder.read(i) for i in (0, 4, 2, 0)]
    assert len(pickle.dumps(records)) < 4000  # arrays, not per-sample Python objects
    records.close()


# --------------------------------------------------------------------------- damaged shards


def labelled_samples(n: int) -> list[dict[str, bytes | str]]:
    return [
        {"__key__": f"{i:04d}", "png": image_bytes(i, "PNG"), "cls": str(i % 2)} for i in range(n)
    ]


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path: Path, caplog) -> None:
    samples = labelled_samples(6)
    path = write_tar(tmp_path / "cut.tar", samples)
    with tarfile.open(path) as tar:
        image3 = tar.getmember("0003.png")
    with open(path, "r+b") as f:  # cut in the middle of sample 3's image
        f.truncate(image3.offset_data + image3.size // 2)
    with caplog.at_level(logging.WARNING):
        records = open_records(f"wds:{path}")
    assert len(records) == 3
    assert [records.read(i) for i in range(3)] == [s["png"] for s in samples[:3]]
    assert records.labels.tolist() == [0, 1, 0]
    assert [name for name, _ in records.dropped] == [f"{path}:0003"]
    assert "truncated" in records.dropped[0][1]
    assert len(caplog.records) == 1 and f"{path}:0003" in caplog.text


def test_shard_cut_between_samples_is_recorded(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "cut.tar", labelled_samples(4))
    with tarfile.open(path) as tar:
        start = tar.getmember("0002.cls").offset  # the header of sample 2's first member
    with open(path, "r+b") as f:
        f.truncate(start)
    records = open_records(f"wds:{path}")
    assert len(records) == 2
    assert [name for name, _ in records.dropped] == [str(path)]


def test_sample_without_an_image_is_dropped_and_recorded(tmp_path: Path, caplog) -> None:
    path = write_tar(
        tmp_path / "mixed.tar",
        [
            {"__key__": "a", "jpg": image_bytes(1, "JPEG"), "json": "{}"},
            {"__key__": "b", "json": "{}"},
            {"__key__": "c", "PNG": image_bytes(2, "PNG")},  # extensions match in any case
        ],
    )
    with caplog.at_level(logging.WARNING):
        records = open_records(f"wds:{path}")
    assert len(records) == 2 and records.labels is None and records.classes == []
    assert [records.name(i) for i in range(2)] == [f"{path}:a.jpg", f"{path}:c.PNG"]
    assert records.dropped == [(f"{path}:b", "no image member (has .json)")]
    assert len(caplog.records) == 1


# --------------------------------------------------------------------------- one-line errors


def test_shard_pattern_errors_are_one_line(shards, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    for spec in ("wds:", "wds:  "):
        with pytest.raises(DatasetError) as e:
            open_records(spec)
        assert "no pattern" in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{tmp_path}/nothing-{{000000..000003}}.tar")
    assert "matches no file" in one_line_error(e)
    (out / "train-000001.tar").unlink()
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{out}/train-{{000000..000002}}.tar")
    assert str(out / "train-000001.tar") in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{out}", split="val")
    assert "one split" in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        open_records("imagenet:/data")
    assert "folder:PATH, wds:PATTERN or hf:PATH" in one_line_error(e)


def test_files_that_are_not_usable_shards_are_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.tar"
    text.write_text("these are notes\nnot a tar archive\n" * 40)
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{text}")
    assert str(text) in one_line_error(e) and "not a tar" in str(e.value)
    json_only = write_tar(tmp_path / "meta.tar", [{"__key__": "x", "json": "{}"}])
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{json_only}")
    assert "no image members" in one_line_error(e)
    gz = tmp_path / "z.tar"
    gz.write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{gz}")
    assert "gunzip" in one_line_error(e)


def test_inconsistent_or_bad_labels_are_refused(tmp_path: Path) -> None:
    partly = labelled_samples(2) + [{"__key__": "9999", "png": image_bytes(9, "PNG")}]
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{write_tar(tmp_path / 'partly.tar', partly)}")
    assert "1 of 3 samples have no .cls" in one_line_error(e) and "9999.png" in str(e.value)
    bad = [{"__key__": "k", "png": image_bytes(1, "PNG"), "cls": "cat"}]
    with pytest.raises(DatasetError) as e:
        open_records(f"wds:{write_tar(tmp_path / 'bad.tar', bad)}")
    assert "k.cls" in one_line_error(e) and "decimal" in str(e.value)


# --------------------------------------------------------------------------- Hugging Face


def save_hf(tmp_path: Path, split_dict: bool) -> tuple[Path, list[Path], list[int]]:
    datasets = pytest.importorskip("datasets")
    folder = make_folder(tmp_path / "hf-images")
    files = sorted((folder / "train").rglob("*.*"))
    labels = [0 if f.parent.name == "a" else 1 for f in files]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    data = {"image": [str(f) for f in files], "label": labels}
    ds = datasets.Dataset.from_dict(data, features=features)
    if split_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})
    ds.save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf", files, labels


def test_hf_records_return_the_stored_image_bytes(tmp_path: Path) -> None:
    path, files, labels = save_hf(tmp_path, split_dict=False)
    records = open_records(f"hf:{path}")
    assert len(records) == len(files) and records.classes == ["cat", "dog"]
    assert records.labels is not None and records.labels.tolist() == labels
    for i, file in enumerate(files):
        decoded = np.asarray(Image.open(io.BytesIO(records.read(i))))
        assert np.array_equal(decoded, np.asarray(Image.open(file)))
    with pytest.raises(DatasetError) as e:
        open_records(f"hf:{path}", "test")
    assert "single Dataset" in one_line_error(e)


def test_hf_dataset_dict_picks_the_split(tmp_path: Path) -> None:
    path, files, labels = save_hf(tmp_path, split_dict=True)
    train, test = open_records(f"hf:{path}"), open_records(f"hf:{path}", "val", subset=1)
    assert len(train) == len(files) and len(test) == 1
    assert test.read(0) == train.read(0) and test.labels.tolist() == labels[:1]


def test_hf_dataset_without_an_image_column_is_refused(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DatasetError) as e:
        open_records(f"hf:{tmp_path / 'text'}")
    assert "no image column (columns: text)" in one_line_error(e)
    with pytest.raises(DatasetError) as e:
        open_records(f"hf:{tmp_path / 'missing'}")
    assert "save_to_disk" in one_line_error(e)


def test_open_shard_budget_follows_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from mocov3.data import tar_index

    for soft, budget in ((1024, 64), (65536, 4096), (100, 16)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, 1 << 20))
        assert tar_index.open_file_budget() == budget
        assert tar_index.OpenShards().limit == budget
