"""The MoCo v3 model (Chen, Xie, He, ICCV 2021, Algorithm 1).

``MoCo.forward`` reads like the paper's pseudocode::

    q1, q2 = f_q(x1), f_q(x2)          # backbone + projector + predictor
    f_k <- m * f_k + (1 - m) * f_q      # EMA of parameters, before the keys
    k1, k2 = f_k(x1), f_k(x2)          # backbone + projector, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mocov3.config import Config, is_resnet_arch, resolve_model_dims
from mocov3.errors import CheckpointError, ConfigError
from mocov3.models.heads import build_mlp
from mocov3.models.loss import contrastive_loss
from mocov3.models.resnet import build_resnet
from mocov3.models.vit import VisionTransformer, set_class_token_only

ENCODERS = ("query", "momentum")  # the backbones a MoCo model holds: f_q's and its EMA f_k's


class MoCo(nn.Module):
    """Query encoder (backbone, projector, predictor) and its momentum copy.

    ``concat_views``: the ViT backbone has no BatchNorm, so running both views through it
    in one call computes exactly the same function with larger matrix products; the heads
    still see each view separately, keeping per-view BN statistics as in the paper.
    Set it False for backbones with BatchNorm (ResNet, ViT-BN), where it would mix statistics.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        temperature: float,
        concat_views: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(projector)
        for parameter in self.momentum_parameters():
            parameter.requires_grad = False
        self.temperature = temperature
        self.concat_views = concat_views

    def momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(query, momentum) parameter pairs averaged by the EMA. Frozen query tensors (the
        random patch projection, the sin-cos table) are constants, so they are left out:
        averaging a tensor with itself would only add rounding drift."""
        pairs = []
        for query_module, momentum_module in (
            (self.backbone, self.momentum_backbone),
            (self.projector, self.momentum_projector),
        ):
            for query, momentum in zip(
                query_module.parameters(), momentum_module.parameters(), strict=True
            ):
                if query.requires_grad:
                    pairs.append((query, momentum))
        return pairs

    def encoder_backbone(self, encoder: str = "query") -> nn.Module:
        """The query backbone (``"query"``) or its momentum copy (``"momentum"``)."""
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be query or momentum, got {encoder!r}")
        return self.backbone if encoder == "query" else self.momentum_backbone

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """f_k <- m * f_k + (1 - m) * f_q over parameters (BN running buffers are not averaged)."""
        pairs = self.momentum_pairs()
        if not pairs:
            return
        query = [q.detach() for q, _ in pairs]
        keys = [k for _, k in pairs]
        torch._foreach_mul_(keys, momentum)
        torch._foreach_add_(keys, query, alpha=1.0 - momentum)

    def _encode(
        self, backbone: nn.Module, heads: list[nn.Module], x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.concat_views:
            features1, features2 = backbone(torch.cat([x1, x2])).chunk(2)
        else:
            features1, features2 = backbone(x1), backbone(x2)
        for head in heads:
            features1, features2 = head(features1), head(features2)
        return features1, features2

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, momentum: float) -> torch.Tensor:
        q1, q2 = self._encode(self.backbone, [self.projector, self.predictor], x1, x2)
        with torch.no_grad():
            self.update_momentum_encoder(momentum)
            k1, k2 = self._encode(self.momentum_backbone, [self.momentum_projector], x1, x2)
        t = self.temperature
        return contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)


def build_backbone(config: Config, in_chans: int) -> nn.Module:
    """The ViT or torchvision ResNet ``config.model.arch`` names, from random init."""
    model = config.model
    if is_resnet_arch(model.arch):
        return build_resnet(
            model.arch, in_chans=in_chans, small_stem=model.small_stem, width=model.resnet_width
        )
    embed_dim, depth, num_heads = resolve_model_dims(model)
    return VisionTransformer(
        img_size=config.data.image_size,
        patch_size=model.patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=model.mlp_ratio,
        pos_embed=model.pos_embed,
        drop_path_rate=model.drop_path_rate,
        mlp_norm=model.mlp_norm,
        stem=model.stem,
    )


def feature_dim(backbone: nn.Module) -> int:
    """Width of ``backbone(x)``: ``embed_dim`` (our ViT and ResNet), else timm's
    ``num_features``."""
    width = getattr(backbone, "embed_dim", None)
    if width is None:
        width = backbone.num_features
    return int(width)


def build_moco(config: Config, in_chans: int) -> MoCo:
    """Backbone from ``config.model``, the paper's heads, and the momentum copy.

    Head shapes come from the config: the ViT defaults (3-layer projector, predictor with
    last BN) or a ResNet preset's (2-layer projector, ``pred_last_bn`` false)."""
    backbone = build_backbone(config, in_chans)
    if config.model.freeze_patch_embed:
        if not hasattr(backbone, "freeze_patch_embed"):
            raise ConfigError(
                "model.freeze_patch_embed is true but this backbone has no patch projection; "
                "set model.freeze_patch_embed=false"
            )
        backbone.freeze_patch_embed()
    m = config.model
    projector = build_mlp(m.proj_layers, feature_dim(backbone), m.proj_hidden_dim, m.out_dim)
    if m.pred_layers > 0:
        predictor = build_mlp(
            m.pred_layers, m.out_dim, m.pred_hidden_dim, m.out_dim, last_bn=m.pred_last_bn
        )
    else:
        predictor = nn.Identity()
    model = MoCo(backbone, projector, predictor, config.moco.temperature, config.moco.concat_views)
    set_class_token_only(model, True)  # only the class token is read (ViT-BN excepted)
    return model


def load_model_state(model: nn.Module, state_dict: dict, source: object) -> None:
    """``load_state_dict(strict=True)`` with a one-line error instead of torch's key dump."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(
            f"checkpoint {source} does not match the model its config describes ({first[:160]})"
        ) from None
