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
