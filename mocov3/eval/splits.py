"""The labelled train and test splits an evaluation reads (:mod:`mocov3.data.labelled`),
refused in one line when the data cannot serve it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mocov3.config import Config
from mocov3.data.labelled import EvalSplit, Views, open_split
from mocov3.data.records import has_test_split
from mocov3.errors import DatasetError
from mocov3.runtime.distributed import ProcessInfo, shard_range, sum_over_processes
from mocov3.runtime.progress import Progress

TOP_K = 5

Normalisation = tuple[Sequence[float], Sequence[float]]


def labelled_splits(
    config: Config,
    purpose: str,
    channels: int | None = None,
    normalisation: Normalisation | None = None,
    test_subset: int | None = None,
) -> tuple[EvalSplit, EvalSplit]:
    """``config.data``'s train split (``data.subset`` applied) and test split, each in
    memory or streamed, decoded to ``channels`` and normalised with ``normalisation``
    (mean, std: a checkpoint's; None: the train split's own). ``purpose`` names the
    evaluation in the error raised when the data has no labels or no test split;
    ``test_subset``: the first N test images (``eval.test_subset``)."""
    name = config.data.name
    if not has_test_split(name):
        raise DatasetError(
            f"{purpose} needs a labelled test split and data '{name}' has none: give a "
            "folder with val/ or test/ class sub-folders, shards with val- files, or a "
            "dataset with a test split (--data)"
        )
    mean, std = normalisation or (None, None)
    train = open_split(config, "train", mean, std, channels)
    if train.labels is None:
        raise DatasetError(
            f"{purpose} needs labels and data '{name}' has none: use a folder of class "
            "sub-folders, shards with .cls entries or a dataset with a label column"
        )
    test = open_split(config, "test", train.mean, train.std, train.channels, test_subset or None)
    if test.labels is None:
        raise DatasetError(f"{purpose} needs labels and the test split of '{name}' has none")
    if test.num_classes > train.num_classes:
        raise DatasetError(
            f"the test split of '{name}' has classes the train split lacks "
            f"({test.num_classes} vs {train.num_classes}): check the data"
        )
    return train, test


@torch.no_grad()
def top1_top5(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    split: EvalSplit,
    indices: torch.Tensor,
    device: torch.device,
    batch_size: int,
    views: Views,
    process: ProcessInfo,
    label: str,
) -> tuple[float, float, int]:
    """Top-1 and top-5 (%) of the classifier ``logits_of`` (inputs -> float logits) on
    ``split``'s images ``indices`` seen as ``views``, and the images read: each process
    scores its :func:`shard_range` of them, the counts summed over the processes."""
    assert split.labels is not None
    block = shard_range(len(indices), process.rank, process.world_size)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, read
    with Progress(label, len(indices), "img", processes=process.world_size) as bar:
        for x, kept in split.batches(indices[block.start : block.stop], batch_size, device, views):
            logits = logits_of(x)
            labels = split.labels[kept].to(device)
            hits = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices == labels[:, None]
            counts += torch.stack(
                [hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(kept))]
            ).to(counts)
            bar.update(len(kept))
    top1, top5, read = sum_over_processes(counts).tolist()
    read = max(read, 1.0)
    return 100.0 * top1 / read, 100.0 * top5 / read, int(read)
