"""The pretraining loop: data in memory as uint8, batched two-view augmentation on the
training device, bf16 autocast, per-iteration lr and momentum schedules, kNN before and
after, metrics, TensorBoard, checkpoints and plots in the run directory."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocov3 import __version__
from mocov3.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    resolve_model_dims,
)
from mocov3.data.augment import TwoViewAugment, sample_keys
from mocov3.data.datasets import ImageDataset, has_test_split, load_split
from mocov3.data.loader import FolderIndex, StreamingBatches, folder_root, resolve_loader
from mocov3.data.sampling import StepSampler, per_process_batch
from mocov3.engine.budget import BudgetPlan, plan_steps, replan_step
from mocov3.engine.checkpoint import (
    CheckpointError,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    numbered_checkpoints,
    remove_temporary_files,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
    write_text_atomic,
)
from mocov3.engine.distributed import (
    ProcessInfo,
    barrier,
    cpu_threads_per_process,
    device_for,
    is_distributed,
    launched_info,
    process_group,
    sum_over_processes,
    wrap_ddp,
)
from mocov3.engine.logging import MetricsLog, NullLog, Progress
from mocov3.engine.optim import build_optimizer
from mocov3.engine.performance import (
    apply_memory_format,
    compile_backbones,
    set_tf32,
    to_memory_format,
)
from mocov3.engine.precision import autocast_context, resolve_precision
from mocov3.engine.schedules import momentum_cosine, scaled_lr, warmup_cosine
from mocov3.engine.stability import (
    GradientMonitor,
    InstabilityDetector,
    InstabilityEvent,
    event_record,
)
from mocov3.eval.knn import extract_features, knn_accuracy
from mocov3.models.moco import MoCo, build_moco, load_model_state
from mocov3.plots import plot_run


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line."""


def resolve_device(name: str, process: ProcessInfo | None = None) -> torch.device:
    """``auto``: CUDA when visible, else CPU; under torchrun each process takes the GPU of
    its local rank."""
    try:
        device = device_for(name, process or ProcessInfo())
    except RuntimeError:
        raise TrainingError(
            f"train.device '{name}' is not a device name; use auto, cpu or cuda"
        ) from None
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


def build_schedules(config: Config, num_images: int, total_steps: int | None = None) -> Schedules:
    """lr and momentum arrays over ``train.epochs``, or over ``total_steps`` when given (a
    time budget's plan; the warmup then keeps its share of the run,
    ``warmup_epochs / epochs``)."""
    batch = config.train.batch_size
    steps_per_epoch = num_images // batch  # drop_last, as the reference sampler
    if steps_per_epoch == 0:
        raise TrainingError(
            f"train.batch_size {batch} exceeds the {num_images} training images; "
            "lower train.batch_size or use more data"
        )
    if total_steps is None:
        total = max(1, round(config.train.epochs * steps_per_epoch))
        warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    else:
        total = total_steps
        warmup = round(total * config.optim.warmup_epochs / config.train.epochs)
    peak = scaled_lr(config.optim.base_lr, batch)
    lr = warmup_cosine(peak, total, warmup, config.optim.min_lr)
    momentum = momentum_cosine(config.moco.momentum, total, config.moco.momentum_cosine)
    return Schedules(lr, momentum, steps_per_epoch)


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
        strict=d.strict,
    )
    train_set = load_split(d.name, "train", channels=d.channels, subset=d.subset, **common)
    test_set = None
    if with_test and train_set.labels is not None and has_test_split(d.name):
        # the test split takes the train split's channel count so features are comparable
        test_set = load_split(d.name, "test", channels=train_set.channels, **common)
    return train_set, test_set


@dataclass
class TrainingData:
    """What a run trains and evaluates on.

    ``kind`` memory: ``images`` holds every training image as uint8; stream: ``index``
    lists a folder's files, decoded batch by batch in DataLoader workers. ``knn_memory`` /
    ``test_set``: labelled images in memory for kNN (None when there are none); when
    streaming, ``knn_memory`` is the first ``eval.train_subset`` training images.
    """

    kind: str
    num_images: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor | None = None
    index: FolderIndex | None = None
    knn_memory: ImageDataset | None = None
    test_set: ImageDataset | None = None

    def batch_source(
        self, sampler: StepSampler, device: torch.device, config: Config, **stream: Any
    ) -> MemoryBatches | StreamingBatches:
        if self.images is not None:
            return MemoryBatches(self.images, sampler, device)
        assert self.index is not None
        return StreamingBatches(self.index, sampler, device, workers=config.data.workers, **stream)


