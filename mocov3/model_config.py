"""The ``model`` section of the config: its keys, the paper's model sizes and its checks.

Kept apart from :mod:`mocov3.config` (which re-exports every name here) so that each
module stays one screenful of concerns; nothing here imports the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from mocov3.errors import ConfigError


@dataclass
class ModelConfig:
    """Backbone and heads. ``arch`` fills embed_dim/depth/num_heads unless set explicitly.

    ResNets (``resnet18``/``34``/``50``/``101``, torchvision's) ignore the ViT keys (patch
    size, positions, drop path); their presets set the paper's ResNet heads: 2-layer
    projector, predictor without last BN (``pred_last_bn: false``).
    """

    # vit_tiny | vit_small | vit_base | vit_large | vit_huge | vit_custom
    # | resnet18 | resnet34 | resnet50 | resnet101
    arch: str = "vit_small"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # sincos | learned | none  (paper Table 6: sin-cos best)
    # patch | conv: conv is the reference's conv stem (vit_conv_small/base: four 3x3
    # stride-2 conv-BN-ReLU layers and a 1x1 conv, patch 16 only) and takes one block from
    # a named arch's depth (vit_small: 11), as the reference does to keep the FLOPs even
    stem: str = "patch"
    # layernorm | batchnorm: the norm before each block's MLP; batchnorm is the paper's
    # ViT-BN (about +1 linear point there), and needs moco.concat_views false
    mlp_norm: str = "layernorm"
    freeze_patch_embed: bool = True  # the paper's stability trick (Sec. 5)
    drop_path_rate: float = 0.0
    proj_hidden_dim: int = 4096
    proj_layers: int = 3
    pred_hidden_dim: int = 4096
    pred_layers: int = 2
    out_dim: int = 256
    pred_last_bn: bool = True  # affine-free BN after the predictor (ViT: yes; ResNet: no)
    small_stem: bool = False  # ResNet: 3x3 stride-1 conv1, no max-pool (28-64 px images)
    resnet_width: int = 64  # ResNet: layer1's channels, doubled per stage (torchvision: 64)


VIT_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (embed_dim, depth, num_heads); ViT-S has 12 heads in the paper (DeiT-S has 6)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 12),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


# name: (feature dim, residual blocks); torchvision's ResNets (mocov3/models/resnet.py)
RESNET_SIZES: dict[str, tuple[int, int]] = {
    "resnet18": (512, 8),
    "resnet34": (512, 16),
    "resnet50": (2048, 16),
    "resnet101": (2048, 33),
}


def is_resnet_arch(arch: str) -> bool:
    return arch in RESNET_SIZES


def resolve_model_dims(model: ModelConfig) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) from the arch name, explicit values taking precedence;
    a conv stem takes one block from a named arch's depth (the reference's vit_conv_*).

    A ResNet gives (feature dim, residual blocks, 1): it has no heads, and its shape is fixed
    by the name and ``resnet_width``, so explicit values are refused."""
    if is_resnet_arch(model.arch):
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(model, name) is not None:
                raise ConfigError(f"model.{name} is a ViT key; {model.arch} fixes it: remove it")
        if model.resnet_width < 1:
            raise ConfigError(
                "model.resnet_width must be a positive channel count (torchvision's is 64), "
                f"got {model.resnet_width}"
            )
        dim, blocks = RESNET_SIZES[model.arch]
        return dim * model.resnet_width // 64, blocks, 1
    if model.arch == "vit_custom":
        base = (None, None, None)
    elif model.arch in VIT_SIZES:
        dim, depth, heads = VIT_SIZES[model.arch]
        base = (dim, depth - 1 if model.stem == "conv" else depth, heads)
    else:
        known = ", ".join([*VIT_SIZES, "vit_custom", *RESNET_SIZES])
        raise ConfigError(f"model.arch '{model.arch}' is unknown (choose one of: {known})")
    dims = tuple(
        explicit if explicit is not None else default
        for explicit, default in zip(
            (model.embed_dim, model.depth, model.num_heads), base, strict=True
        )
    )
    for name, value in zip(("embed_dim", "depth", "num_heads"), dims, strict=True):
        if value is None:
            raise ConfigError(f"model.{name} must be set when model.arch is vit_custom")
    return dims  # type: ignore[return-value]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_resnet(m: ModelConfig, concat_views: bool) -> None:
    """What a ResNet backbone cannot honour: each is refused rather than silently ignored."""
    _require(
        not concat_views,
        f"moco.concat_views must be false for {m.arch}: its BatchNorm would mix the two "
        "views' statistics (the paper encodes each view separately)",
    )
    _require(
        not m.freeze_patch_embed,
        f"model.freeze_patch_embed must be false for {m.arch} (it has no patch projection)",
    )
    _require(m.drop_path_rate == 0.0, f"model.drop_path_rate must be 0 for {m.arch}")
    _require(
        m.mlp_norm == "layernorm",
        f"model.mlp_norm is a ViT option ({m.arch} has BatchNorm throughout); remove it",
    )
    _require(m.stem == "patch", f"model.stem is a ViT option ({m.arch} has its own); remove it")


