"""Weighted kNN classification on L2-normalised features (Wu et al. 2018 / DINO voting).

Each of the k nearest training features (cosine similarity s) votes for its class with
weight ``exp(s / T)``; the class with the largest total wins (ties go to the lower class
index). The paper's kNN monitor uses k = 20 or 200 and T = 0.07.

At ImageNet scale the memory bank is 1.28M features: they are kept L2-normalised in fp16
(about 1 GB at D = 384), and the k nearest are found exactly, a block of queries against a
block of the bank at a time (float32 similarities), each block's top-k merged into the
running top-k. Under torchrun every process extracts and keeps only its share of the bank
and of the queries; the queries are then shared, each process finds their top-k in its
share of the bank, and the processes' top-k lists are merged: the same neighbours as one
process finds in the whole bank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mocov3.config import Config
from mocov3.data.augment import normalize
from mocov3.data.labelled import WHOLE, EvalSplit, Views
from mocov3.runtime.distributed import gather_rows, is_distributed, rank_and_world, shard_range
from mocov3.runtime.precision import autocast_context
from mocov3.runtime.progress import Progress

QUERY_BLOCK = 1024  # queries per similarity block
BANK_BLOCK = 65536  # memory-bank rows per similarity block: a 1024 x 65536 float32 block
# is 256 MiB


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 512,
    precision: str = "bf16",
) -> torch.Tensor:
    """Backbone features (eval mode) of uint8 images in memory, float32 on the CPU."""
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = normalize(images[start : start + batch_size].to(device), mean, std)
            with autocast_context(device, precision):
                chunks.append(backbone(batch).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def feature_batches(
    backbone: nn.Module,
    split: EvalSplit,
    indices: torch.Tensor,
    device: torch.device,
    batch_size: int,
    precision: str,
    views: Views = WHOLE,
    normalise: bool = True,
    progress: Progress | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features [b, D] float32 on the CPU, indices [b])`` of ``split``'s images
    ``indices``, the backbone in eval mode; a streamed split's unreadable images are left
    out. ``progress`` is advanced by the images read."""
    was_training = backbone.training
    backbone.eval()
    try:
        for x, kept in split.batches(indices, batch_size, device, views, normalise=normalise):
            with autocast_context(device, precision):
                features = backbone(x).float().cpu()
            if progress is not None:
                progress.update(len(x))
            yield features, kept
    finally:
        backbone.train(was_training)


