"""The Python API: build a model, load a backbone, save and read export directories.

A backbone is loaded the same way whether it sits in a training checkpoint, a run
directory or an export directory, so downstream code does not care where it came from::

    import mocov3
    backbone = mocov3.load_backbone("runs/demo")          # or an export directory
    features = backbone(images)                            # [B, D], eval mode
    mocov3.save_pretrained(backbone, "export/demo")
    same = mocov3.from_pretrained("export/demo")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mocov3.config import Config, config_from_dict, load_config
from mocov3.data.datasets import default_channels
from mocov3.errors import ExportError
from mocov3.interop import pretrained
from mocov3.interop.pretrained import CONFIG_NAME, from_pretrained
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS, MoCo, build_moco

__all__ = ["build_model", "from_pretrained", "load_backbone", "save_pretrained"]


def build_model(
    config: Config | str | Path | dict[str, Any] | None = None, in_chans: int | None = None
) -> MoCo:
    """A freshly initialised MoCo v3 model (backbone, heads, momentum copy).

    ``config``: a :class:`Config`, a packaged preset's name or a YAML path, a dict as
    saved in checkpoints, or None for the paper's ViT-S defaults. ``in_chans`` defaults to
    ``data.channels``, else the dataset's own (1 for Fashion-MNIST and synthetic data, 3
    for folders)."""
    if config is None or isinstance(config, (str, Path)):
        config = load_config(None if config is None else str(config), [])
    elif isinstance(config, dict):
        config = config_from_dict(config)
    channels = in_chans or config.data.channels or default_channels(config.data.name)
    return build_moco(config, channels)


def load_backbone(path_or_dir: str | Path, encoder: str = "query") -> nn.Module:
    """The ``encoder`` backbone of a checkpoint file, a run directory or an export
    directory, in eval mode; calling it on images returns their features ``[B, D]``."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be query or momentum, got {encoder!r}")
    path = Path(path_or_dir)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        held = pretrained.read_pretrained_config(path).get("encoder", encoder)
        if held != encoder:
            raise ExportError(f"{path} holds the {held} encoder; pass encoder={held!r}")
        return from_pretrained(path)
    return open_checkpoint(path).backbone(encoder)


def save_pretrained(
    model: nn.Module, directory: str | Path, encoder: str = "query", timm: bool = True
) -> Path:
    """Write a backbone (or the ``encoder`` backbone of a :class:`MoCo`) as an export
    directory that :func:`from_pretrained`, :func:`load_backbone` and timm can read."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be query or momentum, got {encoder!r}")
    if isinstance(model, MoCo):
        model = model.encoder_backbone(encoder)
    return pretrained.save_pretrained(
        model, directory, extra={"encoder": encoder}, timm_fields=timm
    )
