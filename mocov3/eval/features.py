"""Which features of a frozen backbone a linear probe reads.

The MoCo v3 paper probes the ViT's class token after the final LayerNorm (``cls``, the
default, and the only choice for a ResNet, whose pooled output plays that part). Two other
protocols of the literature read more of the same frozen network, and are offered for
comparison with results reported that way:

- ``cls+avgpool``: the class token concatenated with the mean of the patch tokens, both
  after the final LayerNorm (DINO's linear probe for ViT-B, Caron et al. 2021, Sec. 4.1 and
  its ``eval_linear.py``; ``[B, 2D]``);
- ``last4``: the class tokens of the last four blocks, each through the final LayerNorm,
  concatenated (DINO's linear probe for ViT-S; ``[B, 4D]``);
- ``last4+avgpool``: ``last4`` with the mean of the last block's patch tokens after the
  final LayerNorm appended (DINO's ``eval_linear.py`` with ``n_last_blocks=4`` and
  ``avgpool_patchtokens``, its two options together; ``[B, 5D]``).

The probe stays linear and the backbone frozen either way; only the feature vector grows.
:func:`snapshot` and :func:`unchanged` prove afterwards that the frozen backbone did not
move (the check a sound probe makes).
"""

from __future__ import annotations

import torch
from torch import nn

from mocov3.models.vit import VisionTransformer

FEATURE_KINDS = ("cls", "cls+avgpool", "last4", "last4+avgpool")
LAST_BLOCKS = 4  # DINO's n_last_blocks for ViT-S


def kind_refusal(kind: str, backbone_name: str, vit_depth: int | None) -> str | None:
    """Why features ``kind`` cannot be read from a backbone (``vit_depth``: its blocks, None
    for a non-ViT such as a ResNet), or None when they can. One source for the refusal made
    with a built backbone (:class:`ProbeFeatures`) and from a config alone (``mocov3 study``
    checks every run before the first trains)."""
    if kind not in FEATURE_KINDS:
        return f"features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}"
    if kind != "cls" and vit_depth is None:
        return (
            f"features '{kind}' read ViT tokens; this backbone is a {backbone_name}: "
            "use features 'cls'"
        )
    if kind.startswith("last4") and vit_depth is not None and vit_depth < LAST_BLOCKS:
        return (
            f"features '{kind}' need a ViT of at least {LAST_BLOCKS} blocks, this one has "
            f"{vit_depth}: use 'cls' or 'cls+avgpool'"
        )
    return None


class ProbeFeatures(nn.Module):
    """A frozen backbone whose ``forward`` returns the features ``kind`` names (see the
    module docstring). Holds no parameters of its own: its ``state_dict`` is the backbone's
    under ``backbone.``, so a snapshot of it proves the backbone unchanged."""

    def __init__(self, backbone: nn.Module, kind: str = "cls") -> None:
        super().__init__()
        depth = len(backbone.blocks) if isinstance(backbone, VisionTransformer) else None
        refusal = kind_refusal(kind, type(backbone).__name__, depth)
        if refusal:
            raise ValueError(refusal)
        self.backbone = backbone
        self.kind = kind
        self.train(backbone.training)  # a frozen (eval-mode) backbone stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return self.backbone(x)
        if self.kind == "cls+avgpool":
            tokens = self.backbone.forward_tokens(x)
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
        blocks = self.backbone.last_blocks_tokens(x, LAST_BLOCKS)
        features = [tokens[:, 0] for tokens in blocks]
        if self.kind == "last4+avgpool":
            features.append(blocks[-1][:, 1:].mean(dim=1))
        return torch.cat(features, dim=-1)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to prove later that nothing changed."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """True when every tensor of ``module`` equals its snapshot bit for bit."""
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[name].detach().cpu(), before[name].cpu()) for name in before
    )
