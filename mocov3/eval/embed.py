"""Backbone features of a folder of images or of a dataset split, saved as safetensors
(``mocov3 embed``), streamed to disk in shards.

Each file holds ``features`` (float32 ``[n, D]``, the backbone output, i.e. the class token
after the final LayerNorm), ``indices`` (int64 ``[n]``: each row's position in the listing)
and, for labelled data, ``labels`` (int64 ``[n]``). Its metadata (string values) holds
``names`` (a JSON list: file paths relative to ``--images`` or to a folder dataset's root,
``shard.tar:key`` for shards, ``split/index`` otherwise), ``classes`` (a JSON list, labelled
data only), ``encoder``, ``checkpoint``, ``image_size``, ``channels``, ``source``,
``precision``, ``shard`` and ``shards``.

A split of up to ``shard_rows`` images is one file, ``--out`` itself; a larger one is
``shards`` files ``OUT-00000-of-00012.safetensors`` ..., each of ``shard_rows`` images
(fewer where unreadable ones were left out), written as soon as they are computed, so
memory holds one shard whatever the split's size. Under torchrun each process computes
and writes whole shards of its own. :func:`load_embeddings` reads a file or a shard set
back.

Images are decoded as training decodes them (:mod:`mocov3.data.decode`: shorter side to
``data.image_size``, centre crop, the checkpoint's channel count) and normalised with the
mean/std stored in the checkpoint, i.e. the statistics the backbone was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mocov3.data.labelled import EvalSplit, open_image_files, open_split
from mocov3.errors import DatasetError
from mocov3.eval.knn import feature_batches
from mocov3.models.checkpoint import LoadedRun
from mocov3.models.moco import feature_dim
from mocov3.runtime.distributed import barrier, rank_and_world, shard_range, sum_over_processes
from mocov3.runtime.precision import eval_precision
from mocov3.runtime.progress import Progress

SHARD_ROWS = 100_000  # images per file: 150 MB of float32 features at D = 384


def shard_paths(out: str | Path, shards: int) -> list[Path]:
    """The files of an embedding of ``shards`` shards written to ``out``."""
    out = Path(out).expanduser()
    if shards == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i:05d}-of-{shards:05d}{out.suffix}") for i in range(shards)]


def remove_stale(out: str | Path, keep: list[Path]) -> None:
    """Delete an earlier embedding written to ``out`` (the file, or shards of another
    count), so that :func:`load_embeddings` never reads old rows beside new ones."""
    out = Path(out).expanduser()
    earlier = [out, *out.parent.glob(f"{out.stem}-[0-9]*-of-[0-9]*{out.suffix}")]
    for path in earlier:
        if path.is_file() and path not in keep:
            path.unlink()


def save_embeddings(
    path: str | Path,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    indices: torch.Tensor,
    names: list[str],
    metadata: dict[str, str],
) -> Path:
    """Write one file: ``features`` (and ``labels``) with ``indices``, ``names`` and
    ``metadata``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features.float().contiguous(), "indices": indices.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    save_file(tensors, str(path), metadata={**metadata, "names": json.dumps(names)})
    return path


def _read_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        if "features" not in keys:
            raise DatasetError(f"{path} has no 'features' tensor: not a mocov3 embed file")
        features = handle.get_tensor("features")
        labels = handle.get_tensor("labels") if "labels" in keys else None
    return features, labels, json.loads(metadata.get("names", "[]"))


def embedding_files(path: str | Path) -> list[Path]:
    """The file ``path``, or the shards ``mocov3 embed --out path`` wrote, in order."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    shards = sorted(path.parent.glob(f"{path.stem}-[0-9]*-of-[0-9]*{path.suffix}"))
    if not shards:
        raise DatasetError(f"embedding file {path} not found (nor its shards)")
    expected = shard_paths(path, len(shards))
    if shards != expected:
        raise DatasetError(f"the shards of {path} are incomplete: expected {len(expected)}")
    return shards


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(features [N, D] float32, labels [N] int64 or None, names)`` of an embed file or
    shard set, concatenated in order."""
    parts = [_read_file(file) for file in embedding_files(path)]
    features = torch.cat([p[0] for p in parts])
    labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])  # type: ignore[misc]
    return features, labels, [name for p in parts for name in p[2]]


def _open_input(run: LoadedRun, images: str | Path | None, split: str) -> tuple[EvalSplit, str]:
    config, mean, std = run.config, run.state["mean"], run.state["std"]
    if images:
        return open_image_files(str(images), config.data.image_size, run.in_chans, mean, std), ""
    data = open_split(config, split, mean, std, run.in_chans, one_pass=True)
    return data, f"{config.data.name}:{split}"


def embed(
    run: LoadedRun,
    out: str | Path,
    device: torch.device,
    images: str | Path | None = None,
    split: str = "train",
    encoder: str = "query",
    shard_rows: int = SHARD_ROWS,
) -> dict[str, Any]:
    """Embed the image folder ``images`` (every file under it), or else ``split`` of the
    checkpoint's data, with the ``encoder`` backbone on ``device``; write ``out`` (or its
    shards); return what the command reports (the same on every process)."""
    if shard_rows < 1:
        raise DatasetError(f"--shard-size must be >= 1, got {shard_rows}")
    data, source = _open_input(run, images, split)
    config = run.config
    precision = eval_precision(config.train.precision, device)
    metadata = {
        "encoder": encoder,
        "checkpoint": str(run.path),
        "image_size": str(config.data.image_size),
        "channels": str(run.in_chans),
        "source": source or data.name,
        "precision": precision,
    }
    if data.labels is not None:
        metadata["classes"] = json.dumps(data.classes)
    backbone = run.backbone(encoder).to(device)
    shards = max(1, -(-len(data) // shard_rows))
    paths = shard_paths(out, shards)
    rank, world = rank_and_world()
    if rank == 0:
        remove_stale(out, paths)
    barrier()  # no process writes before the main one has cleared the old files
    written = 0
    with Progress("embed", len(data), processes=world) as progress:
        for shard in shard_range(shards, rank, world):
            rows = torch.arange(shard * shard_rows, min(len(data), (shard + 1) * shard_rows))
            parts = list(
                feature_batches(
                    backbone, data, rows, device, config.eval.batch_size, precision,
                    progress=progress,
                )
            )  # fmt: skip
            features = torch.cat([f for f, _ in parts])
            kept = torch.cat([i for _, i in parts])
            labels = None if data.labels is None else data.labels[kept]
            names = [data.image_name(int(i)) for i in kept]
            shard_meta = {**metadata, "shard": str(shard), "shards": str(shards)}
            save_embeddings(paths[shard], features, labels, kept, names, shard_meta)
            written += len(kept)
    totals = sum_over_processes(torch.tensor([written, len(data.unreadable)]))
    return {
        "out": str(paths[0] if shards == 1 else Path(out).expanduser()),
        "files": shards,
        "count": int(totals[0]),
        "dim": feature_dim(backbone),
        "labelled": data.labels is not None,
        "skipped": int(totals[1]) + _skipped_in_memory(data),
        "encoder": encoder,
        "streamed": data.streamed,
    }


def _skipped_in_memory(data: EvalSplit) -> int:
    """Unreadable files an in-memory split left out while loading."""
    return data.memory.skipped if data.memory is not None else 0
