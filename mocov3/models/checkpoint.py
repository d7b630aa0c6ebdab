"""A checkpoint opened as a model: the MoCo model its own config describes, with its
weights, for evaluation, export and embedding.

Training checkpoints and imported reference checkpoints open the same way; one that holds
only a backbone (imported from a linear probe) gives the query backbone only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mocov3.config import Config, apply_overrides, config_from_dict
from mocov3.errors import CheckpointError
from mocov3.models.moco import MoCo, build_moco, load_model_state
from mocov3.models.vit import set_class_token_only
from mocov3.runtime.checkpoint import load_checkpoint


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

    @property
    def in_chans(self) -> int:
        """The image channels the backbone takes."""
        return int(self.state["in_chans"])

    def backbone(self, encoder: str = "query") -> nn.Module:
        """The query (default) or momentum backbone, in eval mode."""
        if encoder == "momentum" and self.state.get("backbone_only"):
            raise CheckpointError(
                f"{self.path} holds only the query backbone (imported from a linear-probe "
                "checkpoint): use the query encoder"
            )
        backbone = self.model.encoder_backbone(encoder).eval()
        # every token, as a standalone ViT and an export run it (pretraining's shortcut off)
        set_class_token_only(backbone, False)
        return backbone


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
