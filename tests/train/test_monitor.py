"""The in-training kNN monitor and the stability watch on their own: random images in memory
stand in for a dataset, a list stands in for metrics.jsonl."""

from __future__ import annotations

import torch
from torch import nn

from mocov3.config import load_config
from mocov3.data.images import ImageDataset
from mocov3.data.sources import TrainingData
from mocov3.train.monitor import KnnMonitor, StabilityWatch
from mocov3.train.stability import InstabilityDetector

CPU = torch.device("cpu")


def labelled(n: int, seed: int) -> ImageDataset:
    """Two classes told apart by brightness: dark images 0, bright images 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randint(0, 40, (n, 1, 8, 8), generator=generator)
    images = (noise + 150 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    return ImageDataset(images, labels, ["dark", "bright"], (0.5,), (0.25,))


def monitor(*overrides: str, test: bool = True, is_main: bool = True) -> KnnMonitor:
    config = load_config("configs/tiny.yaml", ["eval.knn_k=[5]", *overrides])
    memory = labelled(300, 0)
    data = TrainingData("memory", 300, 1, (0.5,), (0.25,), memory.images, None, memory)
    data.test_set = labelled(60, 1) if test else None
    return KnnMonitor(config, data, CPU, is_main)


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict]] = []

    def log(self, kind: str, step: int, **values: object) -> None:
        self.records.append((kind, step, values))


def test_evaluate_on_the_main_process_only_and_only_with_labelled_data():
    backbone = nn.Flatten()  # brightness separates the classes: raw pixels do
    result = monitor().evaluate(backbone)
    assert result is not None and result["knn_top1"] == 100.0
    assert result["train_images"] == 300 and result["test_images"] == 60
    assert monitor().evaluate(backbone, (50, 20))["test_images"] == 20
    assert monitor(is_main=False).evaluate(backbone) is None
    unlabelled = monitor(test=False)
    assert not unlabelled.available and unlabelled.evaluate(backbone) is None
    assert unlabelled.final_sizes() == (0, 0) and unlabelled.monitor_images_per_step() == 0


def test_the_monitor_runs_every_monitor_every_steps_but_not_at_the_end():
    knn = monitor("eval.monitor_every=10")
    assert [step for step in range(31) if knn.due(step, 30)] == [0, 10, 20]
    assert not any(monitor().due(step, 30) for step in range(31))  # 0: off


def test_monitor_sizes_keep_it_near_five_percent_of_training():
    # 0.4 x every x batch images, 4:1 memory to queries, the memory capped by the data
    assert monitor("eval.monitor_every=10").monitor_sizes() == (204, 51)  # 256 in all
    assert monitor("eval.monitor_every=100").monitor_sizes() == (300, 512)
    assert monitor("eval.monitor_every=1").monitor_sizes() == (80, 20)  # at least 100
    assert monitor("eval.monitor_images=500").monitor_sizes() == (300, 100)
    assert monitor("eval.monitor_every=10").monitor_images_per_step() == 25.5
    assert monitor().final_sizes() == (300, 60)
    assert monitor("eval.train_subset=100", "eval.test_subset=30").final_sizes() == (100, 30)
    assert monitor("eval.knn_final=false").final_sizes() == (0, 0)


def test_the_watch_logs_events_and_checkpoints_the_state_from_before_a_monitor():
    detector = InstabilityDetector(spike_factor=2.0, window=10, warmup=3, knn_dip=2.0)
    watch, log = StabilityWatch(detector), Log()
    for done in range(1, 6):
        watch.observe_step(done, 1.0, {"blocks.first": 1.0, "total": 1.0}, log)
    watch.observe_step(6, 1.0, {"blocks.first": 9.0, "total": 9.0}, log)
    assert [r[0] for r in log.records].count("grad") == 6
    spikes = [r for r in log.records if r[0] == "instability"]
    assert [(r[1], r[2]["event"], r[2]["series"]) for r in spikes] == [
        (6, "grad_spike", "blocks.first")
    ]
    watch.observe_knn(0, 10.0, log)  # a random init's kNN: no best to dip from
    assert detector.best_knn is None
    watch.observe_knn(50, 80.0, log)
    before = watch.state_dict(60)  # no monitor at step 60 yet: the current state
    watch.observe_knn(60, 70.0, log)  # a dip, flagged
    assert log.records[-1][2]["event"] == "knn_dip"
    # a checkpoint at step 60 carries the state before that monitor: a resumed run that
    # evaluates step 60 again flags the dip once, not twice
    assert watch.state_dict(60) == before and watch.state_dict(61) == detector.state_dict()
    assert detector.summary()["total"] == 2
