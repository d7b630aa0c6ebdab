"""The pretraining loop: data in memory as uint8, batched two-view augmentation on the
training device, bf16 autocast, per-iteration lr and momentum schedules, kNN before and
after, metrics, TensorBoard, checkpoints and plots in the run directory."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocov3 import __version__
from mocov3.config import Config
from mocov3.data.augment import TwoViewAugment, sample_keys
from mocov3.data.datasets import ImageDataset, has_test_split, load_split
from mocov3.engine.checkpoint import save_checkpoint
from mocov3.engine.logging import MetricsLog, Progress
from mocov3.engine.optim import build_optimizer
from mocov3.engine.precision import autocast_context, resolve_precision
from mocov3.engine.schedules import momentum_cosine, scaled_lr, warmup_cosine
from mocov3.eval.knn import extract_features, knn_accuracy
from mocov3.models.moco import MoCo, build_moco
from mocov3.plots import plot_run


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device '{name}' asked for CUDA but no GPU is visible; use cpu")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError(
            "train.precision fp16 is CUDA-only (CPU fp16 matmuls are ~100x slower); use bf16"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Schedules:
    lr: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def build_schedules(config: Config, num_images: int) -> Schedules:
    batch = config.train.batch_size
    steps_per_epoch = num_images // batch  # drop_last, as the reference sampler
    if steps_per_epoch == 0:
        raise TrainingError(
            f"train.batch_size {batch} exceeds the {num_images} training images; "
            "lower train.batch_size or use more data"
        )
    total = max(1, round(config.train.epochs * steps_per_epoch))
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    peak = scaled_lr(config.optim.base_lr, batch)
    lr = warmup_cosine(peak, total, warmup, config.optim.min_lr)
    momentum = momentum_cosine(config.moco.momentum, total, config.moco.momentum_cosine)
    return Schedules(lr, momentum, steps_per_epoch)


def epoch_order(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator)


def evaluate_knn(
    backbone: torch.nn.Module,
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


def load_data(config: Config, with_test: bool = True) -> tuple[ImageDataset, ImageDataset | None]:
    """The training split (``data.subset`` applied) and, when labelled, the test split."""
    d = config.data
    common = dict(
        data_dir=d.data_dir,
        image_size=d.image_size,
        synthetic_size=d.synthetic_size,
        seed=config.train.seed,
    )
    train_set = load_split(d.name, "train", channels=d.channels, subset=d.subset, **common)
    test_set = None
    if with_test and train_set.labels is not None and has_test_split(d.name):
        # the test split takes the train split's channel count so features are comparable
        test_set = load_split(d.name, "test", channels=train_set.channels, **common)
    return train_set, test_set


class Trainer:
    """Holds what one pretraining run needs; ``run`` does the work and returns the summary."""

    def __init__(self, config: Config, out_dir: str | Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = resolve_device(config.train.device)
        check_precision(config.train.precision, self.device)
        # resolved once, stored in the run's config.yaml so the run says what it used
        config.train.precision = resolve_precision(config.train.precision, self.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        seed_everything(config.train.seed)
        evaluates = config.eval.knn_init or config.eval.knn_final
        self.train_set, self.test_set = load_data(config, with_test=evaluates)
        if evaluates and self.test_set is None:
            print(
                "note: no labelled val/ or test/ split, so kNN evaluation is skipped",
                file=sys.stderr,
            )
        self.schedules = build_schedules(config, len(self.train_set))
        self.model: MoCo = build_moco(config, self.train_set.channels).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.train.precision == "fp16"
        )
        self.augment = TwoViewAugment(
            config.augment, config.data.image_size, self.train_set.mean, self.train_set.std
        )
        self.step = 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ helpers
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        spe = self.schedules.steps_per_epoch
        epoch, index = divmod(step, spe)
        if self._order_epoch != epoch:
            self._order = epoch_order(self.config.train.seed, epoch, len(self.train_set))
            self._order_epoch = epoch
        batch = self.config.train.batch_size
        indices = self._order[index * batch : (index + 1) * batch]
        images = self.train_set.images[indices].to(self.device, non_blocking=True)
        keys = sample_keys(self.config.train.seed, epoch, indices).to(self.device)
        return self.augment(images, keys)

    def train_step(self, step: int) -> float:
        lr = float(self.schedules.lr[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = self.batch(step)
        with autocast_context(self.device, self.config.train.precision):
            loss = self.model(x1, x2, float(self.schedules.momentum[step]))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {step} (lr {lr:.3g}); lower optim.base_lr "
                "or raise optim.warmup_epochs; the last checkpoint is untouched"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step / self.schedules.steps_per_epoch,
            "config": self.config.to_dict(),
            "in_chans": self.train_set.channels,
            "mean": list(self.train_set.mean),
            "std": list(self.train_set.std),
            "version": __version__,
        }

    def knn(self, sizes: tuple[int | None, int | None] | None = None) -> dict[str, float] | None:
        if self.test_set is None:
            return None
        return evaluate_knn(
            self.model.backbone, self.train_set, self.test_set, self.config, self.device,
            sizes=sizes,
        )

    def monitor_sizes(self) -> tuple[int, int]:
        """(memory, queries) of the in-training kNN monitor. Unless set, sized so that its
        cost stays near 5% of training: a forward-only pass costs about 1/8 of a training
        image (two views, forward+backward of the query side, forward of the momentum side),
        so memory + queries <= 0.05 * 8 * monitor_every * batch, split 4:1."""
        ev = self.config.eval
        if ev.monitor_images:
            total = ev.monitor_images
        else:
            total = int(0.4 * ev.monitor_every * self.config.train.batch_size)
        total = max(total, 100)
        return min(total * 4 // 5, len(self.train_set)), max(total // 5, 20)

    def monitor(self, log: MetricsLog) -> dict[str, float] | None:
        """kNN on a subset every ``eval.monitor_every`` steps, from step 0 (not at the last
        step, which gets the full-split evaluation)."""
        every = self.config.eval.monitor_every
        if not every or self.step % every or self.step == self.schedules.total_steps:
            return None
        result = self.knn(self.monitor_sizes())
        if result is not None:
            log.log("knn_monitor", self.step, **result)
        return result

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(_yaml(self.config.to_dict()))
        log = MetricsLog(self.out_dir)
        progress = Progress(self.schedules.total_steps, self.config.train.log_every)
        summary: dict[str, Any] = {"epochs": self.config.train.epochs}
        try:
            summary.update(self._run(log, progress))
        finally:
            log.close()
        plots = plot_run(self.out_dir)
        summary["plots"] = [str(p) for p in plots]
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _run(self, log: MetricsLog, progress: Progress) -> dict[str, Any]:
        results: dict[str, Any] = {}
        started = time.perf_counter()
        if self.config.eval.knn_init and (init := self.knn()) is not None:
            log.log("knn", 0, **init)
            progress.message(f"kNN at random init: {init}")
            results["knn_top1_init"] = init["knn_top1"]
        train_seconds, loss = self._train_loop(log, progress)
        images = self.schedules.total_steps * self.config.train.batch_size
        results.update(
            images_per_second=round(images / train_seconds, 2),
            train_seconds=round(train_seconds, 1),
            final_loss=round(loss, 5),
            steps=self.schedules.total_steps,
        )
        if self.config.eval.monitor_every:
            results["knn_monitor_seconds"] = round(self.monitor_seconds, 1)
            results["knn_monitor_share"] = round(self.monitor_seconds / train_seconds, 4)
        if self.config.eval.knn_final and (final := self.knn()) is not None:
            log.log("knn", self.step, **final)
            progress.message(f"kNN after training: {final}")
            results.update(final)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        return results

    def _train_loop(self, log: MetricsLog, progress: Progress) -> tuple[float, float]:
        spe = self.schedules.steps_per_epoch
        batch = self.config.train.batch_size
        self.model.train()
        train_seconds, loss, window = 0.0, math.nan, []
        monitor_seconds, last_knn = 0.0, None
        if self.step == 0 and (start := self.monitor(log)) is not None:
            last_knn = start["knn_top1"]  # the monitor's own starting point, same subset
        while self.step < self.schedules.total_steps:
            tic = time.perf_counter()
            loss = self.train_step(self.step)
            elapsed = time.perf_counter() - tic
            train_seconds += elapsed
            window = (window + [elapsed])[-20:]
            per_step = sum(window) / len(window)
            values = {
                "loss": loss,
                "lr": float(self.schedules.lr[self.step]),
                "momentum": float(self.schedules.momentum[self.step]),
                "images_per_second": batch / per_step,
            }
            if (self.step + 1) % self.config.train.log_every == 0 or self.step == 0:
                log.log("train", self.step + 1, epoch=(self.step + 1) / spe, **values)
            fields = _progress_fields(values, self.step, spe)
            if last_knn is not None:
                fields["knn"] = f"{last_knn:.1f}"
            progress.update(self.step, fields, per_step)
            self.step += 1
            self._maybe_checkpoint(log)
            tic = time.perf_counter()
            if (result := self.monitor(log)) is not None:
                last_knn = result["knn_top1"]
                monitor_seconds += time.perf_counter() - tic
        self.monitor_seconds = monitor_seconds
        return train_seconds, loss

    def _maybe_checkpoint(self, log: MetricsLog) -> None:
        spe = self.schedules.steps_per_epoch
        at_end = self.step == self.schedules.total_steps
        every = self.config.train.checkpoint_every * spe
        if at_end or self.step % every == 0:
            save_checkpoint(self.checkpoint_state(), self.out_dir / "checkpoint.pt")
        if not at_end and self.step % (self.config.train.plot_every * spe) == 0:
            plot_run(self.out_dir)


def _progress_fields(values: dict[str, float], step: int, steps_per_epoch: int) -> dict[str, str]:
    return {
        "ep": f"{(step + 1) / steps_per_epoch:.2f}",
        "loss": f"{values['loss']:.4f}",
        "lr": f"{values['lr']:.2e}",
        "m": f"{values['momentum']:.4f}",
        "img/s": f"{values['images_per_second']:.0f}",
    }


def _yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def pretrain(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Run MoCo v3 pretraining into ``out_dir`` and return the summary dict."""
    return Trainer(config, out_dir).run()
