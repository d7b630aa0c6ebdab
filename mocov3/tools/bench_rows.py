"""The rows ``mocov3 bench`` times: a ladder from the reference's step to our fastest.

Each row is one variant of the full pretraining step on the same batch and from the same
initial weights, so every row computes the same function (to bf16 rounding in bf16 rows):

1. ``reference``: the reference implementation's step, mirrored
   (:mod:`mocov3.tools.reference_step`; ViT presets only);
2. ``straightforward``: our model, the step written plainly (forward, backward, torch's
   default AdamW), each view on its own, the batched augmentation;
3. ``training path``: the same math through the trainer's own step (its non-finite guard,
   gradient-norm monitor and loss reduction), which must not be slower than row 2;
4. then one lever per row, each on top of its base row: fused AdamW, the last block
   computing the class token alone, (on request, on a CPU) ``torch.compile`` in fp32; then
   on the best eager fp32 row bf16 autocast (where the device has it), the attention kernel
   bf16 wants on a CPU, both views in one backbone call, and on request ``torch.compile``
   and channels_last. fp16 on a GPU is an alternative to bf16, compared with the same base.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mocov3.config import Config, is_resnet_arch
from mocov3.data.augment import TwoViewAugment
from mocov3.data.counters import sample_keys
from mocov3.models.moco import build_moco
from mocov3.models.vit import set_attention_kernel, set_class_token_only
from mocov3.optim.optimizers import build_optimizer
from mocov3.optim.schedules import scaled_lr
from mocov3.runtime.performance import apply_memory_format, compile_backbones, to_memory_format
from mocov3.runtime.precision import autocast_context
from mocov3.tools.measure import synchronize
from mocov3.tools.reference_step import ReferenceStep
from mocov3.tools.rounds import MIN_ROUNDS
from mocov3.train.step import build_train_step

# Normalisation constants for the random images; they change values, not speed.
MEAN, STD = 0.5, 0.25
# A precision slower than fp32 here (bf16 emulated on an AVX2 CPU) is first timed at this
# batch to size its rows to --max-row-seconds.
PROBE_BATCH = 2


@dataclass(frozen=True)
class RowSpec:
    """One variant of the step. ``step``: "reference", "straightforward" or "training";
    ``attention``: the ViT's kernel (:data:`mocov3.models.vit.ATTENTION_KERNELS`);
    ``lever``: what the row changes from ``base``, the row it is compared with, in words."""

    name: str
    step: str = "training"
    precision: str = "fp32"
    concat: bool = False
    fused: bool = False
    attention: str = "auto"
    compiled: bool = False
    channels_last: bool = False
    class_token_only: bool = True
    lever: str = ""
    base: str = ""


@dataclass
class Bench:
    """Everything the rows share: the config, the device, the one batch, the measurements."""

    config: Config
    device: torch.device
    channels: int
    images: torch.Tensor  # uint8 [B, C, S, S] on the CPU (the reference row's input)
    images_on_device: torch.Tensor
    flops_per_image: float = 0.0  # the trainer's step (the last block: class token only)
    flops_every_token: float = 0.0  # with the last block over every token (the reference)
    peaks: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int | None = None  # timed rounds; None: at least 5, within ``seconds`` a row
    warmup: int = 1
    seconds: float = 10.0
    max_row_seconds: float = 60.0
    tf32: bool = False
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    reference_workers: int = 0  # the reference row's DataLoader workers (bench.py sets it)


def ladder(bench: Bench, compiled: bool, channels_last: bool) -> list[RowSpec]:
    """The rows for this preset and device, each adding one lever to its ``base`` row: the
    fp32 levers first, then the low-precision ones on top of the best eager fp32 row."""
    config, device = bench.config, bench.device
    vit = not is_resnet_arch(config.model.arch)
    # the reference has no ViT-BN, and the class token shortcut is off there
    plain_vit = vit and config.model.mlp_norm == "layernorm"
    rows = []
    if plain_vit:
        precision = "fp16" if device.type == "cuda" else "fp32"  # the reference's
        rows.append(RowSpec("reference (mirrored)", "reference", precision))
    plain = RowSpec("straightforward fp32", "straightforward", class_token_only=False)
    rows.append(
        _on(rows[0], plain, "our model, plain step, batched augmentation") if rows else plain
    )
    last = _add(
        rows, replace(plain, name="training path fp32", step="training"), "the trainer's step"
    )
    if config.optim.name == "adamw":  # LARS has no fused kernel
        last = _add(rows, replace(last, name="+ fused AdamW", fused=True), "AdamW's fused kernel")
    if plain_vit:
        spec = replace(last, name="+ class token only", class_token_only=True)
        last = _add(rows, spec, "the last block computes the class token alone")
    if compiled and device.type == "cpu":  # the fp32 target is a CPU's
        _add(rows, replace(last, name="+ compile fp32", compiled=True), "torch.compile")
    low = [p for p in ("bf16", "fp16") if p in bench.precisions]
    siblings, fp32_best = [], last
    for precision in low:
        lever = f"{precision} autocast" + (" + grad scaler" if precision == "fp16" else "")
        attention = "sdpa" if vit and device.type == "cpu" and precision == "bf16" else "auto"
        spec = replace(fp32_best, name=f"+ {precision}", precision=precision, attention=attention)
        if precision != low[0]:  # an alternative to the first low precision, compared apart
            siblings.append(_on(fp32_best, spec, lever))
            continue
        last = _add(rows, spec, lever, base=last)
        if attention == "sdpa":
            spec = replace(last, name="+ explicit attention", attention="auto")
            last = _add(rows, spec, "softmax(q k^T) v as 3 ops: auto's pick for bf16 on a CPU")
    if vit and config.moco.concat_views:  # a BatchNorm backbone must encode views apart
        last = _add(rows, replace(last, name="+ concat views", concat=True), "one call, 2 views")
    if compiled:
        last = _add(rows, replace(last, name="+ compile", compiled=True), "torch.compile")
    if channels_last:
        _add(rows, replace(last, name="+ channels_last", channels_last=True), "channels_last")
    return rows + siblings


def _on(base: RowSpec, spec: RowSpec, lever: str) -> RowSpec:
    """``spec`` as a lever on top of ``base``."""
    return replace(spec, lever=lever, base=base.name)


def _add(rows: list[RowSpec], spec: RowSpec, lever: str, base: RowSpec | None = None) -> RowSpec:
    """``spec`` as a lever on top of ``base`` (None: the last row), appended."""
    spec = _on(base or rows[-1], spec, lever)
    rows.append(spec)
    return spec


def row_config(config: Config, spec: RowSpec) -> Config:
    """The preset as this row trains it."""
    config = copy.deepcopy(config)
    config.train.precision = spec.precision
    config.train.compile = spec.compiled
    config.train.channels_last = spec.channels_last
    config.moco.concat_views = spec.concat
    return config


# ----------------------------------------------------------------------------- our step


class BatchedAugment:
    """The trainer's input path: per-sample keys, then both views of the whole batch on the
    device (:meth:`mocov3.train.trainer.Trainer.batch`)."""

    def __init__(self, bench: Bench, config: Config, images: torch.Tensor) -> None:
        channels = bench.channels
        mean, std = (MEAN,) * channels, (STD,) * channels
        self.augment = TwoViewAugment(config.augment, config.data.image_size, mean, std)
        self.images, self.config = images, config
        self.device = bench.device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.arange(self.images.shape[0])
        keys = sample_keys(self.config.train.seed, step, indices).to(self.device)
        x1, x2 = self.augment(self.images, keys)  # new views every step
        return to_memory_format(x1, self.config.train), to_memory_format(x2, self.config.train)


class OurStep:
    """Our step, plain (``straightforward``) or through the trainer's :class:`TrainStep`
    (``training``). Called with the step number, it returns (augmentation seconds, seconds
    of the whole step)."""

    def __init__(self, bench: Bench, spec: RowSpec, batch: int) -> None:
        config = row_config(bench.config, spec)
        self.device, self.precision = bench.device, spec.precision
        torch.manual_seed(config.train.seed)  # the same initial weights in every row
        model = build_moco(config, bench.channels).to(bench.device)
        set_attention_kernel(model, spec.attention)
        set_class_token_only(model, spec.class_token_only)
        self.model = apply_memory_format(model, config.train)
        compile_backbones(self.model, config.train)
        self.lr = scaled_lr(config.optim.base_lr, batch)
        self.momentum = config.moco.momentum
        self.augment = BatchedAugment(bench, config, bench.images_on_device[:batch])
        self.skipped_steps = 0  # steps whose AdamW an fp16 grad scaler skipped
        if spec.step == "training":
            self.train_step = build_train_step(config, self.model, bench.device, spec.fused)
            self.scaler = self.train_step.scaler
            self.run: Callable[[torch.Tensor, torch.Tensor, int], None] = self._training
        else:
            self.optimizer = build_optimizer(self.model, config.optim, bench.device, spec.fused)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self.scaler = torch.amp.GradScaler(bench.device.type, enabled=False)
            self.run = self._straightforward

    def __call__(self, step: int) -> tuple[float, float]:
        start = time.perf_counter()
        x1, x2 = self.augment(step)
        synchronize(self.device)
        augmented = time.perf_counter()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.run(x1, x2, step)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if scale is not None and self.scaler.get_scale() < scale:
            self.skipped_steps += 1  # an fp16 overflow: the scaler skipped AdamW this step
        return augmented - start, seconds

    def _straightforward(self, x1: torch.Tensor, x2: torch.Tensor, step: int) -> None:
        with autocast_context(self.device, self.precision):
            loss = self.model(x1, x2, self.momentum)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        loss.item()  # a training loop reads its loss every step

    def _training(self, x1: torch.Tensor, x2: torch.Tensor, step: int) -> None:
        self.train_step(x1, x2, step, self.lr, self.momentum)


def build_step(bench: Bench, spec: RowSpec, batch: int) -> Callable[[int], tuple[float, float]]:
    """The callable that takes one step of ``spec`` at ``batch``."""
    if spec.step != "reference":
        return OurStep(bench, spec, batch)
    torch.manual_seed(bench.config.train.seed)  # our initial weights, copied into the mirror
    ours = build_moco(row_config(bench.config, spec), bench.channels)
    lr = scaled_lr(bench.config.optim.base_lr, batch)
    images = bench.images[:batch]
    return ReferenceStep(
        ours, bench.config, images, bench.device, lr, bench.reference_workers, (MEAN, STD)
    )


# ----------------------------------------------------------------------------- slow rows


def is_slow(precision: str, bench: Bench) -> bool:
    """An emulated precision on this device: its matmul peak is below fp32's."""
    return (
        precision in bench.peaks
        and bench.peaks[precision]["gflops"] < bench.peaks["fp32"]["gflops"]
    )


