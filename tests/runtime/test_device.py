"""A process's runtime: its device, precision, threads and seeds, and the cross-process
helpers on their single-process path (the multi-process path: tests/train/test_distributed.py)."""

from __future__ import annotations

import random

import pytest
import torch

from mocov3.config import load_config
from mocov3.errors import TrainingError
from mocov3.runtime.device import resolve_device, start_runtime
from mocov3.runtime.distributed import (
    ProcessInfo,
    any_process,
    backend_for,
    main_process_value,
    mean_count,
    mean_over_processes,
)
from mocov3.runtime.precision import eval_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_device_names_are_checked_in_one_line():
    assert resolve_device("cpu") == CPU
    with pytest.raises(TrainingError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no GPU is visible"):
            resolve_device("cuda")


def test_start_runtime_resolves_precision_sets_threads_and_seeds():
    train = load_config("configs/tiny.yaml", ["train.threads=1", "train.device=cpu"]).train
    runtime = start_runtime(train, ProcessInfo())
    assert runtime.device == CPU and runtime.precision in ("bf16", "fp32") and not runtime.tf32
    assert torch.get_num_threads() == 1
    first = (random.random(), torch.rand(1).item())
    start_runtime(train, ProcessInfo())
    assert (random.random(), torch.rand(1).item()) == first  # seeded again: same draws
    fp16 = load_config("configs/tiny.yaml", ["train.precision=fp16", "train.device=cpu"]).train
    with pytest.raises(TrainingError, match="fp16 is CUDA-only"):
        start_runtime(fp16, ProcessInfo())


def test_evaluation_precision_never_picks_fp16_on_a_cpu():
    assert eval_precision("fp16", CPU) in ("bf16", "fp32")
    assert eval_precision("fp32", CPU) == "fp32"


def test_one_process_agrees_with_itself():
    assert mean_over_processes(torch.tensor(2.5)).item() == 2.5
    assert mean_count(7, CPU) == 7 and main_process_value(3.0, CPU) == 3.0
    assert any_process(True, CPU) and not any_process(False, CPU)


def test_a_gpu_process_group_carries_cpu_tensors_too():
    """The evaluations gather CPU features and counts: NCCL alone refuses CPU tensors, so a
    CUDA run's group adds gloo for them (torch's per-device backend string)."""
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
