"""Linear-probe protocol variants on one checkpoint, its features computed once.

Usage:
    python docs/experiments/scripts/probe_variants.py --checkpoint runs/RUN [--features last4] \
        [--encoder query] [--variant NAME ...]

The question it answers: how much of a probe's top-1 is the protocol rather than the
backbone? Every variant is the ``mocov3 linear`` default (BatchNorm, SGD, 90 epochs, batch
1024, the lr chosen on a seeded 10% of the train split, the test split evaluated once with
the chosen classifier) with one change. The features (clean train and test, and the
horizontally flipped train images) are extracted once, so a variant costs only its
classifier training (about a minute on the 2-core CPU for 1024-d features). Prints one JSON
line per variant: test top-1, the chosen base lr and every lr's val top-1; ``refit`` also
gives the test top-1 after training the chosen lr again on the whole train split.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mocov3.data.sources import load_data
from mocov3.eval.features import FEATURE_KINDS, ProbeFeatures
from mocov3.eval.knn import extract_features
from mocov3.eval.linear import linear_probe, train_linear_probes
from mocov3.models.checkpoint import open_checkpoint

BASE_LRS = (0.03, 0.1, 0.3, 1.0, 3.0)  # mocov3 linear's default sweep (with BatchNorm)
SCALE = 1024 / 256  # the default batch over 256: base lr -> actual lr

# name -> what differs from the default: base lrs, weight_decay, flip, l2 (features), refit
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "low lrs": {"lrs": (0.003, 0.01, 0.03, 0.1, 0.3)},
    "wd 1e-4": {"lrs": (0.01, 0.03, 0.1, 0.3), "weight_decay": 1e-4},
    "wd 1e-3": {"lrs": (0.01, 0.03, 0.1, 0.3), "weight_decay": 1e-3},
    "flip": {"lrs": (0.01, 0.03, 0.1, 0.3, 1.0), "flip": True},
    "l2-normalised": {"lrs": (0.01, 0.03, 0.1, 0.3, 1.0), "l2": True},
    "refit": {"lrs": (0.01, 0.03, 0.1, 0.3, 1.0), "refit": True},
}


@dataclass
class ProbeData:
    """One checkpoint's probe features (backbone in eval mode), labels, and the run's seed,
    which ``mocov3 linear`` uses for its val split and classifier init."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    seed: int
    train_flipped: torch.Tensor | None  # only extracted when a chosen variant flips


def features_of(run_dir: str, kind: str, encoder: str, flipped: bool) -> ProbeData:
    """Extract the features once; the flipped train images' only when ``flipped``."""
    run = open_checkpoint(run_dir)
    train_set, test_set = load_data(run.config)
    probe = ProbeFeatures(run.backbone(encoder), kind).eval()
    config = run.config
    args = (
        train_set.mean,
        train_set.std,
        torch.device("cpu"),
        config.eval.batch_size,
        config.train.precision,
    )
    return ProbeData(
        train=extract_features(probe, train_set.images, *args),
        test=extract_features(probe, test_set.images, *args),
        train_labels=train_set.labels,
        test_labels=test_set.labels,
        seed=config.train.seed,
        train_flipped=(
            extract_features(probe, train_set.images.flip(-1), *args) if flipped else None
        ),
    )


def flipped_half(
    clean: torch.Tensor, flipped: torch.Tensor
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Each epoch, a seeded half of the training images are seen flipped."""

    def features(epoch: int, indices: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + epoch)
        flip = torch.rand(len(indices), generator=generator) < 0.5
        return torch.where(flip[:, None], flipped[indices], clean[indices])

    return features


def run_variant(data: ProbeData, name: str) -> dict[str, Any]:
    spec = VARIANTS[name]
    train, test = data.train, data.test
    if spec.get("l2"):
        train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    augment = None
    if spec.get("flip"):
        assert data.train_flipped is not None, "features_of(..., flipped=True) for flips"
        augment = flipped_half(train, data.train_flipped)
    lrs = [lr * SCALE for lr in spec.get("lrs", BASE_LRS)]
    weight_decay = spec.get("weight_decay", 0.0)
    labels, test_labels, seed = data.train_labels, data.test_labels, data.seed
    classes = int(max(labels.max(), test_labels.max())) + 1
    result = linear_probe(
        train,
        labels,
        test,
        test_labels,
        lrs,
        weight_decay=weight_decay,
        augmented_features=augment,
        seed=seed,
        num_classes=classes,
    )
    row = {
        "variant": name,
        "linear_top1": round(result["linear_top1"], 2),
        "best_lr": result["best_lr"] / SCALE,
        "val_top1_per_lr": {
            str(lr / SCALE): round(top1, 2) for lr, top1 in result["val_top1_per_lr"].items()
        },
    }
    if spec.get("refit"):  # the chosen lr trained again on all of the train split
        refit = train_linear_probes(
            train,
            labels,
            train[:0],
            labels[:0],
            classes,
            [result["best_lr"]],
            weight_decay=weight_decay,
            seed=seed,
        )
        row["refit_top1"] = round(refit["probes"].accuracy(test, test_labels, 0).item(), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint.pt")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="cls")
    parser.add_argument("--encoder", choices=("query", "momentum"), default="query")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    args = parser.parse_args()
    names = args.variant or list(VARIANTS)
    flips = any(VARIANTS[name].get("flip") for name in names)
    data = features_of(args.checkpoint, args.features, args.encoder, flipped=flips)
    for name in names:
        row = run_variant(data, name)
        print(json.dumps({"features": args.features, "encoder": args.encoder, **row}), flush=True)


if __name__ == "__main__":
    main()
