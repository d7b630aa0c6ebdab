"""Folder layout helpers: specs, split names, and which folders count as an evaluation split."""

from __future__ import annotations

from pathlib import Path

import pytest

from mocov3.data.folders import check_split, folder_root, walk_images
from mocov3.data.records import has_test_split
from mocov3.errors import DatasetError


def test_folder_specs_and_split_names(tmp_path: Path) -> None:
    assert folder_root(f"folder:{tmp_path}") == str(tmp_path)
    assert folder_root(" Folder: /data ") == "/data"
    assert folder_root("fashion-mnist") is None and folder_root("synthetic") is None
    with pytest.raises(DatasetError, match="write folder:PATH"):
        folder_root("folder:  ")
    assert check_split("val") == "test" and check_split(" Train ") == "train"
    with pytest.raises(DatasetError, match="unknown split"):
        check_split("validation")


def test_an_evaluation_split_is_a_val_or_test_folder(tmp_path: Path) -> None:
    assert has_test_split("fashion-mnist") and has_test_split("synthetic")
    assert not has_test_split(f"folder:{tmp_path}")
    (tmp_path / "test").mkdir()
    assert has_test_split(f"folder:{tmp_path}")


def test_walk_finds_visible_images_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b/2.png", "a/1.JPG", "a/.hidden.png", ".cache/x.png", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in walk_images(tmp_path)] == [
        "a/1.JPG",
        "b/2.png",
    ]
