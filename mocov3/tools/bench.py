"""``mocov3 bench``: how fast the full MoCo v3 pretraining step runs on this machine, next to
the reference implementation's step, and why.

In one process, on one random uint8 batch of the preset's shape (no dataset needed), from
the same initial weights, it times the ladder of :mod:`mocov3.tools.bench_rows`: the
reference's step (mirrored), our step written plainly, the trainer's own step, then one
speed lever per row. Every row is built and warmed first; then the timed steps run in
interleaved rounds (:mod:`mocov3.tools.rounds`), so drift on a shared machine hits every row
alike, and each row reports the median and min-max of its steps. A row is called faster
than another only when the spreads do not overlap.

Each step is the trainer's: augmentation, forward of both encoders, momentum update,
backward and AdamW. FLOPs per image come from ``torch.utils.flop_counter`` over one step;
MFU is achieved FLOP/s over a matmul peak measured in the same run, so the percentages mean
the same thing on any machine. The input (augmentation, or the reference's wait for its
DataLoader) is timed inside each step to give its share.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mocov3.config import Config, is_resnet_arch, load_config, resolve_model_dims
from mocov3.data.datasets import default_channels
from mocov3.errors import ConfigError
from mocov3.models.moco import build_moco
from mocov3.models.vit import set_class_token_only
from mocov3.runtime.device import resolve_device
from mocov3.runtime.performance import set_tf32
from mocov3.tools.bench_rows import Bench, RowSpec, build_step, ladder, row_batches
from mocov3.tools.measure import PeakMemory, count_flops, machine_info, measure_peaks
from mocov3.tools.rounds import Spread, StepFn, Timings, run_rounds, verdict

DEFAULT_CONFIG = "bench_cpu"  # a packaged preset (mocov3.presets)
# The FLOP count runs one real step; a small batch keeps it cheap. Per-image FLOPs are
# independent of the batch except for the B x B logits of the loss (< 0.1% at these sizes).
FLOP_COUNT_BATCH = 8


@dataclass
class BuiltRow:
    """A row ready for the timed rounds: its step, built and warmed, and what that cost."""

    spec: RowSpec
    batch: int
    note: str
    step: StepFn
    warmup_seconds: float
    memory_mib: float | None


# ----------------------------------------------------------------------------- FLOPs and peaks


def step_flops_per_image(
    config: Config,
    channels: int,
    device: torch.device,
    batch: int = FLOP_COUNT_BATCH,
    every_token: bool = False,
) -> float:
    """Forward (query and momentum encoders, both views) plus backward FLOPs of one fp32
    step, per image. The optimiser and the EMA are elementwise and not counted.
    ``every_token``: with the ViT's last block over every token, as the reference runs it."""
    torch.manual_seed(config.train.seed)
    model = build_moco(config, channels).to(device)
    if every_token:
        set_class_token_only(model, False)
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


def build_rows(
    specs: Sequence[RowSpec], bench: Bench, skip_slow: bool, progress: Callable[[str], None]
) -> list[BuiltRow]:
    """Each row built and run for its warm-up steps, one at a time (its peak memory is the
    growth while it builds and warms). A compiled row whose compiler fails is left out with
    a note: torch.compile needs a working C++ compiler on a CPU."""
    planned = row_batches(specs, bench, skip_slow, progress)
    built: list[BuiltRow] = []
    try:
        for index, (spec, batch, note) in enumerate(planned):
            row = build_row(spec, batch, note, bench, f"[row {index + 1}/{len(planned)}]", progress)
            if row is not None:
                built.append(row)
    except BaseException:
        close_rows(built)  # the reference row's DataLoader workers
        raise
    return built


