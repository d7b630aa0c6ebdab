"""End-to-end fine-tuning of a pretrained backbone, and the same recipe from random init.

The paper (Chen, Xie, He, ICCV 2021, Sec. 4 / Table 4) fine-tunes with the DeiT recipe
(Touvron et al., ICML 2021; ViT-B, 150 epochs -> 83.2% on ImageNet). Two recipes run here:

* the default, for small data: the whole network trains (backbone + a new linear ``head``)
  with AdamW, betas (0.9, 0.999), weight decay 0.05, lr = base_lr * batch / 256 with linear
  warmup and a per-iteration cosine decay, layer-wise lr decay (BEiT/MAE: patch embedding
  and tokens are layer 0, block i layer i + 1, final norm and head depth + 1, layer l gets
  ``lr * layer_decay ** (depth + 1 - l)``; biases, norms, cls_token and pos_embed get no
  weight decay), stochastic depth, label smoothing, RandomResizedCrop + flip;
* DeiT's, the paper's (``--recipe configs/eval/finetune_deit_vit_{small,base}.yaml``):
  the same optimiser with lr 5e-4 per 512 images, no layer decay, 5 warmup epochs, batch
  1024, drop path 0.1, label smoothing 0.1, crop scale (0.08, 1) + flip, RandAugment
  ``rand-m9-mstd0.5-inc1``, random erasing 0.25, Mixup 0.8 / CutMix 1.0 (timm's objects:
  :mod:`mocov3.eval.deit`), evaluation on a resize-256/224 + centre crop; 150 epochs for
  ViT-B (the paper), DeiT's 300 for ViT-S. Left out of DeiT: repeated augmentation, the
  model EMA, and its per-epoch lr steps with a 1e-6 warmup start and 1e-5 floor (here the
  schedule is per iteration, from 0 to 0).

ResNet backbones (``model.arch: resnet*``) get the same recipes with the layer-wise decay
applied per stage (stem 0, ``layer1``-``layer4`` 1-4, head 5) and no drop path (torchvision's
ResNet has none: a recipe that sets it is refused, ``--drop-path 0`` runs the rest of it);
their BatchNorm statistics are per process under torchrun.

Data are read through :mod:`mocov3.data.labelled` (in memory, or streamed when larger than
``data.memory_limit_gb``). Under torchrun each step's global batch is a slice of
``epoch_order(seed, epoch)``, process r taking its r-th shard; crops, flips and RandAugment
draw from per-sample keys and the batch-level draws are seeded per (seed, step, rank), so a
resumed run continues bit for bit, and with Mixup/CutMix, erasing and drop path off, W
processes follow one process's loss curve. SIGTERM / Ctrl-C stop every process after the
same step with a checkpoint in the run directory (``finetune.ckpt.pt`` /
``scratch.ckpt.pt``, also written every epoch); ``resume="auto"`` continues it.

``--from-scratch`` builds the same architecture from random init and runs exactly the same
recipe (epochs, batch, lr, schedule, augmentation, seed), so ``finetune_top1 -
scratch_top1`` measures what pretraining is worth instead of assuming it.

The default's numbers are for small data (Fashion-MNIST-sized sets, tiny ViTs, a few hundred
steps on a CPU), chosen by measurement, not copied from ImageNet: base lr 1e-2, layer decay
0.75, 10 epochs with 1 warmup epoch, batch 128, drop path 0.1, label smoothing 0.1, and crop
scale (1, 1), i.e. flip only. On the tiny preset (2-epoch pretraining, 2048 images, 10
epochs, seed 0, 2-core CPU, 2026-11-26) base lr 1e-3 with crop scale (0.25, 1) reached 45.1%
top-1, 4e-3 62.7%, 1e-2 with (0.5, 1) 65.5%, with (0.8, 1) 72.7% and 1e-2 flip-only 77.0%: at
28 px and this budget the tiny ViT underfits, and cropping costs more than it regularises.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mocov3.config import is_resnet_arch
from mocov3.data.labelled import EvalSplit, Views
from mocov3.data.sampling import epoch_order, shard
from mocov3.errors import CheckpointError, ConfigError, TrainingError
from mocov3.eval.deit import (
    Regularisers,
    build_criterion,
    build_erasing,
    build_mixup,
    seed_step,
)
from mocov3.eval.finetune_model import (
    FineTuneModel,
    FineTuneSettings,
    build_model,
    layer_decay_param_groups,
    set_drop_path,
)
from mocov3.eval.splits import labelled_splits, top1_top5
from mocov3.models.checkpoint import LoadedRun
from mocov3.optim.schedules import warmup_cosine
from mocov3.runtime.checkpoint import load_weights_only, resume_file, save_checkpoint
from mocov3.runtime.device import launched_processes
from mocov3.runtime.distributed import (
    ProcessInfo,
    any_process,
    mean_over_processes,
    wrap_ddp,
)
from mocov3.runtime.precision import autocast_context, check_precision, resolve_precision
from mocov3.runtime.progress import Progress
from mocov3.runtime.signals import StopSignals, preempted_summary

__all__ = [
    "FineTuneModel",
    "FineTuneSettings",
    "build_criterion",
    "build_model",
    "check_overrides",
    "default_drop_path",
    "finetune",
    "layer_decay_param_groups",
    "set_drop_path",
]

CHECKPOINT_KIND = "mocov3-finetune"

# Config keys ``--set`` may change. Everything else the fine-tuning recipe takes from its
# own flags; accepting e.g. optim.base_lr and then ignoring it would be a silent no-op.
SETTABLE_PREFIXES = ("data.",)
SETTABLE_KEYS = (
    "train.precision",
    "train.device",
    "train.threads",
    "eval.batch_size",
    "eval.test_subset",
)
FLAG_FOR_KEY = {
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "train.seed": "--seed",
    "optim.base_lr": "--lr",
    "optim.weight_decay": "--weight-decay",
    "optim.warmup_epochs": "--warmup-epochs",
    "model.drop_path_rate": "--drop-path",
    "augment.crop_scale": "--crop-min",
}


def checkpoint_name(settings: FineTuneSettings) -> str:
    """The run directory's file a fine-tuning (or from-scratch) run checkpoints to."""
    return "scratch.ckpt.pt" if settings.from_scratch else "finetune.ckpt.pt"


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Steps and learning rates: drop_last epochs of the global batch, the lr scaled by
    ``batch / lr_batch`` (the paper: /256; DeiT: /512), warmup then cosine per step."""

    steps_per_epoch: int
    total_steps: int
    local_batch: int
    peak_lr: float
    lr: np.ndarray

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def make_plan(settings: FineTuneSettings, train_images: int, world: int) -> Plan:
    """The schedule of ``settings`` on ``train_images`` images over ``world`` processes;
    ConfigError in one line when the batch does not fit."""
    batch = settings.batch_size
    if batch % world:
        raise ConfigError(
            f"--batch-size {batch} (the global batch) is not divisible by the {world} "
            f"processes: choose a multiple of {world}"
        )
    local = batch // world
    if settings.mixes and local % 2:
        raise ConfigError(
            f"Mixup/CutMix mix pairs of images: the per-process batch {local} must be even"
        )
    steps_per_epoch = train_images // batch  # drop_last
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {batch} exceeds the {train_images} training images; lower it"
        )
    total = max(1, round(settings.epochs * steps_per_epoch))
    peak = settings.base_lr * batch / settings.lr_batch
    lr = warmup_cosine(peak, total, round(settings.warmup_epochs * steps_per_epoch))
    return Plan(steps_per_epoch, total, local, peak, lr)


# ----------------------------------------------------------------------------- the run


class FineTuner:
    """One process's fine-tuning run: data, model (DDP-wrapped under torchrun), optimiser,
    the DeiT regularisers, and the step counter a checkpoint restores."""

    def __init__(
        self,
        run: LoadedRun,
        settings: FineTuneSettings,
        device: torch.device,
        process: ProcessInfo,
    ) -> None:
        self.run, self.settings, self.device, self.process = run, settings, device, process
        config = run.config
        check_precision(config.train.precision, device)
        self.precision = resolve_precision(config.train.precision, device)
        mean, std = run.state.get("mean"), run.state.get("std")
        normalisation = (mean, std) if mean is not None and std is not None else None
        self.train, self.test = labelled_splits(config, "fine-tuning", run.in_chans, normalisation)
        subset = config.eval.test_subset
        self.test_indices = torch.arange(min(len(self.test), subset or len(self.test)))
        self.num_classes = self.train.num_classes
        self.plan = make_plan(settings, len(self.train), process.world_size)
        self.model = build_model(run, self.num_classes, settings).to(device)
        self.net: nn.Module = wrap_ddp(self.model, device) if process.world_size > 1 else self.model
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.criterion = build_criterion(settings.label_smoothing, soft_targets=settings.mixes)
        self.regularisers = Regularisers(
            build_mixup(
                settings.mixup, settings.cutmix, settings.mixup_prob,
                settings.mixup_switch_prob, settings.mixup_mode, settings.label_smoothing,
                self.num_classes,
            ),
            build_erasing(settings.random_erasing, settings.erasing_mode, device),
        )  # fmt: skip
        self.step = 0
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.path = run.run_dir / checkpoint_name(settings)

    def _optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        groups = layer_decay_param_groups(
            self.model, self.plan.peak_lr, s.weight_decay, s.layer_decay
        )
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.plan.peak_lr, betas=(0.9, 0.999), fused=fused)

    @property
    def source(self) -> str:
        """The pretrained checkpoint, as a resolved path (what a resume must match)."""
        return str(self.run.path.resolve())

    # ------------------------------------------------------------------ training

    def train_step(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step; returns the loss averaged over the processes."""
        seed_step(self.settings.seed, self.step, self.process.rank)  # mixup, erasing, drop path
        x, targets = self.regularisers(x, labels)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.plan.lr[self.step]) * group["lr_scale"]
        with autocast_context(self.device, self.precision):
            loss = self.criterion(self.net(x).float(), targets)
        value = float(mean_over_processes(loss))  # every process sees the same number
        if not math.isfinite(value):
            raise TrainingError(f"fine-tuning loss became {value} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value

    def epoch_indices(self, epoch: int, first: int, count: int) -> torch.Tensor:
        """This process's shards of the epoch's global batches ``first .. first+count-1``,
        concatenated: read ``local_batch`` at a time they are the steps' batches."""
        s, plan = self.settings, self.plan
        order = epoch_order(s.seed, epoch, len(self.train))
        batch, rank, world = s.batch_size, self.process.rank, self.process.world_size
        shards = [
            shard(order[p * batch : (p + 1) * batch], rank, world)
            for p in range(first, first + count)
        ]
        assert all(len(part) == plan.local_batch for part in shards)
        return torch.cat(shards)

    def train_epochs(self, stop: StopSignals, stop_after_steps: int | None = None) -> bool:
        """Train to the end of the plan, checkpointing every epoch; True when stopped early
        (a signal on any process, or ``stop_after_steps`` reached), after a checkpoint."""
        s, plan = self.settings, self.plan
        labels_of = self.train.labels
        assert labels_of is not None
        self.net.train()
        while self.step < plan.total_steps:
            epoch, position = divmod(self.step, plan.steps_per_epoch)
            end = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
            indices = self.epoch_indices(epoch, position, end - self.step)
            views = Views("crop", (s.crop_min, 1.0), s.seed, epoch, s.rand_augment)
            label = f"fine-tune epoch {epoch + 1}/{plan.epochs}"
            tic = time.perf_counter()
            with Progress(label, len(indices) * self.process.world_size, "img",
                          processes=self.process.world_size) as bar:  # fmt: skip
                batches = self.train.batches(indices, plan.local_batch, self.device, views)
                for x, kept in batches:
                    labels = labels_of[kept].to(self.device, non_blocking=True)
                    self.losses.append(self.train_step(x, labels))
                    self.step += 1
                    bar.update(len(kept))
                    if self._stopping(stop, stop_after_steps):
                        self.train_seconds += time.perf_counter() - tic
                        self.save()
                        return True
            self.train_seconds += time.perf_counter() - tic
            self._epoch_line(epoch, end)
            self.save()
        return False

    def _stopping(self, stop: StopSignals, stop_after_steps: int | None) -> bool:
        if self.step >= self.plan.total_steps:
            return False
        asked = stop_after_steps is not None and self.step >= stop_after_steps
        return any_process(stop.received is not None or asked, self.device)

    def _epoch_line(self, epoch: int, end: int) -> None:
        if not self.process.is_main:
            return
        spe = self.plan.steps_per_epoch
        mean = float(np.mean(self.losses[epoch * spe : end]))
        print(
            f"epoch {end / spe:.2f}  loss {mean:.4f}  lr {self.plan.lr[end - 1]:.2e}",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values (``weights_only`` loads)."""
        return {
            "kind": CHECKPOINT_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "total_steps": self.plan.total_steps,
            "settings": asdict(self.settings),
            "source": self.source,
            "num_classes": self.num_classes,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "train_seconds": self.train_seconds,
        }

    def save(self) -> None:
        """Write the checkpoint atomically (the main process; every process calls this)."""
        self.sync_buffers()
        if self.process.is_main:
            save_checkpoint(self.state(), self.path)

    def sync_buffers(self) -> None:
        """Give every process the main process's buffers (a ResNet's BatchNorm statistics,
        which each process updates from its own shard, as DDP's default buffer broadcast
        would), so the checkpoint, a resume and the evaluation see one model."""
        if self.process.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    def restore(self, path: Path) -> None:
        """Continue from ``path``: refused in one line unless it is this run's checkpoint
        (same pretrained checkpoint, same recipe)."""
        state = load_weights_only(path)
        check_resumable(state, path, self.source, asdict(self.settings))
        for key, mine in (
            ("total_steps", self.plan.total_steps),
            ("num_classes", self.num_classes),
        ):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"{path} was made for {key}={state.get(key)}, this run has {key}={mine} "
                    "(other data?): resume with the same data, or leave out --resume"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"].tolist()]
        self.train_seconds = float(state["train_seconds"])

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Top-1 and top-5 (%) on the test split in eval mode, each process scoring its
        block of the images and the counts summed."""
        self.sync_buffers()
        return evaluate_split(
            self.model, self.test, self.test_indices, self.device, self.precision,
            self.run.config.eval.batch_size, self.settings.eval_view, self.process,
        )  # fmt: skip


def check_resumable(state: Any, path: Path, source: str, settings: dict[str, Any]) -> None:
    """ConfigError in one line unless ``state`` is a fine-tuning checkpoint of ``source``
    made with ``settings``."""
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(
            f"{path} is not a fine-tuning checkpoint: --resume takes the finetune.ckpt.pt "
            "(or scratch.ckpt.pt) a fine-tuning run wrote, or auto"
        )
    if state.get("source") != source:
        raise ConfigError(
            f"{path} fine-tunes {state.get('source')}, not {source}: resume with that "
            "--checkpoint, or leave out --resume to start afresh"
        )
    saved = state.get("settings", {})
    for key, value in settings.items():
        if saved.get(key) != value:
            raise ConfigError(
                f"{path} was made with {key}={saved.get(key)!r}, this run has {key}={value!r}: "
                "resume with the same recipe and flags, or leave out --resume to start afresh"
            )


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    split: EvalSplit,
    indices: torch.Tensor,
    device: torch.device,
    precision: str,
    batch_size: int,
    view: str,
    process: ProcessInfo,
) -> tuple[float, float]:
    """Top-1 and top-5 (%) of ``model`` on ``split[indices]`` seen as ``view`` (whole |
    centre), sharded over the processes (:func:`shard_range`), counts summed."""
    was_training = model.training
    model.eval()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, precision):
            return model(x).float()

    try:
        top1, top5, _ = top1_top5(
            logits_of,
            split,
            indices,
            device,
            batch_size,
            Views(view),
            process,
            "evaluation",  # type: ignore[arg-type]
        )
    finally:
        model.train(was_training)
    return top1, top5