def _validate_vit_stem(m: ModelConfig, concat_views: bool) -> None:
    _require(m.stem in ("patch", "conv"), f"model.stem '{m.stem}' must be patch or conv")
    if m.stem != "conv":
        return
    embed_dim = resolve_model_dims(m)[0]
    _require(
        m.patch_size == 16 and embed_dim % 8 == 0,
        f"model.stem conv needs model.patch_size 16 (got {m.patch_size}) and an embed_dim "
        f"divisible by 8 (got {embed_dim}), as the reference's conv stem",
    )
    _require(
        not m.freeze_patch_embed,
        "model.freeze_patch_embed must be false with model.stem conv: the conv stem is the "
        "other cure for instability and learns (the reference freezes a patch projection only)",
    )
    _require(
        not concat_views,
        "moco.concat_views must be false with model.stem conv: one call on both views would "
        "mix the stem's BatchNorm statistics (the paper encodes each view separately)",
    )


def validate_model(m: ModelConfig, image_size: int, concat_views: bool) -> None:
    """The model keys' checks (``image_size``: data.image_size; ``concat_views``:
    moco.concat_views); raise ConfigError with the key and the fix."""
    embed_dim, depth, heads = resolve_model_dims(m)
    _require(embed_dim > 0 and depth > 0 and heads > 0, "model dims must be positive")
    _require(
        embed_dim % heads == 0,
        f"model.embed_dim {embed_dim} must be divisible by model.num_heads {heads}",
    )
    _require(
        m.pos_embed in ("sincos", "learned", "none"),
        f"model.pos_embed '{m.pos_embed}' must be sincos, learned or none",
    )
    _require(
        m.pos_embed != "sincos" or embed_dim % 4 == 0,
        f"model.embed_dim {embed_dim} must be divisible by 4 for the sin-cos position table",
    )
    _require(m.patch_size > 0, "model.patch_size must be positive")
    _require(
        m.mlp_norm in ("layernorm", "batchnorm"),
        f"model.mlp_norm '{m.mlp_norm}' must be layernorm or batchnorm (the paper's ViT-BN)",
    )
    if is_resnet_arch(m.arch):
        _validate_resnet(m, concat_views)
    else:
        _require(
            image_size > 0 and image_size % m.patch_size == 0,
            f"data.image_size {image_size} must be a positive multiple of model.patch_size "
            f"{m.patch_size} (e.g. patch 4 or 7 for 28 px, 4 for 32 px, 16 for 224 px)",
        )
        _require(not m.small_stem, "model.small_stem is a ResNet option; remove it for a ViT")
        _require(m.resnet_width == 64, "model.resnet_width is a ResNet option; remove it for a ViT")
        _validate_vit_stem(m, concat_views)
        _require(
            m.mlp_norm != "batchnorm" or not concat_views,
            "moco.concat_views must be false with model.mlp_norm batchnorm: one call on both "
            "views would mix their BatchNorm statistics (the paper encodes each view separately)",
        )
    _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate must be in [0, 1)")
    _require(m.proj_layers >= 1 and m.pred_layers >= 0, "model.proj_layers >= 1, pred_layers >= 0")
    _require(min(m.proj_hidden_dim, m.pred_hidden_dim, m.out_dim) > 0, "head widths must be > 0")