def build_row(
    spec: RowSpec, batch: int, note: str, bench: Bench, place: str, progress: Callable[[str], None]
) -> BuiltRow | None:
    """One row built and warmed, or None for a compiled row whose compiler fails."""
    progress(f"building and warming {spec.name} (batch {batch}) {place}")
    probe = PeakMemory(bench.device)
    start = time.perf_counter()
    try:
        with probe:
            step = build_step(bench, spec, batch)
            for number in range(bench.warmup):
                step(number)
            if hasattr(step, "skipped_steps"):
                step.skipped_steps = 0  # count the timed steps only
    except RuntimeError as error:
        if not spec.compiled:
            raise
        progress(f"skipping {spec.name}: {str(error).strip().splitlines()[0][:200]}")
        return None
    return BuiltRow(spec, batch, note, step, time.perf_counter() - start, probe.mib)


def close_rows(rows: Sequence[BuiltRow]) -> None:
    """Stop what rows hold open (the reference row's DataLoader workers)."""
    for row in rows:
        close = getattr(row.step, "close", None)
        if close is not None:
            close()


def time_rows(
    built: Sequence[BuiltRow], bench: Bench, progress: Callable[[str], None]
) -> list[Timings]:
    """The timed steps of every row, interleaved in rounds; then the rows' input workers are
    stopped."""
    progress(f"timing {len(built)} rows in interleaved rounds (A B C A B C ...)")
    try:
        steps = [row.step for row in built]
        return run_rounds(steps, bench.warmup, bench.steps, bench.seconds, progress)
    finally:
        close_rows(built)


def row_result(row: BuiltRow, timing: Timings, bench: Bench) -> dict[str, Any]:
    """One row's speed (median and range of its steps), memory and efficiency."""
    spec, batch = row.spec, row.batch
    rates = timing.rates(batch)
    steps = Spread.of(timing.step_seconds)
    inputs = Spread.of(timing.input_seconds)
    workers = bench.reference_workers
    augment = f"per-image PIL, {workers} worker(s)" if spec.step == "reference" else "batched"
    return {
        "name": spec.name,
        "step": spec.step,
        "lever": spec.lever,
        "base": spec.base,
        "precision": spec.precision,
        "concat_views": spec.concat,
        "fused_adamw": spec.fused,
        "attention": spec.attention if spec.step != "reference" else "explicit",
        "augment": augment,
        "compiled": spec.compiled,
        "channels_last": spec.channels_last,
        "batch": batch,
        "steps": len(timing.step_seconds),
        "images_per_second": round(rates.median, 2),
        "images_per_second_min": round(rates.low, 2),
        "images_per_second_max": round(rates.high, 2),
        "step_ms": round(1e3 * steps.median, 2),
        "step_ms_min": round(1e3 * steps.low, 2),
        "step_ms_max": round(1e3 * steps.high, 2),
        "step_seconds": [round(seconds, 4) for seconds in timing.step_seconds],
        "augmentation_ms": round(1e3 * inputs.median, 2),
        "augmentation_share": round(sum(timing.input_seconds) / sum(timing.step_seconds), 4),
        "peak_memory_mib": None if row.memory_mib is None else round(row.memory_mib, 1),
        "flops_per_image": round(row_flops(spec, bench)),
        "achieved_gflops": round(rates.median * row_flops(spec, bench) / 1e9, 2),
        "reduced_batch": batch < bench.config.train.batch_size,
        "scaler_skipped_steps": getattr(row.step, "skipped_steps", 0),
        "note": row.note,
        "warmup_seconds": round(row.warmup_seconds, 2),
    }


def row_flops(spec: RowSpec, bench: Bench) -> float:
    """The FLOPs per image the row executes: a row whose ViT runs its last block over every
    token (the reference's, the first rows) does more than the trainer's step."""
    every_token = spec.step == "reference" or not spec.class_token_only
    return bench.flops_every_token if every_token else bench.flops_per_image


def add_efficiency(row: dict[str, Any], bench: Bench) -> None:
    """MFU against the row's own precision peak and against the fastest dtype's peak."""
    achieved = row["achieved_gflops"] * 1e9
    best_peak = max(peak["gflops"] for peak in bench.peaks.values()) * 1e9
    row["mfu"] = round(achieved / peak_for(row["precision"], bench), 4)
    row["mfu_vs_best_peak"] = round(achieved / best_peak, 4)