def load_training_data(config: Config, with_test: bool = True) -> TrainingData:
    """The run's data: in memory (``load_data``), or a streamed folder when ``data.loader``
    says stream, or says auto and the decoded folder would exceed ``data.memory_limit_gb``."""
    d = config.data
    root = folder_root(d.name)
    if root is None or d.loader == "memory":
        resolve_loader(config)  # refuses data.loader=stream for a dataset that is no folder
        train_set, test_set = load_data(config, with_test)
        labelled = train_set if train_set.labels is not None else None
        return TrainingData(
            "memory",
            len(train_set),
            train_set.channels,
            train_set.mean,
            train_set.std,
            images=train_set.images,
            knn_memory=labelled,
            test_set=test_set,
        )
    index = FolderIndex(
        root, "train", d.image_size, d.channels, d.strict, d.subset, stats_seed=config.train.seed
    )
    if resolve_loader(config, len(index), index.channels) == "memory":
        return load_training_data(_with(config, "data.loader=memory"), with_test)
    data = TrainingData("stream", len(index), index.channels, index.mean, index.std, index=index)
    if with_test and index.labels is not None and has_test_split(d.name):
        common: dict[str, Any] = dict(
            image_size=d.image_size, channels=index.channels, strict=d.strict
        )
        memory = load_split(d.name, "train", subset=_knn_memory_size(config, index), **common)
        # normalised as training normalises (the memory subset's own statistics differ a bit)
        data.knn_memory = dataclasses.replace(memory, mean=index.mean, std=index.std)
        data.test_set = load_split(d.name, "test", subset=config.eval.test_subset, **common)
    return data


def _knn_memory_size(config: Config, index: FolderIndex) -> int:
    """``eval.train_subset``, or as many images as a quarter of ``data.memory_limit_gb``
    holds: a streamed folder is too large to hold whole for kNN."""
    if config.eval.train_subset:
        return min(config.eval.train_subset, len(index))
    per_image = index.channels * config.data.image_size**2
    return max(1, min(len(index), int(config.data.memory_limit_gb * 1e9 / 4 / per_image)))


def _with(config: Config, override: str) -> Config:
    return apply_overrides(config_from_dict(config.to_dict()), [override])


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and a temporary file in it, before any data is read: an unwritable
    run directory should fail in the first second, not at the first checkpoint."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise TrainingError(
            f"cannot write to the output directory {out_dir} ({reason}): choose a writable "
            "--out, or fix the directory's permissions or free space"
        ) from None


_ARCH_KEYS = (
    "arch",
    "small_stem",
    "resnet_width",
    "pred_last_bn",
    "patch_size",
    "mlp_ratio",
    "mlp_norm",
    "pos_embed",
    "freeze_patch_embed",
    "proj_hidden_dim",
    "proj_layers",
    "pred_hidden_dim",
    "pred_layers",
    "out_dim",
)


def architecture(config: Config) -> dict[str, Any]:
    """What fixes the shapes and the trainable set of the model a config builds."""
    dims = resolve_model_dims(config.model)
    arch: dict[str, Any] = dict(
        zip(("model.embed_dim", "model.depth", "model.num_heads"), dims, strict=True)
    )
    arch.update({f"model.{key}": getattr(config.model, key) for key in _ARCH_KEYS})
    arch["data.image_size"] = config.data.image_size
    return arch


def checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint was written with (CheckpointError when unreadable)."""
    try:
        if not isinstance(state.get("config"), dict):
            raise ConfigError("no config mapping")
        return config_from_dict(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path} holds a config this version cannot read ({error})") from None


def check_architecture(state: dict[str, Any], config: Config, path: Path) -> None:
    """One-line CheckpointError when the checkpoint's model is not the one ``config`` builds."""
    saved, wanted = architecture(checkpoint_config(state, path)), architecture(config)
    differ = [
        f"{key} {saved[key]} in the checkpoint, {wanted[key]} in the config"
        for key in wanted
        if saved[key] != wanted[key]
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} has another architecture than the config ({'; '.join(differ[:4])})"
            ": resume with the config it was trained with (config.yaml in its run directory) "
            "or start a new run in another --out"
        )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_existing_run(out_dir: Path) -> None:
    """A new run never silently replaces an earlier run's checkpoints: continue it with
    ``--resume auto`` or replace it on purpose with ``--overwrite``."""
    found = [path for _, path in numbered_checkpoints(out_dir)]
    if (out_dir / "checkpoint.pt").is_file():
        found.append(out_dir / "checkpoint.pt")
    if found:
        raise TrainingError(
            f"{out_dir} already holds a run ({found[-1].name}): continue it with --resume auto, "
            "replace it with --overwrite, or choose another --out"
        )


def truncate_metrics(path: Path, step: int | None) -> None:
    """Keep the records of ``metrics.jsonl`` a run resumed at ``step`` has already made:
    train and skip records up to ``step``, others before it (kNN records at ``step`` are
    made again; so are kNN-dip events, while the gradient norms and events of the train
    step at ``step`` are kept). ``None``: a new run, which starts an empty file."""
    if not path.is_file():
        return
    kept = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if at < step or (at == step and _made_by_the_step(record)):
                kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def _made_by_the_step(record: dict[str, Any]) -> bool:
    """Whether a record at a checkpoint's step was made by the train step before it (not by
    the kNN monitor after it, which a resumed run evaluates again)."""
    kind = record.get("kind")
    return kind in ("train", "skipped", "grad", "budget") or (
        kind == "instability" and record.get("series") != "knn"
    )


class MemoryBatches:
    """Batches of an in-memory uint8 dataset: ``batches(step)`` -> (images ``[b, C, H, W]``
    uint8 on ``device``, sample indices ``[b]``), ``b`` the per-process batch."""

    def __init__(self, images: torch.Tensor, sampler: StepSampler, device: torch.device) -> None:
        self.images, self.sampler, self.device = images, sampler, device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.sampler.indices(step)
        return self.images[indices].to(self.device, non_blocking=True), indices

    def close(self) -> None:
        """Nothing to release (streaming sources stop their workers here)."""


