"""What a run watches while it trains: kNN top-1 of the query backbone, and the
instability events of the loss, the gradients and that kNN curve (paper Sec. 5, Fig. 4).

:class:`KnnMonitor` evaluates on the full labelled splits before and after training and on
a subset every ``eval.monitor_every`` steps; only the main process evaluates (the others
wait for it at their next collective). :class:`StabilityWatch` feeds the loss, the
gradient norms and the monitor's kNN to the :class:`~mocov3.train.stability.InstabilityDetector`,
logs every event and says it on the progress line.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from mocov3.config import Config
from mocov3.data.images import ImageDataset
from mocov3.data.labelled import EvalSplit
from mocov3.data.sources import TrainingData
from mocov3.eval.knn import evaluate_knn, extract_features
from mocov3.runtime.logging import MetricsLog, NullLog, Progress
from mocov3.train.stability import InstabilityDetector, InstabilityEvent, event_record

Log = MetricsLog | NullLog


class KnnMonitor:
    """kNN top-1 of a backbone on a run's labelled data (its ``knn_memory`` as the memory
    bank, its ``test_set`` as queries); ``available`` is False when the data has no labels
    or no evaluation split."""

    def __init__(
        self, config: Config, data: TrainingData, device: torch.device, is_main: bool = True
    ) -> None:
        self.config, self.device, self.is_main = config, device, is_main
        self.knn_memory: ImageDataset | None = data.knn_memory
        self.test_set: ImageDataset | None = data.test_set

    @property
    def available(self) -> bool:
        return self.knn_memory is not None and self.test_set is not None

    def evaluate(
        self, backbone: nn.Module, sizes: tuple[int | None, int | None] | None = None
    ) -> dict[str, float] | None:
        """kNN top-1 (main process only; None elsewhere or without labelled data)."""
        if not self.available or not self.is_main:
            return None
        assert self.knn_memory is not None and self.test_set is not None
        memory = EvalSplit.of_dataset(self.knn_memory, "train")
        queries = EvalSplit.of_dataset(self.test_set, "test")
        return evaluate_knn(
            backbone, memory, queries, self.config, self.device, sizes=sizes, distributed=False
        )

    def due(self, step: int, total_steps: int) -> bool:
        """Every ``eval.monitor_every`` steps from step 0, but not at the last step (which
        gets the full-split evaluation)."""
        every = self.config.eval.monitor_every
        return bool(every) and step % every == 0 and step != total_steps

    def monitor_sizes(self) -> tuple[int, int]:
        """(memory, queries) of the in-training kNN monitor. Unless set, sized so that its
        cost stays near 5% of training: a forward-only pass costs about 1/8 of a training
        image (two views, forward+backward of the query side, forward of the momentum
        side), so memory + queries <= 0.05 * 8 * monitor_every * batch, split 4:1."""
        ev = self.config.eval
        if ev.monitor_images:
            total = ev.monitor_images
        else:
            total = int(0.4 * ev.monitor_every * self.config.train.batch_size)
        total = max(total, 100)
        memory = len(self.knn_memory) if self.knn_memory is not None else 0
        return min(total * 4 // 5, memory), max(total // 5, 20)

    def final_sizes(self) -> tuple[int, int]:
        """(memory, queries) of the evaluation after training; (0, 0) when there is none."""
        if not self.config.eval.knn_final or not self.available:
            return 0, 0
        assert self.knn_memory is not None and self.test_set is not None
        ev = self.config.eval
        memory = min(ev.train_subset or len(self.knn_memory), len(self.knn_memory))
        return memory, min(ev.test_subset or len(self.test_set), len(self.test_set))

    def monitor_images_per_step(self) -> float:
        """Images the monitor evaluates per training step, on average."""
        every = self.config.eval.monitor_every
        if not every or self.test_set is None:
            return 0.0
        return sum(self.monitor_sizes()) / every

    def seconds_per_image(self, backbone: nn.Module) -> float:
        """Forward time per image of the kNN feature pass, on up to 512 images."""
        source = self.knn_memory if self.knn_memory is not None else self.test_set
        if source is None:
            return 0.0
        sample = source.subset(min(512, len(source)))
        args = (source.mean, source.std, self.device, self.config.eval.batch_size)
        tic = time.perf_counter()
        extract_features(backbone, sample.images, *args, self.config.train.precision)
        return (time.perf_counter() - tic) / len(sample)


class StabilityWatch:
    """The detector, fed from the training loop, with its events logged and shown.

    The detector's state goes into checkpoints as it was *before* the kNN monitor of the
    checkpoint's step, which a resumed run evaluates again: so its dip is flagged once.
    """

    def __init__(self, detector: InstabilityDetector, progress: Progress | None = None) -> None:
        self.detector = detector
        self.progress = progress
        self._before_monitor: tuple[int, dict[str, Any]] = (-1, {})

    def observe_step(
        self, done: int, loss: float, grad_norms: dict[str, float] | None, log: Log
    ) -> None:
        """Log a step's gradient norms and feed them and the loss to the detector (records
        carry the number of steps done, as train records do)."""
        events = []
        if math.isfinite(loss):
            events += self.detector.observe_loss(done, loss)
        if grad_norms is not None:
            norms = {k: v for k, v in grad_norms.items() if math.isfinite(v)}
            log.log("grad", done, **{k: float(f"{v:.6g}") for k, v in norms.items()})
            events += self.detector.observe_gradients(done, norms)
        self._report(events, log)

    def observe_knn(self, step: int, top1: float, log: Log) -> None:
        """A kNN monitor result; a random init's (step 0) is no learned value to dip from."""
        if step > 0:
            self._before_monitor = (step, self.detector.state_dict())
            self._report(self.detector.observe_knn(step, top1), log)

    def state_dict(self, step: int) -> dict[str, Any]:
        """The detector's state for a checkpoint at ``step``."""
        at, state = self._before_monitor
        return state if at == step else self.detector.state_dict()

    def _report(self, events: list[InstabilityEvent], log: Log) -> None:
        for event in events:
            log.log("instability", event.step, **event_record(event))
            if self.progress is not None:
                self.progress.message(f"instability: {event.describe()}")