# ----------------------------------------------------------------------------- entry


def finetune(
    run: LoadedRun,
    settings: FineTuneSettings,
    device: torch.device | str = "cpu",
    resume: str | Path | None = None,
    stop_after_steps: int | None = None,
    protocol: str | None = None,
) -> tuple[dict[str, Any], FineTuneModel]:
    """Fine-tune (or train from scratch) and evaluate once on the test split, alone or
    under torchrun.

    ``resume``: ``"auto"`` (the run directory's checkpoint when there is one) or a path.
    ``stop_after_steps``: stop as a signal would after that many steps (tests).
    Returns the result dict (``finetune_top1``/``_top5`` or ``scratch_top1``/``_top5`` and
    the recipe; ``preempted`` True and no accuracy when stopped early) and the trained model.
    """
    started = time.perf_counter()
    settings.validate()
    check_backbone(run, settings)
    with launched_processes(str(device), run.config.train.threads) as (dev, process):
        tuner = FineTuner(run, settings, dev, process)
        resumed = resume_file(resume, tuner.path)
        if resumed is not None:
            tuner.restore(resumed)
            _say(process, f"resuming {resumed} at step {tuner.step}/{tuner.plan.total_steps}")
        first_step, tic = tuner.step, time.perf_counter()
        with StopSignals() as stop:
            stopped = tuner.train_epochs(stop, stop_after_steps)
        seconds = time.perf_counter() - tic
        if stopped:
            result = preempted_summary(
                stop, tuner.step, tuner.plan.total_steps, tuner.path, tuner.process.world_size
            )
        else:
            result = _result(tuner, protocol, resumed)
            trained = (tuner.step - first_step) * settings.batch_size
            result["images_per_second"] = round(trained / seconds, 1) if trained else None
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        return result, tuner.model


