"""Every interop test runs offline: timm's ``local-dir:`` must never reach for the Hub, and
a push is tested up to its upload call only. ``write_run`` makes a small run directory."""

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from mocov3.config import load_config
from mocov3.models.moco import build_moco
from mocov3.runtime.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection, or any of timm's Hub or URL loaders, fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[1:2] or args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._factory, "load_model_config_from_hf", refuse)


def _write_run(tmp_path: Path, overrides: list[str], preset: str = "configs/tiny.yaml") -> Path:
    """A run directory with checkpoint.pt (query != momentum), summary.json, linear.json."""
    config = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_moco(config, 1)
    with torch.no_grad():
        for parameter in model.momentum_parameters():
            parameter.add_(0.01)
    state = {
        "model": model.state_dict(),
        "config": config.to_dict(),
        "in_chans": 1,
        "mean": [0.286],
        "std": [0.353],
        "epoch": 2.0,
        "version": "0.1.0",
    }
    run = tmp_path / "run"
    save_checkpoint(state, run / "checkpoint.pt")
    (run / "summary.json").write_text(json.dumps({"knn_top1": 71.25, "knn_top1_init": 40.0}))
    (run / "linear.json").write_text(json.dumps({"linear_top1": 77.5}))
    return run


@pytest.fixture
def write_run() -> Callable[..., Path]:
    """``write_run(tmp_path, overrides, preset=...)``: a 1-channel run directory."""
    return _write_run