class Trainer:
    """Holds what one pretraining run needs; ``run`` does the work and returns the summary.

    ``resume``: ``"auto"`` (the newest usable checkpoint in ``out_dir``; none: start
    afresh), a checkpoint file, or a run directory. ``resume_command``: the command printed
    when a signal stops the run (default: one built from the run's own config.yaml).
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        resume: str | Path | None = None,
        resume_command: str | None = None,
        overwrite: bool = False,
        process: ProcessInfo | None = None,
    ) -> None:
        self._clock = time.perf_counter()  # a time budget counts from here
        self.spent_before = 0.0  # wall seconds of the sessions before a resume
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume_command = resume_command
        self.process = process or ProcessInfo()
        self.is_main = self.process.is_main
        # every process checks (they all fail alike); only the main process changes files
        per_process_batch(config.train.batch_size, self.process.world_size)
        check_writable(self.out_dir)
        if self.is_main:
            remove_temporary_files(self.out_dir)  # what a killed atomic write left behind
        if resume is None and not overwrite:
            refuse_existing_run(self.out_dir)
        self.resume_from: Path | None = None
        state = self._find_resume(resume)  # before the data: a wrong checkpoint fails fast
        self.device = resolve_device(config.train.device, self.process)
        check_precision(config.train.precision, self.device)
        # resolved once, stored in the run's config.yaml so the run says what it used
        config.train.precision = resolve_precision(config.train.precision, self.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        elif self.device.type == "cpu" and self.process.local_world_size > 1:
            # torchrun sets 1 thread per process; share the node's cores instead
            torch.set_num_threads(cpu_threads_per_process(self.process))
        self.tf32 = set_tf32(config.train.tf32, self.device)
        seed_everything(config.train.seed)
        evaluates = config.eval.knn_init or config.eval.knn_final
        self.data = load_training_data(config, with_test=evaluates)
        self.knn_memory, self.test_set = self.data.knn_memory, self.data.test_set
        if evaluates and self.test_set is None:
            print(
                "note: no labelled val/ or test/ split, so kNN evaluation is skipped",
                file=sys.stderr,
            )
        self.plan = _saved_plan(state) if config.train.budget_minutes else None
        if self.plan is not None:  # a resume keeps the plan (and its pending re-plans);
            # a new budget bounds the time of all sessions
            self.plan.minutes = float(config.train.budget_minutes)
        self.schedules = build_schedules(
            config, self.data.num_images, self.plan.steps if self.plan else None
        )
        self.model: MoCo = build_moco(config, self.data.channels).to(self.device)
        apply_memory_format(self.model, config.train)
        compile_backbones(self.model, config.train)
        # DDP averages the gradients over processes (each loss is its own batch's mean, so
        # the average is the global batch's mean); it starts from rank 0's weights. The
        # heads' BN statistics are synchronised by SyncBatchNorm1d itself, so buffers need
        # no broadcast.
        self.forward_model: torch.nn.Module = self.model
        if is_distributed():
            self.forward_model = wrap_ddp(self.model, self.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.train.precision == "fp16"
        )
        self.augment = TwoViewAugment(
            config.augment, config.data.image_size, self.data.mean, self.data.std
        )
        # the optimiser's parameters in its order, with their names (for the non-finite guard)
        self.named_trainable = [
            (name, p) for name, p in self.model.named_parameters() if p.requires_grad
        ]
        s = config.stability
        self.grad_monitor = GradientMonitor(self.model) if s.grad_norms else None
        self.detector = InstabilityDetector(
            s.spike_factor, s.window, s.warmup, s.loss_rise, s.knn_dip, s.merge_steps
        )
        self._grad_norms: dict[str, float] | None = None  # of the step just taken
        self._detector_before_monitor: tuple[int, dict[str, Any]] = (-1, {})
        # (step, elapsed, monitor seconds) the pace is measured from: the loop's start or
        # the latest re-plan
        self._pace_from = (0, 0.0, 0.0)
        self.step = 0
        self.sampler = StepSampler(
            self.data.num_images,
            config.train.batch_size,
            config.train.seed,
            self.process.rank,
            self.process.world_size,
        )
        self.batches: MemoryBatches | StreamingBatches | None = None
        self.train_seconds = self.monitor_seconds = 0.0
        self.skipped_steps = 0
        self.last_loss = math.nan
        self.last_knn: float | None = None
        self.knn_init: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self._stop_signal: int | None = None
        self._stopping = False  # the stop all processes agreed on (see _agree_to_stop)
        self._skipped_now: str | None = None
        self._budget_stop = False  # the time budget ran out before the planned steps
        self._progress: Progress | None = None
        self._eval_seconds_per_image: float | None = None  # measured by the kNN at init
        if state is not None:
            self._restore(state)
        self.batches = self._batch_source(self.step, self.schedules.total_steps)
        barrier()  # every process has read its checkpoint before the main one cleans up
        if self.is_main:
            self._remove_later_checkpoints()

    def _batch_source(self, start: int, stop: int) -> MemoryBatches | StreamingBatches:
        return self.data.batch_source(
            self.sampler,
            self.device,
            self.config,
            start_step=start,
            stop_step=stop,
            local_processes=self.process.local_world_size,
        )

    def elapsed(self) -> float:
        """Wall seconds this run has used, earlier sessions included."""
        return self.spent_before + time.perf_counter() - self._clock

    def close(self) -> None:
        """Release the input pipeline (streaming workers); safe to call more than once."""
        if self.batches is not None:
            self.batches.close()

    # ------------------------------------------------------------------ resume
    def _find_resume(self, resume: str | Path | None) -> dict[str, Any] | None:
        if resume is None:
            return None
        warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
        if str(resume) == "auto" or Path(resume).is_dir():
            directory = self.out_dir if str(resume) == "auto" else Path(resume)
            found = latest_checkpoint(directory, warn)
            if found is None:
                if str(resume) != "auto":
                    raise CheckpointError(f"{directory} holds no checkpoint to resume from")
                warn(f"note: no checkpoint in {directory} yet, so training starts at step 0")
                return None
            state, path = found
        else:
            path = Path(resume)
            state = load_checkpoint(path)
            check_resumable(state, path)
        check_architecture(state, self.config, path)
        self.resume_from = path
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was written: weights, optimiser, scaler, the
        schedule position, the metrics so far and every RNG (restored last)."""
        path = self.resume_from
        if int(state["in_chans"]) != self.data.channels:
            raise CheckpointError(
                f"checkpoint {path} was trained on {state['in_chans']}-channel images, the "
                f"data gives {self.data.channels}: set data.channels to match"
            )
        spe, total = self.schedules.steps_per_epoch, self.schedules.total_steps
        if int(state["steps_per_epoch"]) != spe:
            raise CheckpointError(
                f"checkpoint {path} was written with {state['steps_per_epoch']} steps per "
                f"epoch, this data and train.batch_size give {spe}: resume with the same data, "
                "data.subset and train.batch_size"
            )
        step = int(state["step"])
        if step > total:
            raise CheckpointError(
                f"checkpoint {path} is at step {step}, beyond the {total} steps this config "
                "trains: raise train.epochs"
            )
        self._note_config_changes(state, path)
        load_model_state(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"checkpoint {path} has an optimiser or scaler state this run cannot use "
                f"({first[:160]})"
            ) from None
        progress = state.get("progress", {})
        self.step = self._saved_step = step
        self.train_seconds = float(progress.get("train_seconds", 0.0))
        self.spent_before = float(progress.get("wall_seconds", 0.0))
        self.monitor_seconds = float(progress.get("monitor_seconds", 0.0))
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        self.last_loss = float(progress.get("loss", math.nan))
        self.last_knn = progress.get("last_knn")
        self.knn_init = progress.get("knn_init")
        self.detector.load_state_dict(progress.get("stability", {}))
        self.last_checkpoint = path
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {path} has an unusable RNG state ({error})"
            ) from None
        print(f"resuming from {path} at step {step}/{total}", file=sys.stderr)

    def _note_config_changes(self, state: dict[str, Any], path: Path | None) -> None:
        saved, now = _flat(state["config"]), _flat(self.config.to_dict())
        changed = [
            f"{key} {saved.get(key)!r} -> {value!r}"
            for key, value in now.items()
            if saved.get(key) != value and key not in ("train.device", "train.threads")
        ]
        if changed:
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            print(
                f"note: resuming {path} with settings changed since it was written: "
                f"{', '.join(changed[:4])}{more} (the run will differ from an uninterrupted one)",
                file=sys.stderr,
            )

    def _remove_later_checkpoints(self) -> None:
        """Checkpoints of a run this one replaces (a new run in an old directory, or
        --resume from an older checkpoint): numbered ones beyond the step this run starts
        at, and ``checkpoint.pt`` unless it is the file resumed from. Left in place, a
        later --resume auto could pick them up. Milestones stay (auto never uses them)."""
        stale = [path for step, path in numbered_checkpoints(self.out_dir) if step > self.step]
        latest = self.out_dir / "checkpoint.pt"
        if latest.is_file() and not (
            self.resume_from is not None and latest.samefile(self.resume_from)
        ):
            stale.append(latest)
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            print(
                f"note: removed {len(stale)} checkpoint file(s) of an earlier run in "
                f"{self.out_dir} (this run starts at step {self.step}; --resume auto continues "
                "a run instead)",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ helpers
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's two augmented views at ``step``; the augmentation of each image is
        drawn from (seed, epoch, sample index) alone, so it does not depend on the world size."""
        assert self.batches is not None
        images, indices = self.batches(step)
        epoch = step // self.schedules.steps_per_epoch
        keys = sample_keys(self.config.train.seed, epoch, indices).to(self.device)
        x1, x2 = self.augment(images, keys)
        return to_memory_format(x1, self.config.train), to_memory_format(x2, self.config.train)

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-process scalar over all processes (itself when alone): the
        loss of the global batch, identical on every process, so every process takes the
        same decisions from it."""
        return sum_over_processes(value.detach().float().reshape(1))[0] / self.process.world_size

    def _agree_to_stop(self) -> bool:
        """Whether any process got a stop signal: a signal may reach the processes at
        different steps, and they must all stop after the same one."""
        self._stopping = self._any_process(self._stop_signal is not None)
        return self._stopping

    def _any_process(self, local: bool) -> bool:
        """Whether ``local`` holds on any process (itself when alone), so that every
        process takes the same decision."""
        if not is_distributed():
            return local
        flag = torch.tensor([float(local)], device=self.device)
        return bool(sum_over_processes(flag)[0] > 0)

    def first_nonfinite_grad(self) -> str | None:
        """``"NAME (nan)"`` for the first trainable parameter whose gradient holds a NaN or
        inf, else None (one device sync: the per-tensor max |g| propagates NaN)."""
        grads = [(name, p.grad) for name, p in self.named_trainable if p.grad is not None]
        if not grads:
            return None
        peaks = torch.stack([g.detach().abs().amax().float() for _, g in grads])
        bad = torch.nonzero(~torch.isfinite(peaks))
        if len(bad) == 0:
            return None
        name, grad = grads[int(bad[0, 0])]
        return f"{name} ({'nan' if bool(torch.isnan(grad).any()) else 'inf'})"

    def train_step(self, step: int) -> float:
        """One optimisation step. A non-finite loss or gradient raises TrainingError before
        the optimiser or any file is touched, or with ``train.skip_nonfinite`` the step is
        skipped: no optimiser step, gradients dropped, BatchNorm statistics put back; the
        momentum encoder's EMA of this step (done in the forward pass, before the loss
        exists) stays, an average toward the unchanged query weights."""
        lr = float(self.schedules.lr[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = self.batch(step)
        skip = self.config.train.skip_nonfinite
        buffers = [b.detach().clone() for b in self.model.buffers()] if skip else None
        with autocast_context(self.device, self.config.train.precision):
            loss = self.forward_model(x1, x2, float(self.schedules.momentum[step]))
        self.optimizer.zero_grad(set_to_none=True)
        bad = None
        global_loss = float(self.global_mean(loss))
        if not math.isfinite(global_loss):
            bad = f"loss became {global_loss}"
        else:
            # (DDP's gradient all-reduce makes the gradients, and this check, identical
            # on every process)
            self.scaler.scale(loss).backward()
            # with an fp16 scaler, inf gradients are routine: the scaler skips those steps
            if not self.scaler.is_enabled() and (name := self.first_nonfinite_grad()):
                bad = f"gradient of {name} became non-finite (loss {global_loss:.4g})"
        if bad is not None:
            where = f"{bad} at step {step + 1} (lr {lr:.3g})"
            if not skip:
                kept = (
                    f"the last checkpoint ({self.last_checkpoint}) is untouched"
                    if self.last_checkpoint
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"{where}: lower optim.base_lr or raise optim.warmup_epochs, or set "
                    f"train.skip_nonfinite=true to skip such steps; {kept}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers or [], strict=True):
                    buffer.copy_(saved)
            self.skipped_steps += 1
            self._skipped_now = where
            return global_loss
        self._measure_gradients(step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return global_loss

    def _measure_gradients(self, step: int) -> None:
        """Gradient norms per layer group, every ``stability.grad_every`` steps, from the
        gradients the backward pass left (identical on every process after DDP's
        all-reduce); an fp16 scaler's scale is divided out."""
        every = self.config.stability.grad_every
        if self.grad_monitor is None or (step + 1) % every:
            return
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        self._grad_norms = self.grad_monitor.norms(scale)

    def checkpoint_state(self) -> dict[str, Any]:
        spe = self.schedules.steps_per_epoch
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step / spe,
            "epoch_index": self.step // spe,
            "step_in_epoch": self.step % spe,
            "steps_per_epoch": spe,
            "total_steps": self.schedules.total_steps,
            "rng": rng_state(),
            "progress": {
                "train_seconds": self.train_seconds,
                "monitor_seconds": self.monitor_seconds,
                "skipped_steps": self.skipped_steps,
                "loss": self.last_loss,
                "last_knn": self.last_knn,
                "knn_init": self.knn_init,
                "stability": self._detector_state(),
                "wall_seconds": self.elapsed(),
                "budget": self.plan.to_dict() if self.plan else None,
            },
            "config": self.config.to_dict(),
            "in_chans": self.data.channels,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "version": __version__,
        }

    def knn(self, sizes: tuple[int | None, int | None] | None = None) -> dict[str, float] | None:
        """kNN top-1 of the query backbone; the main process evaluates, the others go on to
        the next step and wait for it there."""
        if self.test_set is None or self.knn_memory is None or not self.is_main:
            return None
        return evaluate_knn(
            self.model.backbone,
            self.knn_memory,
            self.test_set,
            self.config,
            self.device,
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
        memory = len(self.knn_memory) if self.knn_memory is not None else 0
        return min(total * 4 // 5, memory), max(total // 5, 20)

    def monitor(self, log: MetricsLog | NullLog) -> dict[str, float] | None:
        """kNN on a subset every ``eval.monitor_every`` steps, from step 0 (not at the last
        step, which gets the full-split evaluation)."""
        every = self.config.eval.monitor_every
        if not every or self.step % every or self.step == self.schedules.total_steps:
            return None
        result = self.knn(self.monitor_sizes())
        if result is not None:
            log.log("knn_monitor", self.step, **result)
            if self.step > 0:  # a random init's kNN is no learned value to dip from
                self._detector_before_monitor = (self.step, self.detector.state_dict())
                self._report(self.detector.observe_knn(self.step, result["knn_top1"]), log)
        return result

    def _detector_state(self) -> dict[str, Any]:
        """The detector's state for a checkpoint at this step: as it was before this step's
        kNN monitor, which a resumed run evaluates again (so its dip is flagged once)."""
        step, state = self._detector_before_monitor
        return state if step == self.step else self.detector.state_dict()

    def _report(self, events: list[InstabilityEvent], log: MetricsLog | NullLog) -> None:
        for event in events:
            log.log("instability", event.step, **event_record(event))
            if self._progress is not None:
                self._progress.message(f"instability: {event.describe()}")

    def _observe_step(self, loss: float, log: MetricsLog | NullLog) -> None:
        """Log this step's gradient norms and feed them and the loss to the detector
        (records carry the number of steps done, as train records do)."""
        done = self.step + 1
        events = []
        if math.isfinite(loss):
            events += self.detector.observe_loss(done, loss)
        if self._grad_norms is not None:
            norms = {k: v for k, v in self._grad_norms.items() if math.isfinite(v)}
            log.log("grad", done, **{k: float(f"{v:.6g}") for k, v in norms.items()})
            events += self.detector.observe_gradients(done, norms)
            self._grad_norms = None
        self._report(events, log)

    # ------------------------------------------------------------------ time budget
    def _plan_budget(self, log: MetricsLog | NullLog, progress: Progress) -> None:
        """Measure a step, estimate the evaluation, and lay the schedules over the steps
        that fit in ``train.budget_minutes`` (see engine/budget.py)."""
        minutes = float(self.config.train.budget_minutes or 0)
        step_seconds = self._measure_step_seconds()
        final_images = sum(self._final_eval_sizes())
        monitor_images = 0.0
        if self.config.eval.monitor_every and self.test_set is not None:
            monitor_images = sum(self.monitor_sizes()) / self.config.eval.monitor_every
        per_image = 0.0
        if final_images or monitor_images:
            per_image = self._eval_seconds_per_image or self._measure_eval_seconds_per_image()
        monitor = per_image * monitor_images
        eval_seconds = 1.1 * per_image * final_images
        elapsed = self.elapsed()
        steps = plan_steps(minutes * 60, elapsed, step_seconds, eval_seconds, monitor)
        steps = self._agree_steps(steps)
        self.plan = BudgetPlan(minutes, steps, step_seconds, eval_seconds, monitor, elapsed)
        self._lay_schedules(steps, progress)
        epochs = steps / self.schedules.steps_per_epoch
        progress.message(
            f"time budget {minutes:g} min: {steps} steps ({epochs:.2f} epochs) at "
            f"{step_seconds:.3f} s per step, {eval_seconds:.0f} s kept for the final evaluation"
        )
        log.log("budget", 0, **self.plan.to_dict())

    def _agree_steps(self, steps: int) -> int:
        """The processes' mean step count: every process must lay out the same schedule."""
        if not is_distributed():
            return steps
        total = sum_over_processes(torch.tensor([float(steps)], device=self.device))[0]
        return int(total) // self.process.world_size

    def _lay_schedules(self, steps: int, progress: Progress) -> None:
        self.schedules = build_schedules(self.config, self.data.num_images, steps)
        self.close()
        self.batches = self._batch_source(self.step, steps)
        progress.total = steps

    def _maybe_replan(self, log: MetricsLog | NullLog, progress: Progress) -> None:
        """At ``replan_step``: plan again from the wall time the steps since the previous
        plan took (logging and checkpoints included, the kNN monitor excluded: it keeps its
        own estimate), so the schedules end when the budget does instead of being cut short
        by the hard stop or finishing early (see engine/budget.py). The main process's count
        is taken: the others wait out its kNN monitor inside their next step, which would
        count the monitor twice."""
        plan = self.plan
        if plan is None:
            return
        at = replan_step(plan.steps, plan.replans, plan.replanned_at_step)
        first_step, started, monitor_before = self._pace_from
        # resumed just before: too few steps to measure, the check waits for ten
        if at is None or self.step < at or self.step - first_step < 10:
            return
        elapsed = self.elapsed()
        spent = elapsed - started - (self.monitor_seconds - monitor_before)
        pace = spent / (self.step - first_step)
        left = plan_steps(
            plan.seconds, elapsed, pace, plan.eval_seconds, plan.monitor_seconds_per_step
        )
        steps, was = self._main_process_steps(self.step + left), plan.steps
        if plan.first_steps is None:
            plan.first_steps = plan.steps
        plan.replanned_at_step, plan.replans = self.step, plan.replans + 1
        plan.steps, plan.step_seconds, plan.planned_after_seconds = steps, pace, elapsed
        if steps != self.schedules.total_steps:
            self._lay_schedules(steps, progress)
        progress.message(
            f"time budget: {pace:.3f} s per step lately; re-planned at step {self.step} to "
            f"{steps} steps ({steps / self.schedules.steps_per_epoch:.2f} epochs, was {was})"
        )
        log.log("budget", self.step, **plan.to_dict())
        self._pace_from = (self.step, elapsed, self.monitor_seconds)  # the next measure

    def _main_process_steps(self, steps: int) -> int:
        """The main process's step count, for every process."""
        if not is_distributed():
            return steps
        mine = torch.tensor([float(steps if self.is_main else 0)], device=self.device)
        return int(sum_over_processes(mine)[0])

    def _measure_step_seconds(self, steps: int = 4) -> float:
        """The median time of real training steps 2..``steps`` (the first pays one-off
        costs); the model, optimiser, scaler, RNGs and counters are then put back exactly,
        so the run goes on as if they had not been taken."""
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        schedules = self.schedules  # the epoch-based one may be shorter than ``steps``
        self.schedules = build_schedules(
            self.config, self.data.num_images, max(steps, schedules.total_steps)
        )
        scaler, rng, skipped = self.scaler.state_dict(), rng_state(), self.skipped_steps
        original, self.batches = self.batches, self._batch_source(0, steps)
        times = []
        try:
            for step in range(steps):
                tic = time.perf_counter()
                self.train_step(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - tic)
        finally:
            assert self.batches is not None
            self.batches.close()
            self.batches, self.schedules = original, schedules
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            self.scaler.load_state_dict(scaler)
            set_rng_state(rng)
            self.skipped_steps, self._skipped_now, self._grad_norms = skipped, None, None
        seconds = statistics.median(times[1:]) if len(times) > 1 else times[0]
        if is_distributed():  # the processes' mean
            total = sum_over_processes(torch.tensor([seconds], device=self.device))[0]
            seconds = float(total) / self.process.world_size
        return seconds

    def _final_eval_sizes(self) -> tuple[int, int]:
        if not self.config.eval.knn_final or self.test_set is None or self.knn_memory is None:
            return 0, 0
        ev = self.config.eval
        memory = min(ev.train_subset or len(self.knn_memory), len(self.knn_memory))
        return memory, min(ev.test_subset or len(self.test_set), len(self.test_set))

    def _measure_eval_seconds_per_image(self) -> float:
        """Forward time per image of the kNN feature pass, on up to 512 images."""
        source = self.knn_memory if self.knn_memory is not None else self.test_set
        if source is None:
            return 0.0
        sample = source.subset(min(512, len(source)))
        args = (source.mean, source.std, self.device, self.config.eval.batch_size)
        tic = time.perf_counter()
        extract_features(self.model.backbone, sample.images, *args, self.config.train.precision)
        return (time.perf_counter() - tic) / len(sample)

    def _agree_out_of_time(self) -> bool:
        """Whether the budget leaves only the final evaluation's time (any process)."""
        if self.plan is None or self.step >= self.schedules.total_steps:
            return False
        return self._any_process(self.plan.out_of_time(self.elapsed()))

    def _stop_for_budget(self, progress: Progress) -> None:
        self._budget_stop = True
        progress.message(
            f"time budget reached after step {self.step} of {self.schedules.total_steps} "
            "planned (the machine ran slower than measured); evaluating now"
        )

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT: finish the step, checkpoint, stop (status 0). A second one raises
        KeyboardInterrupt at once (status 130): an atomic write it cuts short leaves the
        previous checkpoint as it was."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum  # no printing here: a handler may interrupt a print

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _resume_command(self) -> str:
        if self.resume_command:
            return self.resume_command
        out = str(self.out_dir)
        return "mocov3 " + shlex.join(
            [
                "pretrain",
                "--config",
                str(self.out_dir / "config.yaml"),
                "--out",
                out,
                "--resume",
                "auto",
            ]
        )

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train, evaluate, plot; only the main process writes files and prints."""
        resumed = self.resume_from is not None
        log: MetricsLog | NullLog = NullLog()
        if self.is_main:
            write_text_atomic(self.out_dir / "config.yaml", _yaml(self.config.to_dict()))
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step if resumed else None)
            # TensorBoard drops events a killed session logged after the checkpoint
            log = MetricsLog(self.out_dir, purge_step=self.step + 1 if resumed else None)
        progress = Progress(
            self.schedules.total_steps, self.config.train.log_every, quiet=not self.is_main
        )
        self._progress = progress
        summary: dict[str, Any] = {"epochs": self.config.train.epochs}
        if self.process.world_size > 1:
            summary["processes"] = self.process.world_size
        with self._stop_on_signals():
            try:
                summary.update(self._run(log, progress))
            finally:
                log.close()
            if summary.get("preempted") or not self.is_main:
                return summary
            plots = plot_run(self.out_dir)
            summary["plots"] = [str(p) for p in plots]
            write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _run(self, log: MetricsLog | NullLog, progress: Progress) -> dict[str, Any]:
        results: dict[str, Any] = {}
        started = time.perf_counter()
        if self.resume_from is None and self.config.eval.knn_init:
            tic = time.perf_counter()
            if (init := self.knn()) is not None:
                self._eval_seconds_per_image = (time.perf_counter() - tic) / (
                    init["train_images"] + init["test_images"]
                )
                log.log("knn", 0, **init)
                progress.message(f"kNN at random init: {init}")
                self.knn_init = init
        if self.knn_init is not None:
            results["knn_top1_init"] = self.knn_init["knn_top1"]
        if self.config.train.budget_minutes and self.plan is None:
            if self.step > 0:
                raise TrainingError(
                    f"train.budget_minutes is set, but {self.resume_from} was written by a run "
                    "without a time budget: a budget is planned when a run starts; resume "
                    "without it, or start a new run with it"
                )
            self._plan_budget(log, progress)
        self._train_loop(log, progress)
        if self._stopping:
            return self._preempted(progress)
        images = self.step * self.config.train.batch_size
        train_seconds = max(self.train_seconds, 1e-9)
        results.update(
            images_per_second=round(images / train_seconds, 2),
            train_seconds=round(self.train_seconds, 1),
            final_loss=round(self.last_loss, 5),
            steps=self.step,
            skipped_steps=self.skipped_steps,
            instability_events=self.detector.summary(),
        )
        if self.resume_from is not None:
            results["resumed_from"] = str(self.resume_from)
        if self.config.eval.monitor_every:
            results["knn_monitor_seconds"] = round(self.monitor_seconds, 1)
            results["knn_monitor_share"] = round(self.monitor_seconds / train_seconds, 4)
        if self.config.eval.knn_final and (final := self.knn()) is not None:
            log.log("knn", self.step, **final)
            progress.message(f"kNN after training: {final}")
            results.update(final)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["run_wall_seconds"] = round(self.elapsed(), 1)  # all sessions, setup included
        if self.plan is not None:
            results["epochs"] = round(self.step / self.schedules.steps_per_epoch, 4)
            results["budget"] = {
                **self.plan.to_dict(),
                "steps_done": self.step,
                "stopped_early": self.step < self.plan.steps,
                "run_wall_seconds": round(self.elapsed(), 1),
            }
        return results

    def _preempted(self, progress: Progress) -> dict[str, Any]:
        """After a signal: make sure the current step is checkpointed, say how to go on."""
        if self._saved_step != self.step:
            self._save()
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "SIGTERM"
        command = self._resume_command()
        progress.message(
            f"stopped by {name} after step {self.step}/{self.schedules.total_steps}, "
            f"checkpoint {self.last_checkpoint}; resume with: {command}"
        )
        return {
            "preempted": True,
            "signal": name,
            "step": self.step,
            "checkpoint": str(self.last_checkpoint),
            "resume_command": command,
        }

    def _train_loop(self, log: MetricsLog | NullLog, progress: Progress) -> None:
        spe = self.schedules.steps_per_epoch
        batch = self.config.train.batch_size
        self.model.train()
        window: list[float] = []
        if (start := self.monitor(log)) is not None:
            self.last_knn = start["knn_top1"]  # the monitor's own starting point, same subset
        self._pace_from = (self.step, self.elapsed(), self.monitor_seconds)
        while self.step < self.schedules.total_steps and not self._agree_to_stop():
            tic = time.perf_counter()
            loss = self.train_step(self.step)
            elapsed = time.perf_counter() - tic
            self.train_seconds += elapsed
            self.last_loss = loss
            if self._skipped_now is not None:
                progress.message(f"warning: skipped the step: {self._skipped_now}")
                log.log("skipped", self.step + 1, reason=self._skipped_now)
                self._skipped_now = None
            self._observe_step(loss, log)
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
            if self.last_knn is not None:
                fields["knn"] = f"{self.last_knn:.1f}"
            fields["inst"] = str(self.detector.total)
            progress.update(self.step, fields, per_step)
            self.step += 1
            self._maybe_replan(log, progress)
            out_of_time = self._agree_out_of_time()
            if out_of_time:
                self._stop_for_budget(progress)
            self._maybe_checkpoint()
            if self._agree_to_stop() or out_of_time:
                break
            tic = time.perf_counter()
            if (result := self.monitor(log)) is not None:
                self.last_knn = result["knn_top1"]
                self.monitor_seconds += time.perf_counter() - tic

    def _maybe_checkpoint(self) -> None:
        t, spe = self.config.train, self.schedules.steps_per_epoch
        at_end = self.step == self.schedules.total_steps or self._budget_stop
        every = t.checkpoint_every_steps or t.checkpoint_every * spe
        epoch, within = divmod(self.step, spe)
        milestone = epoch if within == 0 and epoch in t.milestones else None
        if at_end or self.step % every == 0 or milestone is not None:
            self._save(milestone)
        if self.is_main and not at_end and self.step % (t.plot_every * spe) == 0:
            plot_run(self.out_dir)

    def _save(self, milestone: int | None = None) -> None:
        if not self.is_main:  # the main process writes for all (they hold the same state)
            self._saved_step = self.step
            return
        self.last_checkpoint = save_run_checkpoint(
            self.checkpoint_state(),
            self.out_dir,
            self.step,
            self.config.train.keep_checkpoints,
            milestone,
        )
        self._saved_step = self.step


def _saved_plan(state: dict[str, Any] | None) -> BudgetPlan | None:
    """The time budget's plan a checkpoint carries (None: not planned yet)."""
    saved = (state or {}).get("progress", {}).get("budget")
    if not saved:
        return None
    try:
        return BudgetPlan.from_dict(saved)
    except (KeyError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint's time-budget plan is unreadable ({error}); resume without "
            "train.budget_minutes, or start a new run"
        ) from None


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


def pretrain(
    config: Config,
    out_dir: str | Path,
    resume: str | Path | None = None,
    resume_command: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run MoCo v3 pretraining into ``out_dir`` and return the summary dict (with
    ``preempted: true`` when a signal stopped it; see :class:`Trainer` for ``resume``).
    ``overwrite``: start a new run even where an earlier run left checkpoints.

    Under ``torchrun`` with several processes this joins the process group (gloo on CPU,
    NCCL on CUDA) and leaves it on every way out; each process returns its summary, the
    main process's being the full one."""
    device = resolve_device(config.train.device, launched_info())
    with process_group(device, config.train.dist_timeout_minutes) as process:
        trainer = Trainer(
            config,
            out_dir,
            resume=resume,
            resume_command=resume_command,
            overwrite=overwrite,
            process=process,
        )
        try:
            return trainer.run()
        finally:
            trainer.close()