def _say(process: ProcessInfo, text: str) -> None:
    if process.is_main:
        print(text, file=sys.stderr)


def _result(tuner: FineTuner, protocol: str | None, resumed: Path | None) -> dict[str, Any]:
    s = tuner.settings
    top1, top5 = tuner.evaluate()
    prefix = "scratch" if s.from_scratch else "finetune"
    result: dict[str, Any] = {f"{prefix}_top1": round(top1, 2), f"{prefix}_top5": round(top5, 2)}
    recipe = asdict(s)
    if s.from_scratch:
        recipe["encoder"] = None
    spe = tuner.plan.steps_per_epoch
    result.update(
        recipe,
        protocol=protocol or "small-data",
        lr=tuner.plan.peak_lr,
        steps=tuner.plan.total_steps,
        num_classes=tuner.num_classes,
        train_images=len(tuner.train),
        test_images=len(tuner.test_indices),
        streamed=tuner.train.streamed,
        final_loss=round(tuner.losses[-1], 5) if tuner.losses else None,
        loss_curve=[
            round(float(np.mean(tuner.losses[i : i + spe])), 5)
            for i in range(0, len(tuner.losses), spe)
        ],
        step_losses=list(tuner.losses),
        processes=tuner.process.world_size,
        precision=tuner.precision,
        device=str(tuner.device),
        checkpoint=str(tuner.run.path),
        finetune_checkpoint=str(tuner.path),
        resumed_from=str(resumed) if resumed else None,
        train_seconds=round(tuner.train_seconds, 1),
    )
    return result


def check_backbone(run: LoadedRun, settings: FineTuneSettings) -> None:
    """Refuse, before any data is read, a recipe the checkpoint's backbone cannot follow."""
    if is_resnet_arch(run.config.model.arch) and settings.drop_path > 0:
        raise ConfigError(
            f"drop_path {settings.drop_path}: a ResNet backbone has no stochastic depth; add "
            "--drop-path 0 (the rest of the DeiT recipe applies to a ResNet as it is)"
        )


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``--set`` keys the recipe does not read (or takes from its own flags)."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith(SETTABLE_PREFIXES) or key in SETTABLE_KEYS:
            continue
        if key in FLAG_FOR_KEY:
            raise ConfigError(f"finetune takes {key} from {FLAG_FOR_KEY[key]}, not --set")
        raise ConfigError(
            f"finetune does not read config key '{key}' (--set accepts data.*, "
            f"{', '.join(SETTABLE_KEYS)})"
        )


def default_drop_path(run: LoadedRun) -> float:
    """The drop-path default for the checkpoint's backbone: 0.1 for a ViT, 0 for a ResNet
    (it has none)."""
    return 0.0 if is_resnet_arch(run.config.model.arch) else FineTuneSettings().drop_path