def rate_spread(row: dict[str, Any]) -> Spread:
    return Spread(
        row["images_per_second"], row["images_per_second_min"], row["images_per_second_max"]
    )


def compare(row: dict[str, Any], other: dict[str, Any]) -> tuple[float, str]:
    """(ratio of median images/s, verdict from the spreads) of ``row`` against ``other``."""
    ratio = row["images_per_second"] / other["images_per_second"]
    steps = min(row["steps"], other["steps"])
    return round(ratio, 3), verdict(rate_spread(row), rate_spread(other), steps)


def round_ratios(row: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """[lowest, highest] over the rounds of ``row``'s images/s over ``other``'s in the same
    round: the two steps of a round ran a few seconds apart, so this ratio sees little of
    the drift that widens each row's own range."""
    ratios = [
        (row["batch"] / mine) / (other["batch"] / theirs)
        for mine, theirs in zip(row["step_seconds"], other["step_seconds"], strict=True)
    ]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each row against the baseline (the first row: the mirrored reference where there is
    one) and against its base row (the gain of the row's own lever), and its rank."""
    baseline, by_name = rows[0], {row["name"]: row for row in rows}
    for index, row in enumerate(rows):
        row["speedup_vs_baseline"], row["vs_baseline"] = compare(row, baseline)
        row["speedup_vs_baseline_by_round"] = round_ratios(row, baseline)
        # a base row left out (an emulated precision, a compiler missing): the row before
        before = by_name.get(row["base"], rows[index - 1] if index else row)
        row["vs_previous_ratio"], row["vs_previous"] = compare(row, before)
    comparable = [row for row in rows if not row["reduced_batch"]]
    ranked = sorted(comparable, key=lambda row: -row["images_per_second"])
    for place, row in enumerate(ranked, start=1):
        row["rank"] = place


def headline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest row among those run at the preset's batch (a reduced row is not comparable)."""
    full = [row for row in rows if not row["reduced_batch"]] or list(rows)
    return max(full, key=lambda row: row["images_per_second"])


def ranking(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``["+ bf16 (faster than the next)", "+ fused AdamW (within noise of the next)", ...]``:
    the full-batch rows by median speed, each with how it stands against the next."""
    ranked = sorted((row for row in rows if "rank" in row), key=lambda row: row["rank"])
    lines = []
    for row, after in zip(ranked, ranked[1:] + [None], strict=True):
        if after is None:
            lines.append(row["name"])
        else:
            words = {"faster": "faster than", "too few steps": "too few steps to rank against"}
            text = words.get(compare(row, after)[1], "within noise of")
            lines.append(f"{row['name']} ({text} the next)")
    return lines


def pair(rows: Sequence[dict[str, Any]], step: str, other: str) -> dict[str, Any] | None:
    """The first row of kind ``step`` against the first of kind ``other`` (equal math)."""
    first = next((row for row in rows if row["step"] == step), None)
    second = next((row for row in rows if row["step"] == other), None)
    if first is None or second is None:
        return None
    ratio, standing = compare(first, second)
    return {"ratio": ratio, "verdict": standing}


# ----------------------------------------------------------------------------- report


def summary(
    rows: list[dict[str, Any]], bench: Bench, config_path: str, overrides: Sequence[str]
) -> dict[str, Any]:
    """The JSON object: headline numbers of the fastest row, then everything measured."""
    for row in rows:
        add_efficiency(row, bench)
    add_comparisons(rows)
    baseline, best = rows[0], headline(rows)
    machine = machine_info(bench.device)
    return {
        "images_per_second": best["images_per_second"],
        "images_per_second_min": best["images_per_second_min"],
        "images_per_second_max": best["images_per_second_max"],
        "mfu": best["mfu"],
        "mfu_vs_best_peak": best["mfu_vs_best_peak"],
        "speedup_vs_baseline": best["speedup_vs_baseline"],
        "vs_baseline": best["vs_baseline"],
        "speedup_vs_baseline_by_round": best["speedup_vs_baseline_by_round"],
        "augmentation_share": best["augmentation_share"],
        "best_row": best["name"],
        "baseline_row": baseline["name"],
        "training_path_vs_straightforward": pair(rows, "training", "straightforward"),
        "ranking": ranking(rows),
        "rounds": min(row["steps"] for row in rows),
        "interleaved": True,
        "flops_per_image": round(bench.flops_per_image),
        "flops_per_image_every_token": round(bench.flops_every_token),
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
        stem = " conv stem" if m.stem == "conv" else ""
        trunk = f"ViT {dim}/{depth}/{heads} patch {m.patch_size}{stem}"
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
    (None: fp32 and bf16, plus fp16 on CUDA), timed rounds (None: at least
    :data:`~mocov3.tools.rounds.MIN_ROUNDS`, and more while the rounds took under
    ``seconds`` per row), warm-up steps per row (None: 1, CUDA 3), the budget of an emulated
    precision's rows, the seconds of each matmul-peak measurement, the optional extra rows,
    and the reference row's DataLoader workers (None: see :func:`reference_workers`)."""

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
    reference_workers: int | None = None

    def check(self) -> None:
        """Raise ConfigError, in one line naming the option, for a value that cannot work."""
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0")
        if self.reference_workers is not None and self.reference_workers < 0:
            raise ConfigError(f"--reference-workers {self.reference_workers} must be >= 0")
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
        reference_workers=reference_workers(settings.reference_workers, device),
    )
    progress("counting FLOPs")
    count_batch = min(config.train.batch_size, FLOP_COUNT_BATCH)
    bench.flops_per_image = step_flops_per_image(config, channels, device, count_batch)
    bench.flops_every_token = step_flops_per_image(config, channels, device, count_batch, True)
    progress("measuring matmul peaks")
    bench.tf32 = set_tf32(config.train.tf32, device)
    bench.peaks = measure_peaks(peak_precisions(bench), device, bench.tf32, settings.peak_seconds)
    return bench


def peak_precisions(bench: Bench) -> list[str]:
    """The precisions whose matmul peak the rows need: the requested ones, and fp16 on CUDA
    for the reference-mirroring row (the reference trains in fp16)."""
    extra = ["fp16"] if bench.device.type == "cuda" else []
    return list(dict.fromkeys([*bench.precisions, *extra]))


def reference_workers(requested: int | None, device: torch.device) -> int:
    """The reference row's DataLoader workers: as requested; else on a GPU half the cores, 1
    to 4 (the reference's 32 per 8-GPU node), and on a CPU none. A CPU's cores run the
    matmuls already, and a worker would prefetch during the next row's step, slowing that
    row and hiding the reference's own input cost; without one, that cost is in its step."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


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
    """Prepare, build and warm the rows, time them interleaved, summarise."""
    settings.check()
    bench = prepare(settings, progress)
    compiled = settings.compile or bench.config.train.compile
    channels_last = settings.channels_last or bench.config.train.channels_last
    specs = ladder(bench, compiled, channels_last)
    built = build_rows(specs, bench, settings.skip_slow, progress)
    timings = time_rows(built, bench, progress)
    rows = [row_result(row, timing, bench) for row, timing in zip(built, timings, strict=True)]
    progress("measuring matmul peaks again")
    again = measure_peaks(peak_precisions(bench), bench.device, bench.tf32, settings.peak_seconds)
    bench.peaks = best_peaks(bench.peaks, again)
    return summary(rows, bench, settings.config, settings.overrides)


def best_peaks(
    first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per precision, the higher of two measurements: other processes on a shared machine
    can only lower a peak, so measuring before and after the rows and keeping the better
    one guards MFU against a busy moment."""
    return {k: max(first[k], second[k], key=lambda peak: peak["gflops"]) for k in first}
