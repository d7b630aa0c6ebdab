"""Seeing instability as it happens (Chen, Xie, He, ICCV 2021, Sec. 5 and Fig. 4).

The paper's finding: ViT self-supervised training is quietly unstable. A gradient spike
appears first in the patch projection, reaches the last layers tens of iterations later,
and each one shows up as a dip in the kNN curve; freezing the patch projection helps.

:class:`GradientMonitor` measures the gradient norm of a few layer groups (the patch
projection or ResNet stem, the first, middle and last blocks, the heads) from the
gradients the step already computed: no extra backward pass. :class:`InstabilityDetector`
turns those norms, the loss and the kNN monitor into events: a gradient spike (a group's
norm far above its running median), a loss rise against its running median, and a kNN
dip below the best value so far, and pairs a first-layer spike with a last-block spike that
follows it (:func:`ordered_spike_pairs`, the paper's ordering). Its state is saved in
checkpoints so a resumed run flags exactly what an uninterrupted one would.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mocov3.config import StabilityConfig
from mocov3.optim.optimizers import trainable_parameters

# the loss is smoothed by an EMA over about this many steps before rises are judged
LOSS_SMOOTHING_STEPS = 10
# the group the paper's Fig. 4 calls "first layer", in the order of preference
FIRST_LAYER_GROUPS = ("patch_embed", "stem", "blocks.first")
LAST_LAYER_GROUP = "blocks.last"  # the paper's Fig. 4 "last layer"


def _trainable(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for module in modules for p in trainable_parameters(module)]


def _backbone_blocks(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(first-layer modules, residual blocks in order): a ViT's patch projection (or conv
    stem) and transformer blocks, or a ResNet's stem (conv1, bn1) and the blocks of
    layer1-4."""
    if hasattr(backbone, "blocks"):
        return [backbone.patch_embed], list(backbone.blocks)
    stem = [getattr(backbone, name) for name in ("conv1", "bn1") if hasattr(backbone, name)]
    blocks = [
        block
        for name in ("layer1", "layer2", "layer3", "layer4")
        for block in getattr(backbone, name)
    ]
    return stem, blocks


def gradient_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Named groups of trainable parameters, ordered from input to output.

    ``patch_embed`` (ViT; absent when frozen, as it then has no gradient) or ``stem`` (a
    ViT's conv stem, a ResNet's conv1 and bn1), ``blocks.first``, ``blocks.middle``,
    ``blocks.last`` (residual blocks; fewer when there are fewer than 3), ``projector``,
    ``predictor`` (absent when there is none). ``total`` (all trainable tensors) is added
    by the monitor; in a ViT it is dominated by the class token, whose gradient is large
    because the token starts near 0 and the first LayerNorm divides by its tiny spread."""
    backbone = model.backbone
    first_layer, blocks = _backbone_blocks(backbone)
    groups: dict[str, list[nn.Parameter]] = {}
    patch_projection = hasattr(backbone, "blocks") and getattr(backbone, "stem", "patch") == "patch"
    first_name = "patch_embed" if patch_projection else "stem"
    candidates: list[tuple[str, list[nn.Module]]] = [(first_name, first_layer)]
    if blocks:
        last, middle = len(blocks) - 1, len(blocks) // 2
        candidates.append(("blocks.first", [blocks[0]]))
        if 0 < middle < last:  # a 1- or 2-block backbone has no separate middle block
            candidates.append(("blocks.middle", [blocks[middle]]))
        if last > 0:
            candidates.append(("blocks.last", [blocks[last]]))
    candidates += [("projector", [model.projector]), ("predictor", [model.predictor])]
    for name, modules in candidates:
        params = _trainable(modules)
        if params:
            groups[name] = params
    return groups


def first_layer_group(names: list[str] | tuple[str, ...]) -> str | None:
    """The group standing for the paper's "first layer": the patch projection when it
    learns, else the ResNet stem, else the first block (a frozen projection has no grad)."""
    return next((name for name in FIRST_LAYER_GROUPS if name in names), None)


def ordered_spike_pairs(
    first_steps: list[int], last_steps: list[int], within: int
) -> list[tuple[int, int]]:
    """The paper's ordering (Sec. 5, Fig. 4): ``(first, last)`` step pairs where a
    first-layer spike is followed, 1 to ``within`` steps later, by a last-layer spike.

    Each spike is used once. In time order, a last-layer spike takes the earliest unpaired
    first-layer spike still in its window: the one that expires first, so as many spikes as
    possible are paired. Spikes at the same step are simultaneous, not ordered."""
    pairs: list[tuple[int, int]] = []
    open_first: list[int] = []
    firsts = sorted(first_steps)
    index = 0
    for last in sorted(last_steps):
        while index < len(firsts) and firsts[index] < last:
            open_first.append(firsts[index])
            index += 1
        open_first = [step for step in open_first if last - step <= within]
        if open_first:
            pairs.append((open_first.pop(0), last))
    return pairs


class GradientMonitor:
    """Per-group gradient L2 norms of the step just taken, plus the total over all
    trainable parameters. One ``_foreach_norm`` per group and a single device sync."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = gradient_groups(model)
        self.all_params = trainable_parameters(model)

    def norms(self, grad_scale: float = 1.0) -> dict[str, float]:
        """``{group: norm, ..., "total": norm}``; groups without gradients are left out.
        ``grad_scale``: divide by it (an fp16 grad scaler's scale)."""
        names, values = [], []
        for name, params in [*self.groups.items(), ("total", self.all_params)]:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            per_tensor = torch._foreach_norm(grads)
            values.append(torch.linalg.vector_norm(torch.stack(per_tensor).float()))
            names.append(name)
        if not values:
            return {}
        norms = (torch.stack(values) / grad_scale).tolist()
        return dict(zip(names, norms, strict=True))


