"""The MoCo v3 contrastive (InfoNCE) loss (Chen, Xie, He, ICCV 2021, Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mocov3.runtime.distributed import gather_without_grad, rank_and_world


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """``ctr(q, k)``: cross-entropy of q against the keys of the whole global batch, times 2*tau.

    q, k: ``[N_local, C]``. Both are L2-normalised (in fp32, whatever the autocast dtype);
    k is gathered from every process without gradient when a process group is initialised
    (a single process needs none). Row i's positive is key ``i + N_local * rank``; the other
    keys of the global batch are the negatives (no queue). The 2*tau factor makes the
    gradient scale independent of tau, as in the paper's pseudocode.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float().detach(), dim=1)
    k_all = gather_without_grad(k)
    rank, _ = rank_and_world()
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2.0 * temperature)
