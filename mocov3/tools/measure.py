"""Measurements ``mocov3 bench`` reports beside its step times: peak memory, FLOPs,
matmul peaks and what the machine is.

FLOPs come from ``torch.utils.flop_counter`` (taught the CPU attention kernel); a matmul
peak is the fastest window of square products measured in the same process, so MFU means
the same thing on any machine; CPU memory is the peak growth of the resident set, sampled
by a thread (the CPU allocator keeps no counter).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from mocov3.runtime.performance import set_tf32

RSS_SAMPLE_SECONDS = 0.002


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock intervals hold the work they name."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- memory


def resident_bytes() -> int | None:
    """This process's resident set size from /proc/self/statm (None where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so each row's RSS growth
    starts from what is really in use rather than from the previous row's leftovers."""
    gc.collect()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak memory a block adds to what was in use when it started: the growth of CUDA's
    max_memory_allocated, or on the CPU the peak growth of the RSS, sampled by a thread (the
    allocator has no counter)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = (
            "growth of CUDA max_memory_allocated"
            if device.type == "cuda"
            else f"peak RSS growth (/proc/self/statm every {RSS_SAMPLE_SECONDS * 1e3:g} ms)"
        )
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._start_bytes = 0

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        start = resident_bytes()
        if start is not None:
            self._start_bytes = self.peak_bytes = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._record()

    def _record(self) -> None:
        current = resident_bytes()
        if current is not None and self.peak_bytes is not None:
            self.peak_bytes = max(self.peak_bytes, current)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = peak - self._start_bytes
        elif self.peak_bytes is not None:
            self._stop.set()
            self._thread.join()
            self._record()
            self.peak_bytes -= self._start_bytes

    @property
    def mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20


# ----------------------------------------------------------------------------- FLOPs


def _attention_forward_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any
) -> int:
    """q k^T and (softmax) v: two batched matmuls of 2 M N K FLOPs each."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def _attention_backward_flops(
    grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any
) -> int:
    """Five matmuls, as torch counts its CUDA attention backward: the scores recomputed,
    then the gradients of the scores, of v, of q and of k."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    per_pair = 2 * batch * heads * queries * keys
    return per_pair * (head_dim + value_dim + value_dim + head_dim + head_dim)


def register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
    ``scaled_dot_product_attention`` dispatches to on the CPU, which would count as 0 FLOPs.
    Teach it that kernel with the same conventions, once per process."""
    aten = torch.ops.aten
    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _attention_forward_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward_flops,
    }
    for name, formula in formulas.items():
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's counter sees while ``fn`` runs (a matmul counts 2 M N K)."""
    register_cpu_attention_flops()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- matmul peak

MATMUL_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def matmul_peak(
    precision: str, device: torch.device, largest: int, seconds: float
) -> dict[str, Any]:
    """GFLOP/s of the faster of square ``torch.mm`` and ``F.linear`` in ``precision``.

    Both, because they can take different kernels: on an AVX2 CPU bf16 ``mm`` runs a generic
    loop (~1 GFLOP/s) while ``linear``, what the model's layers call, goes through oneDNN
    (~6 GFLOP/s); the peak is the best the dtype reaches here. Each gets half of
    ``seconds``; the size starts at ``largest`` and halves (down to 256) while one product
    would take more than a tenth of that, so an emulated dtype stays bounded too.
    """
    dtype = MATMUL_DTYPES[precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    best: dict[str, Any] = {"gflops": 0.0}
    for op in ("mm", "linear"):
        rate = _matmul_rate(op, 256, dtype, device, 0.0)  # a first guess to pick the size
        size = largest
        while size > 256 and 2 * size**3 / rate > seconds / 20:
            size //= 2
        gflops = _matmul_rate(op, size, dtype, device, seconds / 2) / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": size, "op": op}
    return best


def _matmul_rate(
    op: str, size: int, dtype: torch.dtype, device: torch.device, seconds: float
) -> float:
    """FLOP/s of one ``size``-cubed product: after a warm-up, the fastest of back-to-back
    windows (1 product on the CPU, 8 queued ones on a GPU) over ``seconds``, at least 3.

    The fastest window, not the mean: a peak is what the hardware can do, and on a shared
    machine other processes only ever slow a window down.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    product = (lambda: torch.mm(a, b)) if op == "mm" else (lambda: F.linear(a, b))
    product()
    synchronize(device)
    per_window = 8 if device.type == "cuda" else 1
    fastest, windows, start = math.inf, 0, time.perf_counter()
    while windows < 3 or time.perf_counter() - start < seconds:
        window_start = time.perf_counter()
        for _ in range(per_window):
            product()
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - window_start)
        windows += 1
    return 2 * size**3 * per_window / fastest


def measure_peaks(
    precisions: Sequence[str], device: torch.device, tf32: bool, seconds: float
) -> dict[str, dict[str, Any]]:
    """The matmul peak of every precision the rows use (fp32 always; tf32 when it is on)."""
    largest = 4096 if device.type == "cuda" else 2048
    wanted = ["fp32", *(["tf32"] if tf32 else []), *(p for p in precisions if p != "fp32")]
    peaks = {p: matmul_peak(p, device, largest, seconds) for p in dict.fromkeys(wanted)}
    set_tf32(tf32, device)  # put the trainer's setting back after the strict fp32 timing
    return peaks


# ----------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, with the vector extensions that decide bf16 speed."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return name
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'})"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