def local_features(
    backbone: nn.Module,
    split: EvalSplit,
    device: torch.device,
    batch_size: int,
    precision: str,
    label: str,
    count: int | None = None,
    dtype: torch.dtype = torch.float16,
    unit_norm: bool = True,
    views: Views = WHOLE,
    normalise: bool = True,
    distributed: bool = True,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share (:func:`shard_range`) of the features of ``split``'s images
    ``indices`` (default: the first ``count``, or all): ``(features [n, D] in dtype,
    L2-normalised when ``unit_norm``; indices [n])``, with a progress line labelled
    ``label``. ``distributed`` False: all of them, whatever the other processes do."""
    rank, world = rank_and_world() if distributed else (0, 1)
    if indices is None:
        indices = torch.arange(len(split) if count is None else min(count, len(split)))
    span = shard_range(len(indices), rank, world)
    parts, kept = [], []
    with Progress(label, len(indices), processes=world) as progress:
        for features, chunk in feature_batches(
            backbone, split, indices[span.start : span.stop], device, batch_size, precision,
            views, normalise, progress,
        ):  # fmt: skip
            if unit_norm:
                features = F.normalize(features, dim=1)
            parts.append(features.to(dtype))
            kept.append(chunk)
    if not parts:  # an empty share (more processes than images)
        dim = _feature_dim(backbone, split, device, precision, normalise)
        return torch.empty(0, dim, dtype=dtype), torch.empty(0, dtype=torch.int64)
    return torch.cat(parts), torch.cat(kept)


@torch.no_grad()
def _feature_dim(
    backbone: nn.Module, split: EvalSplit, device: torch.device, precision: str, normalise: bool
) -> int:
    """The backbone's feature width, from one image (every process must agree on shapes)."""
    features, _ = next(
        feature_batches(backbone, split, torch.tensor([0]), device, 1, precision, WHOLE, normalise)
    )
    return int(features.shape[1])


# ----------------------------------------------------------------------------- neighbours


@torch.no_grad()
def topk_neighbours(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    query_block: int = QUERY_BLOCK,
    bank_block: int = BANK_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank rows of every query, exactly: ``(similarities [Q, k]
    float32, descending; their labels [Q, k])``. Rows are expected L2-normalised (any
    dtype; similarities are computed in float32 a block at a time). Fewer than ``k`` bank
    rows: the missing neighbours have similarity -inf and label 0."""
    q_count = queries.shape[0]
    top_sim = torch.full((q_count, k), -torch.inf)
    top_lab = torch.zeros(q_count, k, dtype=torch.int64)
    for q0 in range(0, q_count, query_block):
        q = queries[q0 : q0 + query_block].float()
        sims, labs = top_sim[q0 : q0 + query_block], top_lab[q0 : q0 + query_block]
        for b0 in range(0, bank.shape[0], bank_block):
            block = q @ bank[b0 : b0 + bank_block].float().T
            block_sim, block_index = block.topk(min(k, block.shape[1]), dim=1)
            sims, order = torch.cat([sims, block_sim], 1).topk(k, dim=1)
            block_lab = bank_labels[b0 : b0 + bank_block][block_index]
            labs = torch.cat([labs, block_lab], 1).gather(1, order)
        top_sim[q0 : q0 + query_block], top_lab[q0 : q0 + query_block] = sims, labs
    return top_sim, top_lab


def merge_over_processes(
    top_sim: torch.Tensor, top_lab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each process's top-k of the same queries in its share of the bank, merged into the
    top-k of the whole bank (itself when alone)."""
    _, world = rank_and_world()
    if world == 1 or not is_distributed():
        return top_sim, top_lab
    k = top_sim.shape[1]
    # [world * Q, k] in rank order -> [Q, world * k]
    sims = gather_rows(top_sim).view(world, -1, k).permute(1, 0, 2).reshape(-1, world * k)
    labs = gather_rows(top_lab).view(world, -1, k).permute(1, 0, 2).reshape(-1, world * k)
    sims, order = sims.topk(k, dim=1)
    return sims, labs.gather(1, order)


def vote(
    top_sim: torch.Tensor,
    top_lab: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
) -> dict[int, torch.Tensor]:
    """Predicted class per query for each k in ``ks``, from its neighbours (most similar
    first); neighbours at -inf (a bank smaller than k) weigh nothing."""
    weights = (top_sim / temperature).exp()
    predictions = {}
    for k in ks:
        votes = torch.zeros(top_sim.shape[0], num_classes)
        votes.scatter_add_(1, top_lab[:, :k], weights[:, :k])
        predictions[k] = votes.argmax(dim=1)
    return predictions


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = QUERY_BLOCK,
) -> dict[int, torch.Tensor]:
    """Predicted class per test row for each k in ``ks`` (features in one process)."""
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    max_k = min(max(ks), bank.shape[0])
    top_sim, top_lab = topk_neighbours(bank, train_labels, queries, max_k, chunk_size)
    capped = vote(top_sim, top_lab, sorted({min(k, max_k) for k in ks}), temperature, num_classes)
    return {k: capped[min(k, max_k)] for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 accuracy in percent for each k."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(
        train_features, train_labels, test_features, ks, temperature, num_classes
    )
    return {k: 100.0 * (p == test_labels).float().mean().item() for k, p in predicted.items()}


# ----------------------------------------------------------------------------- evaluation


@dataclass
class KnnResult:
    """Every query's prediction for each k, its label and its (unit, fp16) feature, on
    every process; and how many bank images voted."""

    predictions: dict[int, torch.Tensor]
    labels: torch.Tensor
    query_features: torch.Tensor
    memory_images: int

    def top1(self, k: int) -> float:
        """Top-1 (%) with ``k`` neighbours."""
        return 100.0 * (self.predictions[k] == self.labels).float().mean().item()


def knn_classify(
    backbone: nn.Module,
    memory: EvalSplit,
    queries: EvalSplit,
    config: Config,
    device: torch.device,
    sizes: tuple[int | None, int | None] | None = None,
    normalise: bool = True,
    precision: str | None = None,
    distributed: bool = True,
) -> KnnResult:
    """Classify ``queries`` by weighted kNN in ``memory``'s features (their labels), k and
    T from ``config.eval``; ``sizes``: (bank, queries) image counts, default
    ``eval.train_subset`` / ``eval.test_subset`` (None or 0: the whole split).
    Shared among the processes when launched so (see the module docstring), unless
    ``distributed`` is False (one process evaluating alone, as the training monitor)."""
    if memory.labels is None or queries.labels is None:
        raise ValueError("kNN needs labelled memory and query splits")
    ev = config.eval
    bank_size, query_size = sizes or (ev.train_subset, ev.test_subset)
    precision = precision or config.train.precision
    args = (device, ev.batch_size, precision)
    options = {"normalise": normalise, "distributed": distributed}
    bank, bank_index = local_features(
        backbone, memory, *args, "kNN memory", bank_size or None, **options
    )
    mine, query_index = local_features(
        backbone, queries, *args, "kNN queries", query_size or None, **options
    )
    gather = gather_rows if distributed else (lambda tensor: tensor)
    query_features, query_index = gather(mine), gather(query_index)
    bank_images = int(gather(torch.tensor([bank.shape[0]])).sum())
    k = min(max(ev.knn_k), max(bank_images, 1))
    top_sim, top_lab = topk_neighbours(bank, memory.labels[bank_index], query_features, k)
    if distributed:
        top_sim, top_lab = merge_over_processes(top_sim, top_lab)
    num_classes = max(memory.num_classes, queries.num_classes)
    capped = vote(top_sim, top_lab, sorted({min(c, k) for c in ev.knn_k}), ev.knn_temperature,
                  num_classes)  # fmt: skip
    predictions = {c: capped[min(c, k)] for c in ev.knn_k}
    return KnnResult(predictions, queries.labels[query_index], query_features, bank_images)


def evaluate_knn(
    backbone: nn.Module,
    memory: EvalSplit,
    queries: EvalSplit,
    config: Config,
    device: torch.device,
    raw_pixels: bool = False,
    sizes: tuple[int | None, int | None] | None = None,
    precision: str | None = None,
    distributed: bool = True,
) -> dict[str, float]:
    """Weighted kNN top-1 (%) for every k in ``config.eval.knn_k``, ``knn_top1`` being the
    first's, with the image counts.

    ``raw_pixels``: the baseline on pixel values in [0, 1] (pass ``nn.Flatten()`` as the
    backbone); no standardisation, which would change the cosine similarities.
    """
    result = knn_classify(
        backbone, memory, queries, config, device, sizes, not raw_pixels, precision, distributed
    )
    ks = config.eval.knn_k
    summary = {f"knn_top1_k{k}": round(result.top1(k), 2) for k in ks}
    summary["knn_top1"] = summary[f"knn_top1_k{ks[0]}"]
    summary.update(train_images=result.memory_images, test_images=len(result.labels))
    return summary