@dataclass
class InstabilityEvent:
    """One flagged event. ``kind``: grad_spike | loss_rise | knn_dip; ``series``: the
    gradient group, ``loss`` or ``knn``; ``ratio``: value / reference (for a dip: the
    points lost, reference - value)."""

    kind: str
    step: int
    series: str
    value: float
    reference: float
    ratio: float

    def describe(self) -> str:
        if self.kind == "grad_spike":
            return (
                f"gradient spike in {self.series} at step {self.step} "
                f"({self.ratio:.1f}x its running median)"
            )
        if self.kind == "loss_rise":
            return (
                f"loss (smoothed) rose to {self.value:.4f} at step {self.step} "
                f"({self.ratio:.2f}x its running median {self.reference:.4f})"
            )
        return (
            f"kNN dipped to {self.value:.2f} at step {self.step} "
            f"({self.ratio:.2f} points below its best, {self.reference:.2f})"
        )


class RunningMedian:
    """The median of the last ``window`` values (a deque; the window is small)."""

    def __init__(self, window: int, values: list[float] | None = None) -> None:
        self.values: deque[float] = deque(values or [], maxlen=window)

    def add(self, value: float) -> None:
        self.values.append(value)

    def median(self) -> float:
        return statistics.median(self.values)

    def __len__(self) -> int:
        return len(self.values)


