"""``mocov3 bench``: how fast the full MoCo v3 pretraining step runs on this machine, and why.

In one process, on one random uint8 batch of the preset's shape (no dataset needed), from
the same initial weights, it times side by side:

* the baseline: fp32, one backbone call per view, and the straightforward input pipeline
  (torchvision's per-image transforms in a Python loop on the CPU, then a copy to the device);
* fp32 with the batched on-device augmentation, per-view and with both views concatenated;
* the same in bf16 (and fp16 with a grad scaler on CUDA); compiled / channels_last rows on
  request.

Each row runs warm-up steps, then timed steps of augmentation, forward of both encoders,
momentum update, backward and AdamW, the way the trainer does them (same builders, autocast,
scaler and speed settings). FLOPs per image come from ``torch.utils.flop_counter`` over one
step; MFU is achieved FLOP/s over a matmul peak measured in the same run, so the
percentages mean the same thing on any machine. The augmentation is timed on its own inside
each step (with a device sync) to give its share of the step.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torchvision.transforms import v2

from mocov3.config import AugmentConfig, Config, is_resnet_arch, load_config, resolve_model_dims
from mocov3.data.augment import TwoViewAugment, blur_radius
from mocov3.data.counters import sample_keys
from mocov3.data.datasets import default_channels
from mocov3.errors import ConfigError
from mocov3.models.moco import MoCo, build_moco
from mocov3.optim.optimizers import build_optimizer
from mocov3.optim.schedules import scaled_lr
from mocov3.runtime.device import resolve_device
from mocov3.runtime.logging import format_duration
from mocov3.runtime.performance import (
    apply_memory_format,
    compile_backbones,
    set_tf32,
    to_memory_format,
)
from mocov3.runtime.precision import autocast_context
from mocov3.tools.measure import (
    PeakMemory,
    count_flops,
    machine_info,
    measure_peaks,
    synchronize,
)

DEFAULT_CONFIG = "bench_cpu"  # a packaged preset (mocov3.presets)
# Normalisation constants for the random images; they change values, not speed.
MEAN, STD = 0.5, 0.25
# The FLOP count runs one real step; a small batch keeps it cheap. Per-image FLOPs are
# independent of the batch except for the B x B logits of the loss (< 0.1% at these sizes).
FLOP_COUNT_BATCH = 8
# A precision slower than fp32 here (bf16 emulated on an AVX2 CPU) is first timed at this
# batch to size its rows to --max-row-seconds.
PROBE_BATCH = 2


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RowSpec:
    """One variant of the step. ``augment``: "torchvision" (per image, CPU) or "batched"."""

    name: str
    precision: str
    concat: bool
    augment: str = "batched"
    compiled: bool = False
    channels_last: bool = False


def baseline_spec() -> RowSpec:
    return RowSpec("baseline fp32 per-view tv", "fp32", concat=False, augment="torchvision")


def variant_specs(precisions: Sequence[str]) -> list[RowSpec]:
    """The baseline, then per-view and concatenated rows for each precision (fp32 first, so
    a slow precision's batch can be sized from fp32's measured efficiency)."""
    specs = [baseline_spec()]
    for precision in sorted(precisions, key=lambda p: p != "fp32"):
        specs.append(RowSpec(f"{precision} per-view", precision, concat=False))
        specs.append(RowSpec(f"{precision} concat", precision, concat=True))
    return specs


@dataclass
class Bench:
    """Everything the rows share: the config, the device, the one batch, the measurements."""

    config: Config
    device: torch.device
    channels: int
    images: torch.Tensor  # uint8 [B, C, S, S] on the CPU (the baseline's input)
    images_on_device: torch.Tensor
    flops_per_image: float = 0.0
    peaks: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int | None = None  # None: as many as fit in ``seconds``
    warmup: int = 1
    seconds: float = 10.0
    max_row_seconds: float = 60.0
    tf32: bool = False
    precisions: list[str] = field(default_factory=lambda: ["fp32"])


# ----------------------------------------------------------------------------- input pipelines


def torchvision_view(
    cfg: AugmentConfig, view: int, size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One view of the paper's asymmetric BYOL recipe as torchvision per-image transforms on
    a uint8 [C, H, W] tensor: what a straightforward data loader does for every image."""
    jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply([jitter], p=cfg.jitter_p),
        v2.RandomGrayscale(cfg.grayscale_p),
    ]
    radius = blur_radius(cfg.blur_sigma[1], size)  # the batched path's kernel, for a fair race
    if radius > 0:
        blur = v2.GaussianBlur(2 * radius + 1, sigma=cfg.blur_sigma)
        ops.append(v2.RandomApply([blur], p=cfg.blur_p[view]))
    ops += [
        v2.RandomSolarize(threshold=128, p=cfg.solarize_p[view]),  # uint8, as PIL's 128
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


class TorchvisionAugment:
    """The baseline pipeline: a Python loop over the batch on the CPU main thread, then one
    copy of both stacked views to the device."""

    def __init__(self, bench: Bench, images: torch.Tensor) -> None:
        channels, size = bench.channels, bench.config.data.image_size
        mean, std = (MEAN,) * channels, (STD,) * channels
        self.views = [torchvision_view(bench.config.augment, v, size, mean, std) for v in (0, 1)]
        self.images = images
        self.device = bench.device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.stack([self.views[0](image) for image in self.images])
        second = torch.stack([self.views[1](image) for image in self.images])
        return first.to(self.device), second.to(self.device)


class BatchedAugment:
    """The trainer's path: per-sample keys, then both views of the whole batch on the device."""

    def __init__(self, bench: Bench, images: torch.Tensor) -> None:
        channels = bench.channels
        self.augment = TwoViewAugment(
            bench.config.augment,
            bench.config.data.image_size,
            (MEAN,) * channels,
            (STD,) * channels,
        )
        self.images = images
        self.seed = bench.config.train.seed
        self.device = bench.device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.arange(self.images.shape[0])
        keys = sample_keys(self.seed, step, indices).to(self.device)  # new views every step
        return self.augment(self.images, keys)


# ----------------------------------------------------------------------------- the step


class StepRunner:
    """One training step as the trainer runs it, with the augmentation timed separately."""

    def __init__(self, bench: Bench, spec: RowSpec, batch: int) -> None:
        config = bench.config
        settings = replace(config.train, channels_last=spec.channels_last, compile=spec.compiled)
        self.device, self.precision, self.settings = bench.device, spec.precision, settings
        torch.manual_seed(config.train.seed)  # the same initial weights in every row
        model = build_moco(config, bench.channels).to(bench.device)
        model.concat_views = spec.concat
        self.model: MoCo = apply_memory_format(model, settings)  # type: ignore[assignment]
        compile_backbones(self.model, settings)
        self.optimizer = build_optimizer(self.model, config.optim, bench.device)
        for group in self.optimizer.param_groups:
            group["lr"] = scaled_lr(config.optim.base_lr, batch)
        self.scaler = torch.amp.GradScaler(bench.device.type, enabled=spec.precision == "fp16")
        self.momentum = config.moco.momentum
        if spec.augment == "torchvision":
            self.augment: Callable = TorchvisionAugment(bench, bench.images[:batch])
        else:
            self.augment = BatchedAugment(bench, bench.images_on_device[:batch])

    def __call__(self, step: int) -> tuple[float, float]:
        """Run step ``step``; return (augmentation seconds, whole step seconds)."""
        start = time.perf_counter()
        x1, x2 = self.augment(step)
        x1, x2 = to_memory_format(x1, self.settings), to_memory_format(x2, self.settings)
        synchronize(self.device)
        augmented = time.perf_counter()
        with autocast_context(self.device, self.precision):
            loss = self.model(x1, x2, self.momentum)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss.item()  # the trainer reads the loss every step; this also syncs the device
        return augmented - start, time.perf_counter() - start


# ----------------------------------------------------------------------------- FLOPs and peaks


def step_flops_per_image(
    config: Config, channels: int, device: torch.device, batch: int = FLOP_COUNT_BATCH
) -> float:
    """Forward (query and momentum encoders, both views) plus backward FLOPs of one fp32
    step, per image. The optimiser and the EMA are elementwise and not counted."""
    torch.manual_seed(config.train.seed)
    model = build_moco(config, channels).to(device)
    size = config.data.image_size
    x1, x2 = (torch.randn(batch, channels, size, size, device=device) for _ in range(2))

    def step() -> None:
        model(x1, x2, config.moco.momentum).backward()

    return count_flops(step) / batch


def peak_for(precision: str, bench: Bench) -> float:
    """FLOP/s a row of ``precision`` is measured against (fp32 rows run in TF32 when on)."""
    key = "tf32" if precision == "fp32" and bench.tf32 else precision
    return bench.peaks[key]["gflops"] * 1e9


# ----------------------------------------------------------------------------- running rows


def is_slow(precision: str, bench: Bench) -> bool:
    """An emulated precision on this device: its matmul peak is below fp32's."""
    return bench.peaks[precision]["gflops"] < bench.peaks["fp32"]["gflops"]


def probe_seconds_per_image(spec: RowSpec, bench: Bench) -> float:
    """Seconds per image of ``spec`` from a second step at batch ``PROBE_BATCH`` (the first
    warms up). Per-step overhead makes it an overestimate, the safe side for sizing a row."""
    runner = StepRunner(bench, spec, PROBE_BATCH)
    runner(0)
    return runner(1)[1] / PROBE_BATCH


def fitted_batch(bench: Bench, seconds_per_image: float) -> int:
    """The preset's batch, or if its warm-up and timed steps would overrun
    ``max_row_seconds``, the largest power of two (at least 2) predicted to fit."""
    batch = bench.config.train.batch_size
    steps = bench.warmup + (bench.steps or 1)
    if steps * batch * seconds_per_image <= bench.max_row_seconds:
        return batch
    fits = bench.max_row_seconds / (steps * seconds_per_image)
    return min(batch, max(2, 2 ** int(math.log2(max(fits, 1.0)))))


def run_row(spec: RowSpec, bench: Bench, batch: int, note: str = "") -> dict[str, Any]:
    """Warm-up, then timed steps of one variant; its speed, memory and efficiency."""
    reduced = batch < bench.config.train.batch_size
    probe = PeakMemory(bench.device)
    with probe:
        warm_start = time.perf_counter()
        runner = StepRunner(bench, spec, batch)
        for step in range(bench.warmup):
            runner(step)
        warmup_seconds = time.perf_counter() - warm_start
        augment_total = step_total = 0.0
        steps = 0
        while _more_steps(steps, step_total, bench, reduced):
            augment_seconds, step_seconds = runner(bench.warmup + steps)
            augment_total += augment_seconds
            step_total += step_seconds
            steps += 1
        del runner
    result = _row_result(spec, bench, batch, steps, step_total, augment_total, probe)
    return result | {
        "reduced_batch": reduced,
        "note": note,
        "warmup_seconds": round(warmup_seconds, 2),
    }


def _more_steps(done: int, elapsed: float, bench: Bench, reduced: bool) -> bool:
    """``--steps`` if given, else until ``seconds`` have passed (a reduced row, sized for one
    timed step, stops after one)."""
    if bench.steps is not None:
        return done < bench.steps
    if reduced:
        return done < 1
    return done < 1 or elapsed < bench.seconds


def _row_result(
    spec: RowSpec,
    bench: Bench,
    batch: int,
    steps: int,
    step_total: float,
    augment_total: float,
    probe: PeakMemory,
) -> dict[str, Any]:
    rate = batch * steps / step_total
    return {
        "name": spec.name,
        "precision": spec.precision,
        "concat_views": spec.concat,
        "augment": spec.augment,
        "compiled": spec.compiled,
        "channels_last": spec.channels_last,
        "batch": batch,
        "steps": steps,
        "images_per_second": round(rate, 2),
        "step_ms": round(1e3 * step_total / steps, 2),
        "augmentation_ms": round(1e3 * augment_total / steps, 2),
        "augmentation_share": round(augment_total / step_total, 4),
        "peak_memory_mib": None if probe.mib is None else round(probe.mib, 1),
        "achieved_gflops": round(rate * bench.flops_per_image / 1e9, 2),
    }


def add_efficiency(row: dict[str, Any], bench: Bench) -> None:
    """MFU against the row's own precision peak and against the fastest dtype's peak."""
    achieved = row["achieved_gflops"] * 1e9
    best_peak = max(peak["gflops"] for peak in bench.peaks.values()) * 1e9
    row["mfu"] = round(achieved / peak_for(row["precision"], bench), 4)
    row["mfu_vs_best_peak"] = round(achieved / best_peak, 4)


def run_rows(
    specs: Sequence[RowSpec], bench: Bench, skip_slow: bool, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Each spec in order; a slow precision gets a batch sized to ``max_row_seconds`` from a
    probe step, so an emulated bf16 cannot turn the bench into an hour."""
    rows: list[dict[str, Any]] = []
    fitted: dict[str, int] = {}  # one batch per slow precision, so its rows compare
    started = time.perf_counter()
    for index, spec in enumerate(specs):
        batch, note = bench.config.train.batch_size, ""
        if spec.precision != "fp32" and is_slow(spec.precision, bench):
            if skip_slow:
                progress(f"skipping {spec.name}: {spec.precision} is emulated on this device")
                continue
            if spec.precision not in fitted:
                progress(f"probing {spec.precision} at batch {PROBE_BATCH} (slow here)")
                seconds = probe_seconds_per_image(spec, bench)
                fitted[spec.precision] = fitted_batch(bench, seconds)
            batch = fitted[spec.precision]
            if batch < bench.config.train.batch_size:
                note = f"{spec.precision} is emulated here: batch reduced to fit the time budget"
        progress(f"timing {spec.name} (batch {batch}) {_row_eta(index, len(specs), started)}")
        rows.append(run_row(spec, bench, batch, note))
        row = rows[-1]
        progress(
            f"  {row['images_per_second']:.1f} img/s, {row['step_ms']:.0f} ms/step "
            f"({row['steps']} timed, warm-up {row['warmup_seconds']:.0f} s)"
        )
    return rows


def _row_eta(index: int, total: int, started: float) -> str:
    """``[row 3/5, eta 00:40]``: the rows left at the mean time of those done."""
    if index == 0:
        return f"[row 1/{total}]"
    left = (time.perf_counter() - started) / index * (total - index)
    return f"[row {index + 1}/{total}, eta {format_duration(left)}]"


def extra_specs(
    rows: Sequence[dict[str, Any]], compiled: bool, channels_last: bool
) -> list[RowSpec]:
    """On request, the fastest full-batch row's precision again, compiled / channels_last."""
    best = headline(rows)
    specs = []
    if compiled:
        specs.append(
            RowSpec(f"{best['precision']} concat compiled", best["precision"], True, compiled=True)
        )
    if channels_last:
        specs.append(
            RowSpec(
                f"{best['precision']} concat channels_last",
                best["precision"],
                True,
                channels_last=True,
            )
        )
    return specs


def headline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest row among those run at the preset's batch (a reduced row is not comparable)."""
    full = [row for row in rows if not row["reduced_batch"]] or list(rows)
    return max(full, key=lambda row: row["images_per_second"])


# ----------------------------------------------------------------------------- report


def summary(
    rows: list[dict[str, Any]], bench: Bench, config_path: str, overrides: Sequence[str]
) -> dict[str, Any]:
    """The JSON object: headline numbers of the fastest row, then everything measured."""
    baseline = rows[0]
    best = headline(rows)
    for row in rows:
        add_efficiency(row, bench)
        row["speedup_vs_baseline"] = round(
            row["images_per_second"] / baseline["images_per_second"], 3
        )
    machine = machine_info(bench.device)
    return {
        "images_per_second": best["images_per_second"],
        "mfu": best["mfu"],
        "mfu_vs_best_peak": best["mfu_vs_best_peak"],
        "speedup_vs_baseline": best["speedup_vs_baseline"],
        "augmentation_share": best["augmentation_share"],
        "best_row": best["name"],
        "baseline_row": baseline["name"],
        "flops_per_image": round(bench.flops_per_image),
        "peaks": {k: v | {"gflops": round(v["gflops"], 2)} for k, v in bench.peaks.items()},
        "rows": rows,
        "memory": PeakMemory(bench.device).kind,
        "device": machine.get("gpu", machine["cpu"]),
        "machine": machine,
        "config": config_path,
        "overrides": list(overrides),
        "model": describe_model(bench.config, bench.channels),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe_model(config: Config, channels: int) -> str:
    dim, depth, heads = resolve_model_dims(config.model)
    m, size = config.model, config.data.image_size
    if is_resnet_arch(m.arch):
        width = f" width {m.resnet_width}" if m.resnet_width != 64 else ""
        trunk = f"{m.arch}{width}{' small stem' if m.small_stem else ''}"
    else:
        trunk = f"ViT {dim}/{depth}/{heads} patch {m.patch_size}"
    return (
        f"{trunk}, {size}x{size}x{channels}, batch "
        f"{config.train.batch_size}, heads {m.proj_hidden_dim}/{m.pred_hidden_dim}/{m.out_dim}"
    )


# ----------------------------------------------------------------------------- command


def check_precisions(precisions: Sequence[str], device: torch.device) -> list[str]:
    """The requested precisions, deduplicated; fp16 and bf16 only where the device has them."""
    chosen = list(dict.fromkeys(precisions))
    if "fp16" in chosen and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (it trains with a grad scaler)")
    if "bf16" in chosen and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16; use fp32 fp16")
    return chosen


def default_precisions(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


@dataclass(frozen=True)
class BenchSettings:
    """What ``mocov3 bench`` times: the preset and overrides, the device, the precisions
    (None: fp32 and bf16, plus fp16 on CUDA), timed steps per row (None: as many as fit in
    ``seconds``), warm-up steps (None: 1, CUDA 3), the budget of an emulated precision's
    rows, the seconds of each matmul-peak measurement, and the optional extra rows."""

    config: str = DEFAULT_CONFIG
    overrides: tuple[str, ...] = ()
    device: str | None = None
    precisions: tuple[str, ...] | None = None
    steps: int | None = None
    seconds: float = 10.0
    warmup: int | None = None
    max_row_seconds: float = 60.0
    peak_seconds: float = 1.0
    compile: bool = False
    channels_last: bool = False
    skip_slow: bool = False

    def check(self) -> None:
        """Raise ConfigError, in one line naming the option, for a value that cannot work."""
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0")
        for name in ("seconds", "max_row_seconds", "peak_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")


def prepare(settings: BenchSettings, progress: Callable[[str], None]) -> Bench:
    """Config, device, the batch, the FLOP count and the peaks: everything before the rows."""
    config = load_config(settings.config, list(settings.overrides))
    device = resolve_device(settings.device or config.train.device)
    precisions = check_precisions(settings.precisions or default_precisions(device), device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    channels = config.data.channels or default_channels(config.data.name)
    images = random_batch(config, channels)
    warmup = settings.warmup
    if warmup is None:
        warmup = 3 if device.type == "cuda" else 1
    bench = Bench(
        config,
        device,
        channels,
        images,
        images.to(device),
        steps=settings.steps,
        warmup=warmup,
        seconds=settings.seconds,
        max_row_seconds=settings.max_row_seconds,
        precisions=precisions,
    )
    progress("counting FLOPs")
    count_batch = min(config.train.batch_size, FLOP_COUNT_BATCH)
    bench.flops_per_image = step_flops_per_image(config, channels, device, count_batch)
    progress("measuring matmul peaks")
    bench.tf32 = set_tf32(config.train.tf32, device)
    bench.peaks = measure_peaks(precisions, device, bench.tf32, settings.peak_seconds)
    return bench


def random_batch(config: Config, channels: int) -> torch.Tensor:
    """The one uint8 batch every row trains on, of the preset's shape (speed does not depend
    on the pixel values, so no dataset is needed)."""
    size, batch = config.data.image_size, config.train.batch_size
    generator = torch.Generator().manual_seed(config.train.seed)
    shape = (batch, channels, size, size)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def run_bench(
    settings: BenchSettings, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Prepare, time the rows (plus compiled / channels_last ones on request), summarise."""
    settings.check()
    bench = prepare(settings, progress)
    rows = run_rows(variant_specs(bench.precisions), bench, settings.skip_slow, progress)
    compiled = settings.compile or bench.config.train.compile
    channels_last = settings.channels_last or bench.config.train.channels_last
    for spec in extra_specs(rows, compiled, channels_last):
        try:
            rows += run_rows([spec], bench, False, progress)
        except RuntimeError as error:  # torch.compile without a working compiler, say
            progress(f"skipping {spec.name}: {str(error).strip().splitlines()[0][:200]}")
    progress("measuring matmul peaks again")
    again = measure_peaks(bench.precisions, bench.device, bench.tf32, settings.peak_seconds)
    bench.peaks = best_peaks(bench.peaks, again)
    return summary(rows, bench, settings.config, settings.overrides)


def best_peaks(
    first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per precision, the higher of two measurements: other processes on a shared machine
    can only lower a peak, so measuring before and after the rows and keeping the better
    one guards MFU against a busy moment."""
    return {k: max(first[k], second[k], key=lambda peak: peak["gflops"]) for k in first}
