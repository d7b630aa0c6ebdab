"""What every evaluation command shares: a backbone from a checkpoint, and the data it
was trained on (overridable), so each command is a few lines on top."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocov3.config import Config, apply_overrides, config_from_dict
from mocov3.engine.checkpoint import CheckpointError, load_checkpoint
from mocov3.models.moco import MoCo, build_moco, load_model_state


@dataclass
class LoadedRun:
    """A checkpoint opened for evaluation."""

    model: MoCo
    config: Config
    state: dict[str, Any]
    path: Path

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint lives in (results are written beside it)."""
        return self.path.parent if self.path.is_file() else self.path

    def backbone(self, encoder: str = "query") -> nn.Module:
        """The query (default) or momentum backbone, in eval mode."""
        if encoder not in ("query", "momentum"):
            raise ValueError(f"encoder must be query or momentum, got {encoder!r}")
        if encoder == "momentum" and self.state.get("backbone_only"):
            raise CheckpointError(
                f"{self.path} holds only the query backbone (imported from a linear-probe "
                "checkpoint): use the query encoder"
            )
        chosen = self.model.backbone if encoder == "query" else self.model.momentum_backbone
        return chosen.eval()


def open_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRun:
    """Load a checkpoint (weights_only), rebuild its model from its own config, apply
    ``key=value`` overrides (e.g. ``data.name=...``) to the config."""
    path = Path(path)
    state = load_checkpoint(path)
    config = apply_overrides(config_from_dict(state["config"]), list(overrides))
    model = build_moco(config, int(state["in_chans"]))
    if state.get("backbone_only"):  # e.g. imported from a linear probe: no heads, no momentum
        backbone = {k.removeprefix("backbone."): v for k, v in state["model"].items()}
        load_model_state(model.backbone, backbone, path)
    else:
        load_model_state(model, state["model"], path)
    return LoadedRun(model=model, config=config, state=state, path=path)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to prove later that nothing changed."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """True when every tensor of ``module`` equals its snapshot bit for bit."""
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[name].detach().cpu(), before[name].cpu()) for name in before
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--data-dir``, shared by every command that reads a dataset."""
    parser.add_argument("--data", help="fashion-mnist | folder:PATH | synthetic")
    parser.add_argument("--data-dir", help="folder holding the Fashion-MNIST idx files")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``--data``/``--data-dir`` as config overrides (``data.name=...``)."""
    overrides = []
    if args.data:
        overrides.append(f"data.name={args.data}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return overrides
