"""Where a process computes: its device, its CPU threads, and the seeds of every RNG."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mocov3.config import TrainConfig
from mocov3.errors import TrainingError
from mocov3.runtime.distributed import (
    ProcessInfo,
    cpu_threads_per_process,
    device_for,
    launched_info,
    process_group,
)
from mocov3.runtime.performance import set_tf32
from mocov3.runtime.precision import check_precision, resolve_precision


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


def set_threads(threads: int | None, device: torch.device, process: ProcessInfo) -> None:
    """``train.threads`` when set; else, for several CPU processes on one node, their share
    of its cores (torchrun sets 1 thread per process, which would leave cores idle)."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and process.local_world_size > 1:
        torch.set_num_threads(cpu_threads_per_process(process))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model init, drop path)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """Where and how a training process computes: its device, the resolved precision, and
    whether TF32 is on."""

    device: torch.device
    precision: str
    tf32: bool


def start_runtime(train: TrainConfig, process: ProcessInfo) -> Runtime:
    """Resolve ``train.device`` and ``train.precision`` for this process (fp16 refused off
    CUDA), set its CPU threads and TF32, and seed every generator with ``train.seed``."""
    device = resolve_device(train.device, process)
    check_precision(train.precision, device)
    precision = resolve_precision(train.precision, device)
    set_threads(train.threads, device, process)
    tf32 = set_tf32(train.tf32, device)
    seed_everything(train.seed)
    return Runtime(device, precision, tf32)


@contextlib.contextmanager
def launched_processes(
    device_name: str, threads: int | None = None, timeout_minutes: float = 30.0
) -> Iterator[tuple[torch.device, ProcessInfo]]:
    """This process's device and place for a command that runs alone or under torchrun
    (the process group started, and destroyed on every way out), its CPU threads set as
    :func:`set_threads` says."""
    launched = launched_info()
    device = resolve_device(device_name, launched)
    with process_group(device, timeout_minutes) as process:
        set_threads(threads, device, process)
        yield device, process
