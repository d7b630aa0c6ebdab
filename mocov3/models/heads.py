"""Projector and predictor MLPs of MoCo v3 (Chen, Xie, He, ICCV 2021, Sec. 3 and Appendix).

Every Linear is bias-free; hidden layers are Linear-BN-ReLU; the last layer is Linear
followed, when ``last_bn``, by an affine-free BatchNorm. ViT: projector 3 layers
``D -> 4096 -> 4096 -> 256``, predictor 2 layers ``256 -> 4096 -> 256``, both with the last
BN. (ResNet: projector 2 layers with last BN, predictor 2 layers without.)
"""

from __future__ import annotations

from torch import nn


def build_mlp(
    num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """``num_layers`` bias-free Linear layers, BN+ReLU between, optional affine-free last BN."""
    if num_layers < 1:
        raise ValueError("an MLP head needs at least one layer")
    layers: list[nn.Module] = []
    for index in range(num_layers):
        in_dim = input_dim if index == 0 else hidden_dim
        is_last = index == num_layers - 1
        out_dim = output_dim if is_last else hidden_dim
        layers.append(nn.Linear(in_dim, out_dim, bias=False))
        if not is_last:
            layers += [nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            # affine-free: the paper's heads end in a plain standardisation
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
