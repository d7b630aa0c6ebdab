"""Shared fixtures: one tiny pretrained run per test session, for the evaluation tests, and
the torch thread count restored after every test (train.threads changes it)."""

from pathlib import Path

import pytest
import torch

from mocov3.config import load_config
from mocov3.train.trainer import pretrain


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Run directory of a 2-epoch tiny pretraining on 2048 Fashion-MNIST images (seconds)."""
    out = tmp_path_factory.mktemp("tiny_run")
    config = load_config("configs/tiny.yaml", ["eval.knn_init=false", "train.epochs=2"])
    pretrain(config, out)
    return out


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_folder(tmp_path_factory) -> Path:
    """Real Fashion-MNIST images as a folder dataset: 4 classes, 40 train and 10 val PNGs
    each at the tiny run's 28 px, so an in-memory and a streamed read see the same pixels."""
    from PIL import Image

    from mocov3.data.datasets import load_fashion_mnist

    root = tmp_path_factory.mktemp("fashion_folder")
    for split, source, per_class in (("train", "train", 40), ("val", "test", 10)):
        data = load_fashion_mnist(source)
        for label in range(4):
            folder = root / split / data.classes[label].replace("/", "-")
            folder.mkdir(parents=True)
            rows = (data.labels == label).nonzero().flatten()[:per_class]
            for i in rows.tolist():
                Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    return root
