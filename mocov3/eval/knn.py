"""Weighted kNN classification on L2-normalised features (Wu et al. 2018 / DINO voting).

Each of the k nearest training features (cosine similarity s) votes for its class with
weight ``exp(s / T)``; the class with the largest total wins (ties go to the lower class
index). The paper's kNN monitor uses k = 20 or 200 and T = 0.07.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mocov3.config import Config
from mocov3.data.augment import normalize
from mocov3.data.images import ImageDataset
from mocov3.runtime.precision import autocast_context


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
    """Backbone features (eval mode) of uint8 images, returned as float32 on the CPU."""
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
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted class per test row for each k in ``ks``."""
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    max_k = min(max(ks), train_features.shape[0])
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T
        top_sim, top_index = similarity.topk(max_k, dim=1)
        neighbour_labels = train_labels[top_index]
        weights = (top_sim / temperature).exp()
        for k in ks:
            kk = min(k, max_k)
            votes = torch.zeros(similarity.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(parts) for k, parts in predictions.items()}


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


def evaluate_knn(
    backbone: nn.Module,
    train_set: ImageDataset,
    test_set: ImageDataset,
    config: Config,
    device: torch.device,
    raw_pixels: bool = False,
    sizes: tuple[int | None, int | None] | None = None,
) -> dict[str, float]:
    """Weighted kNN top-1 (%) for every k in ``config.eval.knn_k``: train split as memory.

    ``raw_pixels``: the baseline on pixel values in [0, 1] (pass ``nn.Flatten()`` as the
    backbone); no standardisation, which would change the cosine similarities.
    ``sizes``: (memory, queries) subset sizes; default ``eval.train_subset/test_subset``.
    """
    ev = config.eval
    memory_size, query_size = sizes or (ev.train_subset, ev.test_subset)
    memory = train_set.subset(memory_size) if memory_size else train_set
    queries = test_set.subset(query_size) if query_size else test_set
    channels = train_set.channels
    mean, std = (
        ((0.0,) * channels, (1.0,) * channels) if raw_pixels else (train_set.mean, train_set.std)
    )
    args = (mean, std, device, ev.batch_size, config.train.precision)
    train_features = extract_features(backbone, memory.images, *args)
    test_features = extract_features(backbone, queries.images, *args)
    accuracy = knn_accuracy(
        train_features,
        memory.labels,
        test_features,
        queries.labels,
        ev.knn_k,
        ev.knn_temperature,
    )
    results = {f"knn_top1_k{k}": round(value, 2) for k, value in accuracy.items()}
    results["knn_top1"] = results[f"knn_top1_k{ev.knn_k[0]}"]
    results.update(train_images=len(memory), test_images=len(queries))
    return results
