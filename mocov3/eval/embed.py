"""``mocov3 embed``: backbone features of a folder of images or of a dataset split, saved
as a safetensors file.

The file holds ``features`` (float32 ``[N, D]``, the backbone output, i.e. the class token
after the final LayerNorm) and, for labelled data, ``labels`` (int64 ``[N]``). Its metadata
(string values) holds ``names`` (a JSON list: file paths relative to ``--images``, the
dataset's own file names for folder data, ``split/index`` otherwise), ``classes`` (a JSON
list, labelled data only), ``encoder``, ``checkpoint``, ``image_size``, ``channels``,
``source`` and ``precision``. :func:`load_embeddings` reads such a file back.

Images are decoded exactly as folder data is for training (same modes, shorter side to
``data.image_size``, centre crop, channel count of the checkpoint) and normalised with the
mean/std stored in the checkpoint, i.e. the statistics the backbone was trained with.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mocov3.config import Config
from mocov3.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    _check_bad,
    _decode_all,
    _stack,
    _walk_images,
    load_split,
)
from mocov3.engine.precision import cpu_bf16_is_fast, resolve_precision
from mocov3.eval.common import LoadedRun, add_data_args, data_overrides, open_checkpoint
from mocov3.eval.knn import extract_features

__all__ = ["EmbedInput", "embed_images", "eval_precision", "load_embeddings", "read_image_folder"]


@dataclass
class EmbedInput:
    """uint8 images to embed with their names, labels (or None) and class names."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    names: list[str]
    labels: torch.Tensor | None
    classes: list[str]
    source: str
    skipped: int = 0


def eval_precision(config: Config, device: torch.device) -> str:
    """The checkpoint's precision, made safe for ``device``: fp16 only on CUDA, and bf16 on a
    CPU only where it is fast (a GPU-trained checkpoint's bf16 would run 20-100x slower on a
    CPU that emulates it)."""
    precision = config.train.precision
    if precision == "fp16" and device.type != "cuda":
        precision = "auto"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_is_fast():
        precision = "fp32"
    return resolve_precision(precision, device)


def read_image_folder(folder: str | Path, image_size: int, channels: int) -> EmbedInput:
    """Every image file under ``folder`` (recursively, sorted, hidden entries skipped),
    decoded as folder data is; unreadable files are skipped and counted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist: pass --images FOLDER")
    files = list(_walk_images(root))
    if not files:
        raise DatasetError(
            f"{root} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))}): check --images"
        )
    mode = {1: "L", 3: "RGB"}[channels]
    decoded = _decode_all(files, image_size, mode)
    bad = [(p, r) for p, r in zip(files, decoded, strict=True) if isinstance(r, str)]
    _check_bad(bad, len(files), root, strict=False)
    good = [(p, r) for p, r in zip(files, decoded, strict=True) if not isinstance(r, str)]
    return EmbedInput(
        images=_stack([r for _, r in good], channels),
        names=[p.relative_to(root).as_posix() for p, _ in good],
        labels=None,
        classes=[],
        source=f"images:{root}",
        skipped=len(bad),
    )


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
    in_chans = int(run.state["in_chans"])
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
        eval_precision(run.config, device),
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


def run_embed(args: argparse.Namespace) -> dict[str, object]:
    """Do the work of ``mocov3 embed``; return the result line's fields."""
    from mocov3.engine.train import resolve_device

    run = open_checkpoint(args.checkpoint, [*data_overrides(args), *args.set])
    config = run.config
    channels = int(run.state["in_chans"])
    if args.images:
        inputs = read_image_folder(args.images, config.data.image_size, channels)
    else:
        inputs = read_split(config, args.split, channels)
    if inputs.skipped:
        print(f"skipped {inputs.skipped} unreadable image file(s)", file=sys.stderr)
    device = resolve_device(args.device or config.train.device)
    features = embed_images(run, inputs, args.encoder, device)
    metadata = {
        "encoder": args.encoder,
        "checkpoint": str(run.path),
        "image_size": str(config.data.image_size),
        "channels": str(channels),
        "source": inputs.source,
        "precision": eval_precision(config, device),
    }
    if inputs.labels is not None:
        metadata["classes"] = json.dumps(inputs.classes)
    out = save_embeddings(args.out, features, inputs.labels, inputs.names, metadata)
    return {
        "out": str(out),
        "count": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "labelled": inputs.labels is not None,
        "skipped": inputs.skipped,
        "encoder": args.encoder,
    }


def cmd_embed(args: argparse.Namespace) -> int:
    print(json.dumps(run_embed(args)))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 embed``."""
    parser = commands.add_parser(
        "embed",
        help="save backbone features of images or a dataset split (safetensors)",
        description="Backbone features of a folder of images (--images) or of a split of the "
        "checkpoint's data, saved as safetensors: 'features' [N, D], 'labels' when "
        "labelled, file names in the metadata.",
    )
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (or its dir)")
    parser.add_argument("--out", required=True, help="output file, e.g. features.safetensors")
    parser.add_argument(
        "--images", help="embed every image under this folder (recursively) instead of a split"
    )
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="dataset split to embed (default train; data.subset applies to it)",
    )
    parser.add_argument("--encoder", choices=("query", "momentum"), default="query")
    add_data_args(parser)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(handler=cmd_embed)
