"""Backbone features of a folder of images or of a dataset split, saved as a safetensors
file (``mocov3 embed``).

The file holds ``features`` (float32 ``[N, D]``, the backbone output, i.e. the class token
after the final LayerNorm) and, for labelled data, ``labels`` (int64 ``[N]``). Its metadata
(string values) holds ``names`` (a JSON list: file paths relative to ``--images``, the
dataset's own file names for folder data, ``split/index`` otherwise), ``classes`` (a JSON
list, labelled data only), ``encoder``, ``checkpoint``, ``image_size``, ``channels``,
``source`` and ``precision``. :func:`load_embeddings` reads such a file back.

Images are decoded by the decoder training uses (:mod:`mocov3.data.decode`: same modes,
shorter side to ``data.image_size``, centre crop, the checkpoint's channel count) and
normalised with the mean/std stored in the checkpoint, i.e. the statistics the backbone
was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mocov3.config import Config
from mocov3.data.datasets import load_image_files, load_split
from mocov3.data.folders import IMAGE_EXTENSIONS, walk_images
from mocov3.errors import DatasetError
from mocov3.eval.knn import extract_features
from mocov3.models.checkpoint import LoadedRun
from mocov3.runtime.device import resolve_device
from mocov3.runtime.precision import eval_precision


@dataclass
class EmbedInput:
    """uint8 images to embed with their names, labels (or None) and class names."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    names: list[str]
    labels: torch.Tensor | None
    classes: list[str]
    source: str
    skipped: int = 0


def read_image_folder(folder: str | Path, image_size: int, channels: int) -> EmbedInput:
    """Every image file under ``folder`` (recursively, sorted, hidden entries skipped),
    decoded as folder data is; unreadable files are skipped and counted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist: pass --images FOLDER")
    files = list(walk_images(root))
    if not files:
        raise DatasetError(
            f"{root} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))}): check --images"
        )
    ds = load_image_files(root, files, image_size, channels)
    names = ds.names or []
    return EmbedInput(ds.images, names, None, [], f"images:{root}", ds.skipped)


def read_split(config: Config, split: str, channels: int) -> EmbedInput:
    """One split of ``config.data`` at the checkpoint's size and channel count
    (``data.subset`` applies to the train split, as in pretraining)."""
    d = config.data
    ds = load_split(
        d.name,
        split,
        data_dir=d.data_dir,
        image_size=d.image_size,
        channels=channels,
        synthetic_size=d.synthetic_size,
        seed=config.train.seed,
        subset=d.subset if split == "train" else None,
    )
    names = ds.names if ds.names is not None else [f"{split}/{i}" for i in range(len(ds))]
    return EmbedInput(
        images=ds.images,
        names=list(names),
        labels=ds.labels,
        classes=list(ds.classes) if ds.labels is not None else [],
        source=f"{d.name}:{split}",
        skipped=ds.skipped,
    )


def embed_images(
    run: LoadedRun, inputs: EmbedInput, encoder: str, device: torch.device
) -> torch.Tensor:
    """float32 ``[N, D]`` backbone features of ``inputs.images`` (checkpoint mean/std)."""
    in_chans = run.in_chans
    if inputs.images.shape[1] != in_chans:
        raise DatasetError(
            f"images have {inputs.images.shape[1]} channels but the checkpoint expects "
            f"{in_chans}: set data.channels={in_chans}"
        )
    mean, std = run.state["mean"], run.state["std"]
    backbone = run.backbone(encoder).to(device)
    return extract_features(
        backbone,
        inputs.images,
        mean,
        std,
        device,
        run.config.eval.batch_size,
        eval_precision(run.config.train.precision, device),
    )


def save_embeddings(
    path: str | Path,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    names: list[str],
    metadata: dict[str, str],
) -> Path:
    """Write ``features`` (and ``labels``) with ``names`` and ``metadata`` as safetensors."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features.float().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    save_file(tensors, str(path), metadata={**metadata, "names": json.dumps(names)})
    return path


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(features [N, D] float32, labels [N] int64 or None, names)`` of an embed file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"embedding file {path} not found")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        if "features" not in keys:
            raise DatasetError(f"{path} has no 'features' tensor: not a mocov3 embed file")
        features = handle.get_tensor("features")
        labels = handle.get_tensor("labels") if "labels" in keys else None
    names = json.loads(metadata.get("names", "[]"))
    return features, labels, names


def embed(
    run: LoadedRun,
    out: str | Path,
    device: str | None = None,
    images: str | Path | None = None,
    split: str = "train",
    encoder: str = "query",
) -> dict[str, Any]:
    """Embed the image folder ``images`` (every file under it), or else ``split`` of the
    checkpoint's data, with the ``encoder`` backbone on ``device`` (None: the run's
    ``train.device``); write ``out``; return what the command reports."""
    config = run.config
    channels = run.in_chans
    if images:
        inputs = read_image_folder(images, config.data.image_size, channels)
    else:
        inputs = read_split(config, split, channels)
    device = resolve_device(device or config.train.device)
    features = embed_images(run, inputs, encoder, device)
    metadata = {
        "encoder": encoder,
        "checkpoint": str(run.path),
        "image_size": str(config.data.image_size),
        "channels": str(channels),
        "source": inputs.source,
        "precision": eval_precision(config.train.precision, device),
    }
    if inputs.labels is not None:
        metadata["classes"] = json.dumps(inputs.classes)
    written = save_embeddings(out, features, inputs.labels, inputs.names, metadata)
    return {
        "out": str(written),
        "count": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "labelled": inputs.labels is not None,
        "skipped": inputs.skipped,
        "encoder": encoder,
    }