class InstabilityDetector:
    """Flags gradient spikes, loss rises and kNN dips.

    - gradient spike: a group's norm exceeds ``spike_factor`` x the median of its last
      ``window`` norms (once at least ``warmup`` are known). A group stays "in a spike"
      until it falls back below that line, so a spike lasting several steps is flagged once.
    - loss rise: the loss, smoothed over about ``LOSS_SMOOTHING_STEPS`` steps (an EMA: one
      noisy small-batch step is no rise), exceeds ``(1 + loss_rise)`` x the median of its
      last ``window`` smoothed values (same warm-up and once-per-episode rule). Measured:
      on raw per-step losses, batch-64 runs on Fashion-MNIST flagged 62 "rises" in 2800
      steps of a healthy run.
    - kNN dip: the kNN monitor falls more than ``knn_dip`` points below its best so far;
      flagged again only after it has recovered to within ``knn_dip / 2`` of the best.

    Counted events: each kNN dip and loss rise, and each gradient-spike *episode*: spikes
    in any group that start within ``merge_steps`` of an episode's first one belong to it,
    as one instability travels from the first layer to the last in tens of iterations.
    Every per-group spike is still returned (and logged) with its group, and its step kept:
    :meth:`summary` reports the *ordered* spikes, a first-layer spike followed within
    ``merge_steps`` by a last-block spike (:func:`ordered_spike_pairs`).
    """

    def __init__(
        self,
        spike_factor: float = 5.0,
        window: int = 100,
        warmup: int = 20,
        loss_rise: float = 0.1,
        knn_dip: float = 2.0,
        merge_steps: int = 50,
    ) -> None:
        self.spike_factor, self.window, self.warmup = spike_factor, window, warmup
        self.loss_rise, self.knn_dip, self.merge_steps = loss_rise, knn_dip, merge_steps
        self.history: dict[str, RunningMedian] = {}
        self.active: set[str] = set()  # series now above their line
        self.best_knn: float | None = None
        self.in_dip = False
        self.episode_start: int | None = None
        self.loss_ema: float | None = None
        self.counts = {"grad_spike": 0, "loss_rise": 0, "knn_dip": 0}
        self.spikes_by_group: dict[str, int] = {}
        self.spike_steps: dict[str, list[int]] = {}  # group: steps its spikes started

    @classmethod
    def from_config(cls, settings: StabilityConfig) -> InstabilityDetector:
        """The detector ``stability.*`` describes."""
        s = settings
        return cls(s.spike_factor, s.window, s.warmup, s.loss_rise, s.knn_dip, s.merge_steps)

    # -------------------------------------------------------------- observations
    def _above(
        self, series: str, step: int, value: float, factor: float
    ) -> InstabilityEvent | None:
        """Compare with the running median, then add the value to the history."""
        history = self.history.setdefault(series, RunningMedian(self.window))
        event = None
        if value == value and len(history) >= self.warmup:  # NaN is no spike (it stops the run)
            reference = history.median()
            if reference > 0 and value > factor * reference:
                if series not in self.active:
                    kind = "loss_rise" if series == "loss" else "grad_spike"
                    event = InstabilityEvent(
                        kind, step, series, value, reference, value / reference
                    )
                self.active.add(series)
            else:
                self.active.discard(series)
        if value == value:
            history.add(value)
        return event

    def observe_gradients(self, step: int, norms: dict[str, float]) -> list[InstabilityEvent]:
        """Gradient norms of one step (``"total"`` is recorded but not flagged on: it is
        the sum of the groups' story)."""
        events = []
        for series, value in norms.items():
            if series == "total":
                continue
            event = self._above(series, step, value, self.spike_factor)
            if event is not None:
                events.append(event)
                self.spikes_by_group[series] = self.spikes_by_group.get(series, 0) + 1
                self.spike_steps.setdefault(series, []).append(step)
        if events and (self.episode_start is None or step - self.episode_start > self.merge_steps):
            self.episode_start = step
            self.counts["grad_spike"] += 1
        return events

    def observe_loss(self, step: int, loss: float) -> list[InstabilityEvent]:
        alpha = 2.0 / (LOSS_SMOOTHING_STEPS + 1)
        ema = loss if self.loss_ema is None else self.loss_ema + alpha * (loss - self.loss_ema)
        self.loss_ema = ema
        event = self._above("loss", step, ema, 1.0 + self.loss_rise)
        if event is None:
            return []
        self.counts["loss_rise"] += 1
        return [event]

    def observe_knn(self, step: int, top1: float) -> list[InstabilityEvent]:
        if self.best_knn is None or top1 > self.best_knn:
            self.best_knn = top1
        drop = self.best_knn - top1
        if self.in_dip:
            self.in_dip = drop > self.knn_dip / 2
            return []
        if drop > self.knn_dip:
            self.in_dip = True
            self.counts["knn_dip"] += 1
            return [InstabilityEvent("knn_dip", step, "knn", top1, self.best_knn, drop)]
        return []

    # -------------------------------------------------------------- reporting
    def ordered_spikes(self) -> list[tuple[int, int]]:
        """(first-layer step, last-block step) pairs of :func:`ordered_spike_pairs`; the
        first layer is the patch projection (or stem) when it learns, else the first block."""
        first = first_layer_group(list(self.spike_steps) + list(self.history))
        if first is None:
            return []
        return ordered_spike_pairs(
            self.spike_steps.get(first, []),
            self.spike_steps.get(LAST_LAYER_GROUP, []),
            self.merge_steps,
        )

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records as ``instability_events``."""
        pairs = self.ordered_spikes()
        return {
            "total": self.total,
            **self.counts,
            "grad_spikes_by_group": dict(self.spikes_by_group),
            "ordered_spikes": len(pairs),
            "ordered_spike_leads": [last - first for first, last in pairs],
        }

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (checkpoints are loaded with ``weights_only``)."""
        return {
            "history": {name: list(h.values) for name, h in self.history.items()},
            "active": sorted(self.active),
            "best_knn": self.best_knn,
            "in_dip": self.in_dip,
            "episode_start": self.episode_start,
            "loss_ema": self.loss_ema,
            "counts": dict(self.counts),
            "spikes_by_group": dict(self.spikes_by_group),
            "spike_steps": {name: list(steps) for name, steps in self.spike_steps.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {
            name: RunningMedian(self.window, [float(v) for v in values])
            for name, values in state.get("history", {}).items()
        }
        self.active = set(state.get("active", []))
        self.best_knn = state.get("best_knn")
        self.in_dip = bool(state.get("in_dip", False))
        self.episode_start = state.get("episode_start")
        self.loss_ema = state.get("loss_ema")
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        self.spikes_by_group = {k: int(v) for k, v in state.get("spikes_by_group", {}).items()}
        self.spike_steps = {
            name: [int(step) for step in steps]
            for name, steps in state.get("spike_steps", {}).items()
        }


def event_record(event: InstabilityEvent) -> dict[str, Any]:
    """The ``metrics.jsonl`` fields of an event (``kind`` is the record's own key)."""
    fields = asdict(event)
    fields["event"] = fields.pop("kind")
    fields.pop("step")
    return fields
