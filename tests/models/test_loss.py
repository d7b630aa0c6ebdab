"""The contrastive loss against a hand computation, on one process and on two (gloo)."""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocov3.models.loss import contrastive_loss


def hand_loss(q, k_all, tau, offset):
    """-mean_i log softmax(q_i . k_j / tau)[i + offset], times 2 tau, written out in loops."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (kj / kj.norm())) / tau for kj in k_all]
        log_sum = math.log(sum(math.exp(v) for v in logits))
        total += -(logits[i + offset] - log_sum)
    return total / q.shape[0] * 2 * tau


def test_single_process_matches_hand_computation():
    torch.manual_seed(0)
    q, k = torch.randn(4, 5), torch.randn(4, 5)
    got = contrastive_loss(q, k, temperature=0.2)
    assert abs(got.item() - hand_loss(q, k, 0.2, 0)) < 1e-5
    # scaling q or k does not change it (both are L2-normalised)
    assert abs(contrastive_loss(3 * q, 0.5 * k, 0.2).item() - got.item()) < 1e-5


def test_gradient_flows_to_q_only():
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    contrastive_loss(q, k, 1.0).backward()
    assert q.grad is not None and k.grad is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, q_all, k_all, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = slice(rank * 3, rank * 3 + 3)
        results[rank] = contrastive_loss(q_all[local], k_all[local], 0.2).item()
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_keys_and_offset_positives_by_rank():
    torch.manual_seed(1)
    q_all, k_all = torch.randn(6, 5), torch.randn(6, 5)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), q_all, k_all, results), nprocs=2)
    for rank in range(2):
        expected = hand_loss(q_all[rank * 3 : rank * 3 + 3], k_all, 0.2, 3 * rank)
        assert abs(results[rank] - expected) < 1e-5, (rank, results[rank], expected)
