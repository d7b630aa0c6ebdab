"""The gradient monitor and the instability detector (mocov3/train/stability.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mocov3.config import load_config
from mocov3.errors import ConfigError
from mocov3.models.moco import build_moco
from mocov3.tools.plots import plot_run
from mocov3.train.stability import (
    GradientMonitor,
    InstabilityDetector,
    first_layer_group,
    gradient_groups,
    ordered_spike_pairs,
)
from mocov3.train.trainer import Trainer

TINY = "configs/tiny.yaml"


def smooth_series(steps: int, seed: int = 0) -> np.ndarray:
    """A slowly decaying norm with 15% multiplicative noise: what a calm run looks like."""
    rng = np.random.default_rng(seed)
    trend = 2.0 * np.exp(-np.arange(steps) / 400) + 0.5
    return trend * rng.lognormal(0.0, 0.15, steps)


def feed(detector: InstabilityDetector, series: dict[str, np.ndarray]) -> list:
    events = []
    steps = len(next(iter(series.values())))
    for step in range(steps):
        norms = {name: float(values[step]) for name, values in series.items()}
        events += detector.observe_gradients(step + 1, norms)
    return events


def test_detector_is_quiet_on_a_smooth_series():
    detector = InstabilityDetector()
    events = feed(
        detector, {"patch_embed": smooth_series(1000), "blocks.last": smooth_series(1000, 1)}
    )
    assert events == [] and detector.total == 0


def test_detector_flags_each_spike_once_and_merges_an_episode():
    first, last = smooth_series(600), smooth_series(600, 1)
    first[200:204] *= 30  # a 4-step spike in the first layer ...
    last[230] *= 12  # ... reaching the last block 30 steps later: one episode
    first[450] *= 8  # a later, separate instability
    detector = InstabilityDetector(spike_factor=5.0, merge_steps=50)
    events = feed(detector, {"patch_embed": first, "blocks.last": last})
    assert [(e.step, e.series) for e in events] == [
        (201, "patch_embed"),
        (231, "blocks.last"),
        (451, "patch_embed"),
    ]
    assert all(e.kind == "grad_spike" and e.ratio > 5 for e in events)
    summary = detector.summary()
    assert summary["grad_spike"] == 2  # episodes, not group spikes
    assert summary["grad_spikes_by_group"] == {"patch_embed": 2, "blocks.last": 1}
    assert summary["total"] == 2


def test_ordering_rule_pairs_a_first_layer_spike_with_a_later_last_layer_spike():
    # hand-made: 100 -> 130 (30 later) is ordered; 200 and 200 are simultaneous, not ordered;
    # 300 -> 360 is 60 steps, outside a 50-step window; 400, 410 -> 420: the earliest open
    # first spike (400) is paired and 410 waits, then expires; 500 -> 501 is ordered
    first = [100, 200, 300, 400, 410, 500]
    last = [130, 200, 360, 420, 501, 505]
    assert ordered_spike_pairs(first, last, within=50) == [(100, 130), (400, 420), (500, 501)]
    assert ordered_spike_pairs(first, last, within=60) == [
        (100, 130),
        (300, 360),
        (400, 420),
        (500, 501),
    ]
    # taking the earliest open spike pairs the most: 100 -> 120 and 110 -> 155 (the latest,
    # 110 -> 120, would leave 100 to expire before 155)
    assert ordered_spike_pairs([100, 110], [120, 155], within=50) == [(100, 120), (110, 155)]
    # the order matters: last-layer spikes leading first-layer ones pair differently
    assert ordered_spike_pairs(last, first, within=50) == [(360, 400)]
    assert ordered_spike_pairs([], last, within=50) == ordered_spike_pairs(first, [], 50) == []


def test_detector_reports_ordered_spikes_on_a_synthetic_trace():
    first, last = smooth_series(900), smooth_series(900, 1)
    first[200:203] *= 30  # the first layer spikes ...
    last[240] *= 15  # ... and the last block 40 steps later: ordered
    last[500] *= 15  # a last-block spike with no first-layer spike before it
    first[700] *= 15  # a first-layer spike the last block never follows
    last[700] *= 15  # ... except at the same step, which is not "later"
    detector = InstabilityDetector(merge_steps=50)
    feed(
        detector, {"patch_embed": first, "blocks.first": smooth_series(900, 2), "blocks.last": last}
    )
    summary = detector.summary()
    assert summary["grad_spikes_by_group"] == {"patch_embed": 2, "blocks.last": 3}
    assert summary["ordered_spikes"] == 1 and summary["ordered_spike_leads"] == [40]
    # a frozen projection: the first block stands for the first layer
    frozen = InstabilityDetector(merge_steps=50)
    blocks_first = smooth_series(900, 2)
    blocks_first[100] *= 20
    feed(frozen, {"blocks.first": blocks_first, "blocks.last": last})
    assert frozen.summary()["ordered_spikes"] == 0  # 100 is 140 steps before 240
    # the steps survive a checkpoint: a resumed detector pairs the same spikes
    resumed = InstabilityDetector(merge_steps=50)
    resumed.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert resumed.summary() == summary


def test_detector_needs_its_warmup_and_ignores_nan():
    detector = InstabilityDetector(warmup=20)
    values = [1.0] * 10 + [100.0]  # a jump before 20 values are known is not judged
    events = [e for i, v in enumerate(values) for e in detector.observe_gradients(i, {"g": v})]
    assert events == []
    for step in range(11, 40):
        detector.observe_gradients(step, {"g": 1.0})
    assert detector.observe_gradients(40, {"g": math.nan}) == []
    assert len(detector.observe_gradients(41, {"g": 6.0})) == 1


def test_loss_rise_and_knn_dip():
    detector = InstabilityDetector(loss_rise=0.1, knn_dip=2.0, warmup=5)
    # one noisy step is no rise (the loss is smoothed over ~10 steps); a sustained one is
    noisy = [5.0 - 0.01 * i for i in range(30)] + [5.5] + [4.7] * 5
    assert [e for i, v in enumerate(noisy) for e in detector.observe_loss(i + 1, v)] == []
    detector = InstabilityDetector(loss_rise=0.1, knn_dip=2.0, warmup=5)
    losses = [5.0 - 0.01 * i for i in range(30)] + [6.0] * 10 + [4.7] * 40
    events = [e for i, v in enumerate(losses) for e in detector.observe_loss(i + 1, v)]
    # the EMA (alpha 2/11) starts near 4.755 and passes 1.1 x the median of the smoothed
    # values (~4.87) at the 4th high step: 6 - 1.245 x (9/11)^4 = 5.44 > 5.36
    assert [(e.kind, e.step) for e in events] == [("loss_rise", 34)]
    # kNN: rises, dips 3 points (flagged), half-recovers (no new event), dips again only
    # after coming back within 1 point of the best
    knn = [70, 74, 76, 74.5, 72.9, 74.0, 72.0, 75.5, 73.0]
    flagged = [e.step for i, v in enumerate(knn) for e in detector.observe_knn(i, v)]
    assert flagged == [4, 8]
    assert detector.summary()["knn_dip"] == 2 and detector.summary()["loss_rise"] == 1


def test_detector_state_round_trips_mid_series():
    series = smooth_series(400)
    series[150] *= 20
    series[300] *= 20
    straight = InstabilityDetector()
    all_events = feed(straight, {"g": series})
    first = InstabilityDetector()
    feed(first, {"g": series[:200]})
    resumed = InstabilityDetector()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data
    later = [
        e
        for step in range(200, 400)
        for e in resumed.observe_gradients(step + 1, {"g": float(series[step])})
    ]
    assert [e.step for e in later] == [e.step for e in all_events if e.step > 200] == [301]
    assert resumed.state_dict() == straight.state_dict()


def test_gradient_groups_and_norms_match_a_hand_computation():
    config = load_config(TINY, ["model.freeze_patch_embed=false", "model.depth=3"])
    model = build_moco(config, 1)
    groups = gradient_groups(model)
    assert list(groups) == [
        "patch_embed",
        "blocks.first",
        "blocks.middle",
        "blocks.last",
        "projector",
        "predictor",
    ]
    momentum_ids = {id(p) for p in model.momentum_parameters()}
    assert not momentum_ids & {id(p) for params in groups.values() for p in params}
    torch.manual_seed(0)
    model(torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28), 0.99).backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    norms = GradientMonitor(model).norms()
    blocks = model.backbone.blocks
    expected = {
        "patch_embed": model.backbone.patch_embed,
        "blocks.first": blocks[0],
        "blocks.middle": blocks[1],
        "blocks.last": blocks[2],
        "projector": model.projector,
        "predictor": model.predictor,
        "total": model,
    }
    for name, module in expected.items():
        grads = [p.grad.double().flatten() for p in module.parameters() if p.grad is not None]
        assert norms[name] == pytest.approx(float(torch.cat(grads).norm()), rel=1e-5), name
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(before[name], after[name]) for name in before)  # read-only
    halved = GradientMonitor(model).norms(grad_scale=2.0)  # an fp16 scaler's scale
    assert halved["total"] == pytest.approx(norms["total"] / 2, rel=1e-6)


def test_frozen_patch_projection_and_resnet_groups():
    frozen = gradient_groups(build_moco(load_config(TINY), 1))
    assert "patch_embed" not in frozen  # no gradient to watch
    assert first_layer_group(list(frozen)) == "blocks.first"
    assert list(frozen)[:2] == ["blocks.first", "blocks.last"]  # depth 2: no separate middle
    resnet = load_config("configs/resnet18_demo.yaml")
    groups = gradient_groups(build_moco(resnet, 1))
    assert list(groups)[:4] == ["stem", "blocks.first", "blocks.middle", "blocks.last"]
    assert first_layer_group(list(groups)) == "stem"


def test_conv_stem_is_the_first_layer_group():
    config = load_config(
        TINY,
        [
            "model.stem=conv",
            "model.patch_size=16",
            "data.image_size=32",
            "model.freeze_patch_embed=false",
            "moco.concat_views=false",
        ],
    )
    model = build_moco(config, 1)
    groups = gradient_groups(model)
    assert list(groups)[0] == "stem" and first_layer_group(list(groups)) == "stem"
    stem_params = {id(p) for p in model.backbone.patch_embed.parameters()}
    assert {id(p) for p in groups["stem"]} == stem_params  # convs, BNs and the 1x1 conv


def test_bad_stability_settings_are_one_line_errors():
    for overrides, message in (
        (["stability.spike_factor=0.5"], "spike_factor"),
        (["stability.warmup=200", "stability.window=100"], "warmup <= window"),
        (["stability.grad_every=0"], "grad_every"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_config(TINY, overrides)
        assert "\n" not in str(error.value)


def test_a_run_logs_gradient_norms_and_marks_instabilities(tmp_path):
    """Learned patch projection and a spike threshold low enough to fire: every step has a
    gradient record, events are logged, counted in the summary and drawn."""
    config = load_config(
        TINY,
        [
            "model.freeze_patch_embed=false",
            "data.subset=512",
            "train.epochs=4",
            "eval.knn_init=false",
            "eval.knn_final=false",
            "stability.spike_factor=1.2",
            "stability.warmup=3",
            "stability.window=10",
            "stability.merge_steps=0",
        ],
    )
    summary = Trainer(config, tmp_path, plot=plot_run).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    grads = [r for r in records if r["kind"] == "grad"]
    assert [r["step"] for r in grads] == list(range(1, summary["steps"] + 1))
    assert {"patch_embed", "blocks.first", "blocks.last", "projector", "total"} <= set(grads[0])
    events = [r for r in records if r["kind"] == "instability"]
    counted = summary["instability_events"]
    spikes = [r for r in events if r["event"] == "grad_spike"]
    # merge_steps 0: the groups spiking at one step are one episode
    assert counted["grad_spike"] == len({r["step"] for r in spikes}) > 0
    assert sum(counted["grad_spikes_by_group"].values()) == len(spikes)
    assert counted["total"] == counted["grad_spike"] + len(events) - len(spikes)
    assert (tmp_path / "stability.png").is_file() and (tmp_path / "grad_norms.png").is_file()
