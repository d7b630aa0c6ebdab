"""Mixed precision: which dtype to compute in, and the autocast context for it.

bf16 halves matmul time on CPUs with native bf16 (AVX-512-BF16 / AMX) and on recent GPUs,
but CPUs without it emulate bf16 and run 20-100x *slower* than fp32 (measured on an AVX2
EPYC: ~5 vs ~110 GFLOP/s). ``auto`` therefore measures instead of guessing.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch

from mocov3.errors import TrainingError


@functools.cache
def cpu_bf16_is_fast(size: int = 256, repeats: int = 3) -> bool:
    """Time one small matmul in fp32 and bf16 on this CPU (~20 ms); True if bf16 wins."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up: kernel selection and allocation
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < 0.9 * timings[torch.float32]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA with bf16 support and on CPUs with fast bf16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_is_fast() else "fp32"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA, fp16 on CUDA only; fp32 means no autocast."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse fp16 off CUDA: CPU fp16 matmuls run about 100x slower than bf16."""
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError(
            "train.precision fp16 is CUDA-only (CPU fp16 matmuls are ~100x slower); use bf16"
        )


def eval_precision(precision: str, device: torch.device) -> str:
    """A checkpoint's training precision made safe for evaluating on ``device``: fp16 only
    on CUDA, and bf16 on a CPU only where it is fast (a GPU-trained checkpoint's bf16 would
    run 20-100x slower on a CPU that emulates it)."""
    if precision == "fp16" and device.type != "cuda":
        precision = "auto"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_is_fast():
        precision = "fp32"
    return resolve_precision(precision, device)