def probe_seconds_per_image(spec: RowSpec, bench: Bench) -> float:
    """Seconds per image of ``spec`` from a second step at batch ``PROBE_BATCH`` (the first
    warms up). Per-step overhead makes it an overestimate, the safe side for sizing a row."""
    step = build_step(bench, spec, PROBE_BATCH)
    try:
        step(0)
        return step(1)[1] / PROBE_BATCH
    finally:
        close = getattr(step, "close", None)
        if close is not None:
            close()  # a reference row's DataLoader workers


def fitted_batch(bench: Bench, seconds_per_image: float) -> int:
    """The preset's batch, or if its warm-up and timed steps would overrun
    ``max_row_seconds``, the largest power of two (at least 2) predicted to fit."""
    batch = bench.config.train.batch_size
    steps = bench.warmup + (bench.steps or MIN_ROUNDS)
    if steps * batch * seconds_per_image <= bench.max_row_seconds:
        return batch
    fits = bench.max_row_seconds / (steps * seconds_per_image)
    return min(batch, max(2, 2 ** int(math.log2(max(fits, 1.0)))))


def row_batches(
    specs: Sequence[RowSpec], bench: Bench, skip_slow: bool, progress: Callable[[str], None]
) -> list[tuple[RowSpec, int, str]]:
    """(spec, batch, note) per row to run: an emulated precision's rows get a batch sized to
    ``max_row_seconds`` from a probe step (or are left out with ``skip_slow``), so an
    emulated bf16 cannot turn the bench into an hour."""
    planned = []
    fitted: dict[str, int] = {}  # one batch per slow precision, so its rows compare
    for spec in specs:
        batch, note = bench.config.train.batch_size, ""
        if spec.precision != "fp32" and is_slow(spec.precision, bench):
            if skip_slow:
                progress(f"skipping {spec.name}: {spec.precision} is emulated on this device")
                continue
            if spec.precision not in fitted:
                progress(f"probing {spec.precision} at batch {PROBE_BATCH} (slow here)")
                fitted[spec.precision] = fitted_batch(bench, probe_seconds_per_image(spec, bench))
            batch = fitted[spec.precision]
            if batch < bench.config.train.batch_size:
                note = f"{spec.precision} is emulated here: batch reduced to fit the time budget"
        planned.append((spec, batch, note))
    return planned
