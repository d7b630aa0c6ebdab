"""Weighted kNN against hand computations."""

import math

import torch

from mocov3.eval.knn import knn_accuracy, knn_predict


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
