"""The labelled train and test splits an evaluation reads (:mod:`mocov3.data.labelled`),
refused in one line when the data cannot serve it."""

from __future__ import annotations

from collections.abc import Sequence

from mocov3.config import Config
from mocov3.data.labelled import EvalSplit, open_split
from mocov3.data.records import has_test_split
from mocov3.errors import DatasetError

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
