"""LARS (the paper's ResNet optimiser): hand-computed steps, the 1-d exemption, resume."""

import copy

import pytest
import torch
from torch import nn

from mocov3.config import load_config
from mocov3.errors import ConfigError
from mocov3.optim.lars import LARS
from mocov3.optim.optimizers import build_optimizer

LR, WD, ETA, MOMENTUM = 2.0, 0.1, 0.001, 0.9


def _tensors() -> tuple[nn.Parameter, nn.Parameter]:
    weight = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # |W| 5
    bias = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    return weight, bias


def _step(optimizer: LARS, weight: nn.Parameter, bias: nn.Parameter) -> None:
    weight.grad = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)
    bias.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    optimizer.step()


def test_one_and_two_lars_steps_equal_the_hand_computation():
    weight, bias = _tensors()
    optimizer = LARS([weight, bias], lr=LR, weight_decay=WD, momentum=MOMENTUM)
    _step(optimizer, weight, bias)
    # weight: d = g + wd*W = diag(0.6, 0.8), |d| = 1; trust ratio = 0.001 * 5 / 1 = 0.005;
    # mu = 0.005 * d = diag(0.003, 0.004); W -= 2 * mu
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.994, 0.0], [0.0, 3.992]]).double())
    # bias (1-d): neither weight decay nor trust ratio: b -= 2 * g
    torch.testing.assert_close(bias.detach(), torch.tensor([0.0, -3.0]).double())

    _step(optimizer, weight, bias)
    # d2 = g + 0.1 * W1 = diag(0.5994, 0.7992) = 0.999 * (0.6, 0.8); |W1| = 0.998 * 5 = 4.99;
    # ratio = 0.001 * 4.99 / 0.999, so ratio * d2 = diag(0.002994, 0.003992);
    # mu2 = 0.9 * diag(0.003, 0.004) + that = diag(0.005694, 0.007592); W2 = W1 - 2 * mu2
    expected = torch.tensor([[2.994 - 0.011388, 0.0], [0.0, 3.992 - 0.015184]]).double()
    torch.testing.assert_close(weight.detach(), expected)
    # bias: mu2 = 0.9 * 0.5 + 0.5 = 0.95; b2 = b1 - 2 * 0.95
    torch.testing.assert_close(bias.detach(), torch.tensor([-1.9, -4.9]).double())


def test_zero_weight_takes_the_plain_step():
    """A zero-initialised weight (e.g. a residual block's last BN would be 1-d, but a zero
    conv is possible) has no norm to scale by: the trust ratio falls back to 1."""
    weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS([weight], lr=0.5, weight_decay=WD)
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), -0.5))


def test_conv_weights_are_scaled_and_bn_parameters_are_not():
    conv, bn = nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3)
    optimizer = LARS([*conv.parameters(), *bn.parameters()], lr=1.0, weight_decay=0.0)
    for parameter in [*conv.parameters(), *bn.parameters()]:
        parameter.grad = torch.full_like(parameter, 100.0)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    optimizer.step()
    # the 4-d weight moves by 0.001 of its norm, whatever the gradient's size
    ratio = torch.linalg.vector_norm(conv.weight.detach() - weight) / torch.linalg.vector_norm(
        weight
    )
    torch.testing.assert_close(ratio, torch.tensor(1e-3))
    # the conv bias and BN gamma/beta (1, 0 at init) move by the raw gradient
    torch.testing.assert_close(conv.bias.detach(), bias - 100.0)
    torch.testing.assert_close(bn.weight.detach(), torch.full((3,), -99.0))
    torch.testing.assert_close(bn.bias.detach(), torch.full((3,), -100.0))


def _resnet_config(*extra: str):
    return load_config(
        "configs/resnet18_demo.yaml", ["data.name=synthetic", "model.proj_hidden_dim=32", *extra]
    )


def test_build_optimizer_returns_lars_with_the_config_values():
    config = _resnet_config("optim.weight_decay=1.5e-6")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    assert isinstance(optimizer, LARS)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["trust_coefficient"] == 0.001
    assert group["weight_decay"] == 1.5e-6
    vit = load_config("configs/tiny.yaml")
    assert isinstance(build_optimizer(model, vit.optim, torch.device("cpu")), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optim.name 'sgd' must be adamw or lars"):
        _resnet_config("optim.name=sgd")


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    data = torch.randn(16, 4)

    def train(optimizer: LARS, steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            model(data).pow(2).mean().backward()
            optimizer.step()

    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-4)
    train(optimizer, 2)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # a checkpoint's copy
    train(optimizer, 2)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved_model)
    resumed = LARS(model.parameters(), lr=0.0)
    resumed.load_state_dict(saved_optimizer)
    assert resumed.param_groups[0]["lr"] == 0.5  # the group's settings come back too
    train(resumed, 2)
    for key, value in straight.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
