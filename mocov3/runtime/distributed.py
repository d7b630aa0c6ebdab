"""Distributed data parallel with PyTorch's own engine; a single process needs none of it.

``torchrun --nproc-per-node N -m mocov3 pretrain ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; :func:`process_group` reads them and starts gloo on
CPU or NCCL on CUDA. Without torchrun (or with one process) it starts nothing, and every
helper below takes its single-process path.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_info() -> ProcessInfo:
    """This process's place as torchrun's environment variables give it (1 process without)."""

    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.strip().isdigit() else default

    world = number("WORLD_SIZE", 1)
    return ProcessInfo(
        rank=number("RANK", 0),
        world_size=world,
        local_rank=number("LOCAL_RANK", 0),
        local_world_size=number("LOCAL_WORLD_SIZE", world),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def device_for(name: str, info: ProcessInfo) -> torch.device:
    """``auto``/``cuda`` mean this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return device


def cpu_threads_per_process(info: ProcessInfo) -> int:
    """The cores this process may use, shared evenly among the processes of its node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(info.local_world_size, 1))


def backend_for(device: torch.device) -> str:
    """gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo beside it for CPU ones: the
    evaluations gather features, indices and counts that live on the CPU, which an NCCL-only
    group refuses."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device, timeout_minutes: float = 30.0) -> Iterator[ProcessInfo]:
    """Start the process group when launched with more than one process and destroy it on
    every way out (normal end, error, signal), with :func:`backend_for` the device."""
    info = launched_info()
    if is_distributed():  # started by the caller (e.g. a test); the caller destroys it
        rank, world = rank_and_world()
        yield ProcessInfo(rank, world, info.local_rank, info.local_world_size)
        return
    if info.world_size <= 1:
        yield info
        return
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield info
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def gather_without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (rank order), no gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (a copy; itself when alone)."""
    if not is_distributed():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-process scalar over all processes (itself when alone), as fp32: a
    loss of the global batch, the same on every process, so every process decides alike."""
    total = sum_over_processes(value.detach().float().reshape(1))[0]
    return total / rank_and_world()[1]


def mean_count(count: int, device: torch.device) -> int:
    """The processes' mean of an integer count, rounded down (itself when alone): one
    number every process then uses (e.g. the steps a time budget plans)."""
    if not is_distributed():
        return count
    total = sum_over_processes(torch.tensor([float(count)], device=device))[0]
    return int(total) // dist.get_world_size()


def mean_value(value: float, device: torch.device) -> float:
    """The processes' mean of a float (the float itself, unrounded, when alone)."""
    if not is_distributed():
        return value
    total = sum_over_processes(torch.tensor([value], device=device))[0]
    return float(total) / dist.get_world_size()


def any_process(local: bool, device: torch.device) -> bool:
    """Whether ``local`` holds on any process (itself when alone), so that every process
    takes the same decision (e.g. to stop after a signal one of them received)."""
    if not is_distributed():
        return local
    return bool(sum_over_processes(torch.tensor([float(local)], device=device))[0] > 0)


def main_process_value(value: float, device: torch.device) -> float:
    """The main process's ``value``, on every process."""
    if not is_distributed():
        return value
    mine = torch.tensor([value if is_main_process() else 0.0], device=device)
    return float(sum_over_processes(mine)[0])


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce sum forward; all-reduce sum of the gradient backward (the sum's gradient
    with respect to each process's addend is the sum of every process's upstream gradient)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        total = values.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def differentiable_sum(values: torch.Tensor) -> torch.Tensor:
    """All-reduce sum through which gradients flow: the gradient of every process's loss
    reaches the tensors of the process that produced them (SyncBatchNorm1d)."""
    if not is_distributed():
        return values
    return _SumOverProcesses.apply(values)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without per-forward buffer broadcasts: BN statistics are
    synchronised by SyncBatchNorm1d, so every process's buffers already agree."""
    ddp = torch.nn.parallel.DistributedDataParallel
    options: dict[str, Any] = {"device_ids": [device] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        options["forward_sync_buffers"] = False  # torch >= 2.14; still syncs once at init
    else:
        options["broadcast_buffers"] = False
    return ddp(model, **options)


def shard_range(count: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous block of ``count`` items split over ``world`` processes:
    blocks of ``ceil(count / world)`` in rank order (the last ones shorter, maybe empty), so
    the blocks gathered in rank order are the items in their own order."""
    per = -(-count // max(world, 1))
    return range(min(count, rank * per), min(count, (rank + 1) * per))


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order, the row counts
    free to differ (padded to the largest for the collective, then trimmed); itself when
    alone. The other dimensions and the dtype must agree."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(counts, rows)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
