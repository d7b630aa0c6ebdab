"""Weighted kNN against hand computations."""

import math

import torch
import torch.nn.functional as F

from mocov3.eval.knn import knn_accuracy, knn_predict, topk_neighbours, vote
from mocov3.runtime.distributed import shard_range


def test_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.96, 0.28]])  # cos with train rows: 0.96, 0.936, 0.28
    # k=1: nearest is row 0 -> class 0
    # k=3, T=0.1: class 0 weight e^9.6, class 1 weight e^9.36 + e^2.8 -> class 0
    # k=3, T=10: class 0 e^0.096 = 1.10; class 1 e^0.0936 + e^0.028 = 2.13 -> class 1
    assert knn_predict(train, labels, query, [1], 0.1, 2)[1].item() == 0
    assert knn_predict(train, labels, query, [3], 0.1, 2)[3].item() == 0
    assert math.exp(0.096) < math.exp(0.0936) + math.exp(0.028)
    assert knn_predict(train, labels, query, [3], 10.0, 2)[3].item() == 1


def test_ties_go_to_lower_class_and_features_are_normalised():
    train = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # same direction: equal similarity
    labels = torch.tensor([1, 0])
    query = torch.tensor([[5.0, 5.0]])
    assert knn_predict(train, labels, query, [2], 0.07, 2)[2].item() == 0


def test_accuracy_in_percent_for_each_k():
    train = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    test = torch.eye(4) + 0.01
    result = knn_accuracy(train, labels, test, torch.tensor([0, 1, 2, 0]), ks=(1, 200))
    assert result[1] == 75.0
    assert set(result) == {1, 200}


def test_blockwise_top_k_is_the_exact_top_k():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(1000, 16, generator=generator), dim=1)
    labels = torch.randint(10, (1000,), generator=generator)
    queries = F.normalize(torch.randn(37, 16, generator=generator), dim=1)
    full_sim, full_index = (queries @ bank.T).topk(20, dim=1)
    sim, lab = topk_neighbours(bank, labels, queries, 20, query_block=8, bank_block=64)
    torch.testing.assert_close(sim, full_sim)
    assert torch.equal(lab, labels[full_index])
    # an fp16 bank (1 GB for ImageNet at D = 384) finds the same neighbours here
    half_sim, half_lab = topk_neighbours(bank.half(), labels, queries, 20, 8, 64)
    assert (half_sim - full_sim).abs().max() < 2e-3
    assert (half_lab == lab).float().mean() > 0.95


def test_top_k_of_bank_shares_merge_into_the_whole_bank_top_k():
    """What merge_over_processes does with the processes' lists, done by hand for two."""
    generator = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(300, 8, generator=generator), dim=1)
    labels = torch.randint(5, (300,), generator=generator)
    queries = F.normalize(torch.randn(11, 8, generator=generator), dim=1)
    whole = topk_neighbours(bank, labels, queries, 7)
    shares = [
        topk_neighbours(bank[s], labels[s], queries, 7) for s in (slice(0, 150), slice(150, 300))
    ]
    sims = torch.cat([s for s, _ in shares], 1)
    labs = torch.cat([lab for _, lab in shares], 1)
    merged, order = sims.topk(7, dim=1)
    torch.testing.assert_close(merged, whole[0])
    assert torch.equal(labs.gather(1, order), whole[1])


def test_a_bank_smaller_than_k_gives_missing_neighbours_no_weight():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim, lab = topk_neighbours(bank, torch.tensor([3, 4]), torch.tensor([[1.0, 0.0]]), 4)
    assert sim[0, 2:].isinf().all() and lab[0, :2].tolist() == [3, 4]
    assert vote(sim, lab, [4], 0.07, 5)[4].item() == 3


def test_shard_ranges_cover_every_item_once_in_order():
    for count in (0, 1, 5, 10, 11):
        for world in (1, 2, 3, 4):
            ranges = [shard_range(count, rank, world) for rank in range(world)]
            assert [i for r in ranges for i in r] == list(range(count))
