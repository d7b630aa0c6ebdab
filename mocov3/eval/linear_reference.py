"""The reference linear probe: MoCo v3's ``main_lincls.py``, streamed, distributed and
resumable (``mocov3 linear --protocol reference``).

What it reproduces (Chen, Xie, He 2021, Sec. 4 "linear probing", and the reference repo's
``main_lincls.py``):

- the backbone frozen, in eval mode, under ``no_grad`` (:class:`ProbeFeatures`, so
  ``--features`` works as in the fast probe); no BatchNorm before the classifier;
- one ``nn.Linear(D, C)``, weight N(0, 0.01), bias 0 (the reference's ``normal_(0, 0.01)``
  and ``zero_()``); the weight is drawn from a generator seeded with the seed, so every
  process starts from the same classifier;
- SGD, momentum 0.9, weight decay 0, batch 1024, 90 epochs, lr = base lr x batch / 256
  (base 3.0 for a ViT, 0.1, the reference's default ``--lr``, for a ResNet), cosine decay
  set once per *epoch* (the reference's ``adjust_learning_rate``:
  ``lr * 0.5 * (1 + cos(pi * epoch / epochs))``);
- training views ``RandomResizedCrop(size, scale=(0.08, 1))`` + horizontal flip, drawn
  afresh every epoch; validation views ``Resize(size * 256 / 224)`` + ``CenterCrop(size)``;
  top-1 and top-5 on the test split after the last epoch.

Batches: epoch ``e``'s order is :func:`~mocov3.data.sampling.epoch_order` ``(seed, e, N)``,
the global batches its consecutive slices. The reference's DataLoader keeps the last partial
batch (``drop_last=False``) and so does this probe: with no BatchNorm a batch of any size,
even one image, is a valid SGD step. Under torchrun process ``r`` takes its
:func:`~mocov3.runtime.distributed.shard_range` of each global batch and divides the sum of
its cross-entropies by the global count of images read; the gradients are summed over the
processes, so each does the one-process SGD step (the reference's DDP average, exact even
for an uneven last batch or an unreadable streamed image).

A stop signal (SIGTERM, Ctrl-C) makes every process stop after the same step; the main
process writes ``linear-reference.ckpt.pt`` beside the probed checkpoint (classifier,
optimizer, epoch and step, settings, the probed checkpoint and a fingerprint of its
backbone), as it does at every epoch end, and ``resume="auto"`` continues from it bit for
bit. The result is one JSON line in ``linear-reference.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mocov3.config import is_resnet_arch
from mocov3.data.labelled import EvalSplit, Views
from mocov3.data.sampling import epoch_order
from mocov3.errors import CheckpointError, ConfigError
from mocov3.eval.features import FEATURE_KINDS, ProbeFeatures, snapshot, unchanged
from mocov3.eval.splits import labelled_splits, top1_top5
from mocov3.models.checkpoint import LoadedRun
from mocov3.models.moco import ENCODERS
from mocov3.runtime.checkpoint import LATEST, load_weights_only, resume_file, save_checkpoint
from mocov3.runtime.device import launched_processes
from mocov3.runtime.distributed import (
    ProcessInfo,
    any_process,
    is_distributed,
    shard_range,
    sum_over_processes,
)
from mocov3.runtime.precision import autocast_context, eval_precision
from mocov3.runtime.progress import Progress
from mocov3.runtime.signals import StopSignals, preempted_summary

MOMENTUM = 0.9  # main_lincls.py: --momentum 0.9
INIT_STD = 0.01  # main_lincls.py: weight.data.normal_(mean=0.0, std=0.01), bias zero
BASE_LR_VIT = 3.0  # the MoCo v3 README's ViT linear probe: --lr 3
BASE_LR_RESNET = 0.1  # main_lincls.py's default --lr (ResNet-50)
CROP_SCALE = (0.08, 1.0)  # main_lincls.py: RandomResizedCrop(224) with torchvision's scale
PURPOSE = "the reference linear probe"
EVAL_VIEWS = Views("centre")  # Resize(256) + CenterCrop(224), scaled to the image size


@dataclass(frozen=True)
class ReferenceProbeSettings:
    """How :func:`probe_reference` probes a checkpoint; the defaults are ``main_lincls.py``'s
    (``configs/eval/linear_reference.yaml`` writes them out). ``base_lr`` None: by the
    backbone (:func:`default_base_lr`); ``seed`` None: the run's ``train.seed``; ``device``
    None: its ``train.device``; ``eval_every`` N: test top-1 after every N-th epoch too."""

    epochs: int = 90
    batch_size: int = 1024
    base_lr: float | None = None
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = CROP_SCALE
    features: str = "cls"
    encoder: str = "query"
    device: str | None = None
    seed: int | None = None
    eval_every: int | None = None

    def check(self) -> None:
        """Raise ConfigError, in one line naming the option, for a value that cannot work."""
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.base_lr is not None and not (math.isfinite(self.base_lr) and self.base_lr > 0):
            raise ConfigError(f"--base-lr must be a positive number, got {self.base_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(
                f"--crop-scale must be LO HI with 0 < LO <= HI <= 1, got {low} {high}"
            )
        if self.features not in FEATURE_KINDS:
            raise ConfigError(f"features must be one of {', '.join(FEATURE_KINDS)}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")


# ----------------------------------------------------------------------------- the recipe


def default_base_lr(arch: str) -> float:
    """The reference's base lr for a backbone: 0.1 for a ResNet (``main_lincls.py``'s
    default), 3.0 for a ViT (the MoCo v3 README's ViT probe)."""
    return BASE_LR_RESNET if is_resnet_arch(arch) else BASE_LR_VIT


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of ``main_lincls.py``: ``lr = base lr * batch / 256``."""
    return base_lr * batch_size / 256.0


def epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    """``main_lincls.py``'s ``adjust_learning_rate``: half-cosine decay set at the start of
    each epoch, ``lr * 0.5 * (1 + cos(pi * epoch / epochs))``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def init_classifier(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """``nn.Linear(dim, num_classes)``, weight N(0, 0.01) drawn from a generator seeded with
    ``seed`` (the same on every process), bias 0, as ``main_lincls.py`` initialises it."""
    linear = nn.Linear(dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=generator) * INIT_STD)
        linear.bias.zero_()
    return linear


def train_views(settings: ReferenceProbeSettings, seed: int, epoch: int) -> Views:
    """Epoch ``epoch``'s training views: RandomResizedCrop(scale) + flip, from the sample's
    counter-based streams, so they do not depend on the process count or on a resume."""
    return Views("crop", tuple(settings.crop_scale), seed, epoch)  # type: ignore[arg-type]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Global batches per epoch, the last partial one kept (``drop_last=False``)."""
    return -(-num_images // batch_size)


def local_batches(
    order: torch.Tensor, batch_size: int, rank: int, world: int
) -> list[torch.Tensor]:
    """This process's slice (:func:`shard_range`) of each consecutive global batch of
    ``order``, the last partial batch included."""
    parts = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        share = shard_range(len(batch), rank, world)
        parts.append(batch[share.start : share.stop])
    return parts


def file_names(features: str) -> tuple[str, str]:
    """(checkpoint, result) file names: ``linear-reference.ckpt.pt`` and
    ``linear-reference.json`` for the class token, ``linear-reference-last4...`` otherwise,
    so probes of other features do not overwrite each other."""
    stem = "linear-reference" + ("" if features == "cls" else "-" + features.replace("+", "-"))
    return f"{stem}.ckpt.pt", f"{stem}.json"


# ----------------------------------------------------------------------------- the probe


@dataclass
class _Probe:
    """Everything one process's probe works with."""

    features: ProbeFeatures
    classifier: nn.Linear
    optimizer: torch.optim.SGD
    train: EvalSplit
    test: EvalSplit
    settings: ReferenceProbeSettings  # resolved: base_lr and seed set
    device: torch.device
    precision: str
    process: ProcessInfo
    lr: float
    test_subset: int | None = None

    @property
    def seed(self) -> int:
        assert self.settings.seed is not None
        return self.settings.seed


def _step_inputs(
    split: EvalSplit, parts: list[torch.Tensor], device: torch.device, views: Views
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(inputs, indices read)`` per entry of ``parts``: runs of equal size are read
    with one :meth:`EvalSplit.batches` call (one DataLoader per run, not per step)."""
    start = 0
    while start < len(parts):
        size = len(parts[start])
        end = start
        while end < len(parts) and len(parts[end]) == size:
            end += 1
        if size == 0:  # more processes than images in these batches: an empty share
            for _ in range(start, end):
                yield torch.empty(0), torch.empty(0, dtype=torch.int64)
        else:
            yield from split.batches(torch.cat(parts[start:end]), size, device, views)
        start = end


def _features(probe: _Probe, x: torch.Tensor, dim: int) -> torch.Tensor:
    """The frozen backbone's float32 features of ``x`` (no gradient, eval mode)."""
    if len(x) == 0:
        return torch.zeros(0, dim, device=probe.device)
    with torch.no_grad(), autocast_context(probe.device, probe.precision):
        return probe.features(x).float()


def _sgd_step(probe: _Probe, features: torch.Tensor, labels: torch.Tensor) -> int:
    """One SGD step on the global batch whose local share is given: the sum of this
    process's cross-entropies over the global count, gradients summed over processes.
    Returns the global count (0: nothing was read anywhere, no step)."""
    count = int(sum_over_processes(torch.tensor([float(len(labels))], device=probe.device))[0])
    if count == 0:
        return 0
    probe.optimizer.zero_grad(set_to_none=False)
    logits = probe.classifier(features)
    loss = F.cross_entropy(logits, labels, reduction="sum") / count
    loss.backward()
    if is_distributed():
        for parameter in probe.classifier.parameters():
            assert parameter.grad is not None
            dist.all_reduce(parameter.grad)
    probe.optimizer.step()
    return count


@torch.no_grad()
def evaluate(probe: _Probe, label: str = "linear test") -> tuple[float, float, int]:
    """(top-1, top-5 in percent, images read) on the test split, each process its
    :func:`shard_range` of it, the correct counts summed over the processes."""

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return probe.classifier(_features(probe, x, probe.classifier.in_features))

    indices = torch.arange(_test_count(probe))
    batch = max(1, probe.settings.batch_size)
    return top1_top5(
        logits_of, probe.test, indices, probe.device, batch, EVAL_VIEWS, probe.process, label
    )


def _test_count(probe: _Probe) -> int:
    """The test images evaluated: the first ``eval.test_subset`` (all when unset), as the
    fast probe and kNN read them."""
    subset = probe.test_subset
    return len(probe.test) if not subset else min(subset, len(probe.test))


# ----------------------------------------------------------------------------- checkpoints


def backbone_fingerprint(module: nn.Module) -> torch.Tensor:
    """One float64 sum per backbone tensor: a probe checkpoint made for another backbone
    (another run, or the same file after more pretraining) is told apart by it."""
    return torch.stack([t.detach().double().sum().cpu() for t in module.state_dict().values()])


def _settings_dict(settings: ReferenceProbeSettings) -> dict[str, Any]:
    values = dataclasses.asdict(settings)
    values["crop_scale"] = [float(v) for v in settings.crop_scale]
    return values


def _probe_state(
    probe: _Probe, epoch: int, step: int, source: Path, history: dict[str, float]
) -> dict[str, Any]:
    return {
        "kind": "linear-reference",
        "classifier": {
            k: v.detach().cpu().clone() for k, v in probe.classifier.state_dict().items()
        },
        "optimizer": probe.optimizer.state_dict(),
        "epoch": epoch,
        "step": step,  # the next step of ``epoch`` to take
        "settings": _settings_dict(probe.settings),
        "probed": str(source),
        "fingerprint": backbone_fingerprint(probe.features),
        "train_images": len(probe.train),
        "history": dict(history),
    }


def _check_resumable(state: Any, path: Path, probe: _Probe, source: Path) -> None:
    """Refuse, in one line, a probe checkpoint of another backbone or other settings."""
    required = ("fingerprint", "settings", "probed", "classifier", "optimizer", "epoch", "step")
    if not isinstance(state, dict) or state.get("kind") != "linear-reference":
        raise CheckpointError(f"{path} is not a reference linear-probe checkpoint")
    if any(key not in state for key in required):
        raise CheckpointError(
            f"{path} is an incomplete probe checkpoint: delete it to start afresh"
        )
    other = state.get("probed")
    same = torch.equal(state["fingerprint"], backbone_fingerprint(probe.features))
    if other != str(source) or not same:
        raise CheckpointError(
            f"{path} probes another backbone ({other}); this probe reads {source}: "
            "delete it, or run without --resume to start afresh"
        )
    mine, theirs = _settings_dict(probe.settings), dict(state["settings"])
    mine.pop("device"), theirs.pop("device", None)
    changed = sorted(k for k in mine if mine[k] != theirs.get(k))
    if changed or state.get("train_images") != len(probe.train):
        what = ", ".join(changed) or "train images"
        raise CheckpointError(
            f"{path} was made with other settings ({what}): give the same ones to resume, "
            "or run without --resume to start afresh"
        )


# ----------------------------------------------------------------------------- the run


def resolve_settings(run: LoadedRun, settings: ReferenceProbeSettings) -> ReferenceProbeSettings:
    """``settings`` with base_lr (by the checkpoint's arch) and seed (its ``train.seed``)."""
    settings.check()
    base_lr = settings.base_lr
    if base_lr is None:
        base_lr = default_base_lr(run.config.model.arch)
    seed = run.config.train.seed if settings.seed is None else settings.seed
    return dataclasses.replace(settings, base_lr=float(base_lr), seed=int(seed))


def _build(
    run: LoadedRun, settings: ReferenceProbeSettings, device: torch.device, process: ProcessInfo
) -> _Probe:
    try:  # refused before any data is read, e.g. token features asked of a ResNet
        features = ProbeFeatures(run.backbone(settings.encoder), settings.features)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    features = features.to(device).eval()
    normalisation = (run.state["mean"], run.state["std"])
    train, test = labelled_splits(run.config, PURPOSE, run.in_chans, normalisation)
    precision = eval_precision(run.config.train.precision, device)
    probe_input = torch.zeros(1, run.in_chans, train.size, train.size, device=device)
    with torch.no_grad(), autocast_context(device, precision):
        dim = int(features(probe_input).shape[1])
    assert settings.seed is not None and settings.base_lr is not None
    classifier = init_classifier(dim, train.num_classes, settings.seed).to(device)
    lr = scaled_lr(settings.base_lr, settings.batch_size)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=settings.weight_decay
    )
    return _Probe(features, classifier, optimizer, train, test, settings, device, precision,
                  process, lr, run.config.eval.test_subset)  # fmt: skip


def _train_epoch(
    probe: _Probe, epoch: int, start: int, should_stop: Callable[[], bool]
) -> tuple[int, int, bool]:
    """Steps ``start ..`` of ``epoch``, asking ``should_stop`` after each: (next step,
    images trained on, stopped early)."""
    s = probe.settings
    for group in probe.optimizer.param_groups:
        group["lr"] = epoch_lr(probe.lr, epoch, s.epochs)
    order = epoch_order(probe.seed, epoch, len(probe.train))
    rank, world = probe.process.rank, probe.process.world_size
    parts = local_batches(order, s.batch_size, rank, world)
    views = train_views(s, probe.seed, epoch)
    assert probe.train.labels is not None
    images, step = 0, start
    label = f"linear epoch {epoch + 1}/{s.epochs}"
    remaining = sum(len(p) for p in parts[start:]) * world
    with Progress(label, remaining, unit="img", processes=world) as progress:
        for x, kept in _step_inputs(probe.train, parts[start:], probe.device, views):
            features = _features(probe, x, probe.classifier.in_features)
            labels = probe.train.labels[kept].to(probe.device)
            images += _sgd_step(probe, features, labels)
            progress.update(len(x))
            step += 1
            if should_stop():
                return step, images, True
    return step, images, False


def probe_reference(
    run: LoadedRun,
    settings: ReferenceProbeSettings,
    resume: str | Path | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """The reference linear probe of an opened checkpoint on its data (``run.config``),
    alone or under torchrun. ``resume``: ``"auto"`` (the probe checkpoint beside ``run``
    when there is one) or a probe checkpoint path. ``stop_after_steps``: stop as a signal
    would after that many steps of this call (a test hook). Returns the summary (with
    ``preempted`` True when stopped); the main process writes the checkpoint and result."""
    settings = resolve_settings(run, settings)
    device_name = settings.device or run.config.train.device
    with launched_processes(device_name, run.config.train.threads) as (device, process):
        probe = _build(run, settings, device, process)
        with StopSignals() as signals:
            return _run(probe, run, resume, stop_after_steps, signals)


def _source_path(run: LoadedRun) -> Path:
    path = run.path.resolve()
    return path / LATEST if path.is_dir() else path


def _run(
    probe: _Probe,
    run: LoadedRun,
    resume: str | Path | None,
    stop_after_steps: int | None,
    signals: StopSignals,
) -> dict[str, Any]:
    started = time.perf_counter()
    s, source = probe.settings, _source_path(run)
    ckpt_name, result_name = file_names(s.features)
    ckpt_path = run.run_dir / ckpt_name
    epoch, step, history, resumed = 0, 0, {}, resume_file(resume, ckpt_path)
    if resumed is not None:
        state = load_weights_only(resumed)
        _check_resumable(state, resumed, probe, source)
        probe.classifier.load_state_dict(state["classifier"])
        probe.optimizer.load_state_dict(state["optimizer"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), dict(state["history"])
    before = snapshot(probe.features)
    images, train_seconds, taken = 0, 0.0, 0

    def should_stop() -> bool:  # asked after every step; every process decides alike
        nonlocal taken
        taken += 1
        hook = stop_after_steps is not None and taken >= stop_after_steps
        return any_process(signals.received is not None or hook, probe.device)

    def save(at_epoch: int, at_step: int) -> None:
        if probe.process.is_main:
            save_checkpoint(_probe_state(probe, at_epoch, at_step, source, history), ckpt_path)

    spe = steps_per_epoch(len(probe.train), s.batch_size)
    while epoch < s.epochs:
        tick = time.perf_counter()
        step, done, stopped = _train_epoch(probe, epoch, step, should_stop)
        images += done
        train_seconds += time.perf_counter() - tick
        if step >= spe:  # the epoch is complete (a stop on its last step included)
            epoch, step = epoch + 1, 0
            if s.eval_every and epoch % s.eval_every == 0 and epoch < s.epochs:
                history[str(epoch)] = round(evaluate(probe, f"linear test @{epoch}")[0], 2)
        save(epoch, step)
        if stopped and epoch < s.epochs:
            return preempted_summary(
                signals, epoch * spe + step, s.epochs * spe, ckpt_path, probe.process.world_size
            )
    top1, top5, _ = evaluate(probe)
    summary = _summary(probe, top1, top5, history, images, train_seconds, started, resumed)
    summary["backbone_unchanged"] = unchanged(probe.features, before)
    if probe.process.is_main:
        (run.run_dir / result_name).write_text(json.dumps(summary) + "\n")
    return summary


def _summary(
    probe: _Probe,
    top1: float,
    top5: float,
    history: dict[str, float],
    images: int,
    train_seconds: float,
    started: float,
    resumed: Path | None,
) -> dict[str, Any]:
    s = probe.settings
    summary: dict[str, Any] = {
        "protocol": "reference",
        "linear_top1": round(top1, 2),
        "linear_top5": round(top5, 2),
        "base_lr": s.base_lr,
        "lr": probe.lr,
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "weight_decay": s.weight_decay,
        "crop_scale": list(s.crop_scale),
        "features": s.features,
        "encoder": s.encoder,
        "feature_dim": probe.classifier.in_features,
        "seed": s.seed,
        "train_images": len(probe.train),
        "test_images": _test_count(probe),
        "unreadable_images": len(probe.train.unreadable) + len(probe.test.unreadable),
        "streamed": probe.train.streamed or probe.test.streamed,
        "processes": probe.process.world_size,
        "images_per_second": round(images / train_seconds, 1) if train_seconds > 0 else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "resumed_from": str(resumed) if resumed is not None else None,
    }
    if s.eval_every:
        summary["test_top1_per_epoch"] = history
    return summary
