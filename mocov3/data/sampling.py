"""Which images each process trains on at each step.

The global batch of step ``s`` is a function of (seed, epoch, position in epoch) only:
``epoch_order(seed, epoch)[i * B : (i + 1) * B]`` for the i-th step of the epoch, with
``B`` the global batch (drop_last, as the reference sampler). Process ``r`` of ``W`` takes the
r-th of W equal contiguous slices of it. So the union over processes is the same global
batch whatever W is, and with augmentation keys derived from (seed, epoch, sample index)
(:func:`mocov3.data.augment.sample_keys`) a run on W processes sees the very same views as a
run on one: the basis of world-size invariance.
"""

from __future__ import annotations

import torch

from mocov3.errors import ConfigError


def epoch_order(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator)


def per_process_batch(global_batch: int, world_size: int) -> int:
    """``global_batch / world_size``; a ConfigError when it does not divide evenly."""
    if global_batch % world_size:
        raise ConfigError(
            f"train.batch_size {global_batch} (the global batch) is not divisible by the "
            f"{world_size} processes: choose a multiple of {world_size}"
        )
    return global_batch // world_size


def shard(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s contiguous slice of one global batch (equal slices)."""
    size = per_process_batch(len(global_indices), world_size)
    return global_indices[rank * size : (rank + 1) * size]


class StepSampler:
    """Global-batch and per-process indices for any step; caches one epoch's order.

    ``steps_per_epoch`` = ``num_images // global_batch`` (the last partial batch is dropped).
    """

    def __init__(
        self, num_images: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_images = num_images
        self.global_batch = global_batch
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = per_process_batch(global_batch, world_size)
        self.steps_per_epoch = num_images // global_batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def epoch_and_position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, position = self.epoch_and_position(step)
        if epoch != self._epoch:
            self._order = epoch_order(self.seed, epoch, self.num_images)
            self._epoch = epoch
        start = position * self.global_batch
        return self._order[start : start + self.global_batch]

    def indices(self, step: int) -> torch.Tensor:
        """This process's sample indices at ``step``."""
        return shard(self.global_indices(step), self.rank, self.world_size)
