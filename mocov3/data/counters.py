"""Counter-based random numbers: every random decision of the augmentation is a hash of a
per-sample key and a fixed stream id, not a draw from a stateful generator.

Keys come from ``sample_keys(seed, epoch, index)``, so a sample's random numbers depend only
on (seed, epoch, dataset index): the same on 1 or N processes, whatever batch the sample
lands in (world-size invariance), and with no generator state to checkpoint (bit-exact
resume). The hash is splitmix64 (Steele, Lea, Flood 2014), computed on int64 tensors on the
keys' device, the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's Weyl increment (2**64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 math)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x >>> shift`` on int64: torch's ``>>`` is arithmetic, so clear the sign-extended bits."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection on 64-bit words with full avalanche.

    int64 multiplication wraps modulo 2**64 in torch, which is exactly the unsigned product's
    low 64 bits, so the signed tensors carry the unsigned algorithm bit for bit.
    """
    x = (x ^ _shift_right_logical(x, 30)) * _signed64(_MIX1)
    x = (x ^ _shift_right_logical(x, 27)) * _signed64(_MIX2)
    return x ^ _shift_right_logical(x, 31)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """int64 per-sample keys derived from (seed, epoch, dataset index) by an integer hash.

    Every sample's augmentation randomness depends only on these three numbers, so the same
    sample gets the same crops whether trained on 1 or N processes, whatever batch it lands in.
    Each step adds the Weyl constant before mixing because ``_mix64(0) == 0``.
    """
    indices = torch.as_tensor(indices).to(torch.int64)
    head = torch.tensor(_signed64(seed + _GOLDEN), dtype=torch.int64, device=indices.device)
    head = _mix64(head)
    head = _mix64(head + _signed64(epoch + _GOLDEN))
    return _mix64(head + indices + _signed64(_GOLDEN))


def counter_uniform(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """float32 uniforms in [0, 1), one per key: the ``stream``-th splitmix64 output from ``key``.

    splitmix64 seeded with ``key`` emits ``mix(key + n * golden)`` as its n-th number, so stream
    n is a counter into that generator: streams look independent, and the whole batch is hashed
    at once on the keys' device. The top 24 bits give an exact float32 in [0, 1).
    """
    return counter_uniforms(keys, [stream])[:, 0]


def counter_uniforms(keys: torch.Tensor, streams: Sequence[int]) -> torch.Tensor:
    """[B, len(streams)] uniforms; column j equals ``counter_uniform(keys, streams[j])``.

    Hashing all the streams a view needs in one call keeps the per-op overhead of ~10 tiny
    int64 kernels per stream from dominating on CPU.
    """
    keys = keys.to(torch.int64)
    offsets = torch.tensor(
        [_signed64((stream + 1) * _GOLDEN) for stream in streams],
        dtype=torch.int64,
        device=keys.device,
    )
    bits = _shift_right_logical(_mix64(keys.unsqueeze(1) + offsets), 40)
    return bits.to(torch.float32) * (1.0 / (1 << 24))
