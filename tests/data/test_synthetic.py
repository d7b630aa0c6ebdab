"""The synthetic texture classes: deterministic, balanced, disjoint splits, and a task raw
pixels only partly solve."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from mocov3.data.images import ImageDataset
from mocov3.data.synthetic import make_synthetic
from mocov3.errors import DatasetError


def knn_accuracy(train: ImageDataset, test: ImageDataset) -> float:
    """Cosine 1-nearest-neighbour accuracy on raw pixels, train -> test."""
    a = F.normalize(train.images.flatten(1).float(), dim=1)
    b = F.normalize(test.images.flatten(1).float(), dim=1)
    assert train.labels is not None and test.labels is not None
    pred = train.labels[(b @ a.T).argmax(dim=1)]
    return (pred == test.labels).float().mean().item()


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    a = make_synthetic("train", 300, 16, seed=3)
    b = make_synthetic("train", 300, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # type: ignore[arg-type]
    assert not torch.equal(a.images, make_synthetic("train", 300, 16, seed=4).images)
    test = make_synthetic("test", 300, 16, seed=3)
    assert not torch.equal(a.images, test.images)
    train_set = {bytes(x.numpy()) for x in a.images}
    assert not any(bytes(x.numpy()) in train_set for x in test.images)  # disjoint


def test_synthetic_shapes_balance_and_stats() -> None:
    ds = make_synthetic("train", 1003, 24, channels=3, num_classes=7)
    assert ds.images.shape == (1003, 3, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.labels is not None and len(ds.classes) == 7
    counts = torch.bincount(ds.labels)
    assert len(counts) == 7 and counts.max() - counts.min() <= 1
    x = ds.images.double() / 255
    assert ds.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-6)
    assert ds.std == pytest.approx(tuple(x.std(dim=(0, 2, 3)).tolist()), abs=1e-4)
    with pytest.raises(DatasetError):
        make_synthetic("train", 10, 16, num_classes=11)


def test_synthetic_is_a_meaningful_task() -> None:
    start = time.perf_counter()
    train = make_synthetic("train", 2048, 32)
    seconds = time.perf_counter() - start
    assert torch.bincount(train.labels).tolist() == [205] * 8 + [204] * 2  # type: ignore[arg-type]
    acc = knn_accuracy(train, make_synthetic("test", 512, 32))
    assert 0.30 < acc < 0.99, f"raw-pixel 1-NN accuracy {acc:.3f}"
    assert seconds < 3.0, f"generating 2048 images took {seconds:.2f} s"
