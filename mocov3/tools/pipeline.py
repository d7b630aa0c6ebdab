"""``mocov3 bench --data``: how fast the streamed input pipeline delivers views, next to the
training step, and which of the two bounds training.

The pipeline is the trainer's own (:class:`~mocov3.data.stream.StreamingBatches` over the
dataset's records, full-resolution crops, reduced decoding where the boxes allow): per
worker it is timed in this process on one thread (what one decoding core delivers), in
total at the trainer's default worker count for the device (or ``workers``), copying to
the device as training does. Training runs at about ``min(input, step)`` when the workers
have cores of their own, slower when they share the step's cores (a CPU run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mocov3.config import Config, load_config
from mocov3.data.crops import decode_pending
from mocov3.data.decode import one_thread
from mocov3.data.sampling import StepSampler
from mocov3.data.stream import (
    BatchDecoder,
    StreamIndex,
    StreamingBatches,
    crop_settings,
    default_workers,
    request_for,
)
from mocov3.runtime.device import resolve_device
from mocov3.tools.bench import BenchSettings, run_bench
from mocov3.tools.measure import synchronize

WARMUP_BATCHES = 1


def _timed(run: Callable[[int], int], seconds: float, max_batches: int) -> tuple[float, int]:
    """Images/s of ``run(batch_number) -> images`` over at least ``seconds`` (after one
    warm-up batch), at most ``max_batches`` timed batches; and the images timed."""
    run(0)
    images, batches, start = 0, 0, time.perf_counter()
    while batches < max_batches and (batches == 0 or time.perf_counter() - start < seconds):
        images += run(WARMUP_BATCHES + batches)
        batches += 1
    return images / (time.perf_counter() - start), images


def measure_input(
    config: Config,
    device: torch.device,
    seconds: float = 10.0,
    workers: int | None = None,
    batch: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Input images/s of the streamed dataset ``config.data.name``: per worker (one thread
    in this process) and in total with ``workers`` (None: ``data.workers``, else the
    trainer's default on this device)."""
    d = config.data
    index = StreamIndex.from_spec(
        d.name, "train", d.image_size, d.channels, d.strict, d.subset, config.train.seed
    )
    settings = crop_settings(config, index.channels)
    batch = min(batch or config.train.batch_size, len(index))
    sampler = StepSampler(len(index), batch, config.train.seed)
    max_batches = max(1, sampler.steps_per_epoch - WARMUP_BATCHES)
    progress(f"input: {len(index)} images of {d.name}, batch {batch}, one worker")
    decoder = BatchDecoder(index.records, settings, d.strict)

    def one_worker(step: int) -> int:
        out = decoder[request_for(sampler, step)]
        if out.pending:  # decode=gpu: the device's share of the work, timed here too
            assert out.views is not None
            views = out.views.to(device)
            decode_pending(views, out.pending, settings.size, settings.channels)
            synchronize(device)
        return len(out.indices)

    with one_thread():
        per_worker, _ = _timed(one_worker, seconds / 2, max_batches)
    if workers is None:
        workers = d.workers if d.workers is not None else default_workers(device_type=device.type)
    progress(f"input: {workers} worker(s), copying to {device}")
    with StreamingBatches(index, sampler, device, settings, workers) as source:

        def loader(step: int) -> int:
            views, indices = source(step)
            synchronize(device)
            return len(indices)

        total, _ = _timed(loader, seconds / 2, max_batches)
    return {
        "input_dataset": d.name,
        "input_images": len(index),
        "input_batch": batch,
        "input_workers": workers,
        "input_channels": index.channels,
        "input_decode": d.decode,
        "input_images_per_second_per_worker": per_worker,
        "input_images_per_second": total,
    }


def bound(input_rate: float, step_rate: float) -> dict[str, Any]:
    """Which of the input pipeline and the step bounds training, and by how much."""
    slower = "input" if input_rate < step_rate else "step"
    return {
        "step_images_per_second": step_rate,
        "bound": slower,
        "bound_ratio": max(input_rate, step_rate) / max(min(input_rate, step_rate), 1e-9),
    }


def run_bench_with_input(
    settings: BenchSettings,
    data: str,
    workers: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """``mocov3 bench`` on the preset with ``data.name`` set to ``data``, then the input
    pipeline on that dataset; the result adds the input fields and the bound."""
    settings = replace(settings, overrides=(*settings.overrides, f"data.name={data}"))
    config = load_config(settings.config, list(settings.overrides))
    device = resolve_device(settings.device or config.train.device)
    # the input first: a missing or broken dataset fails before minutes of step timing
    inputs = measure_input(config, device, settings.seconds, workers, progress=progress)
    # the step on the model training on this data builds (a grey dataset: one channel)
    channels = f"data.channels={inputs['input_channels']}"
    result = run_bench(replace(settings, overrides=(*settings.overrides, channels)), progress)
    result.update(inputs)
    result.update(bound(result["input_images_per_second"], result["images_per_second"]))
    return result
