"""Vision Transformer backbone as used by MoCo v3 (Chen, Xie, He, ICCV 2021, Sec. 4).

Faithful to the paper's reference ViT: class token whose final-LayerNorm output is the
feature, LayerNorm eps 1e-6, qkv with bias, MLP ratio 4, a fixed 2-D sin-cos position
embedding (class-token position all zeros), the MoCo v3 initialisation and, optionally, a
frozen random patch projection (the paper's stability trick, Sec. 5.1). ``stem="conv"`` swaps
the patch projection for the reference's convolutional stem (:class:`ConvStem`), the other
cure for instability the paper discusses (Sec. 5.1, after Xiao et al. 2021).

``mlp_norm="batchnorm"`` builds the paper's ViT-BN (BatchNorm instead of LayerNorm in the
MLP blocks, about +1 point of linear accuracy; its ViT-BN-L/7 gives the paper's best
linear probe, 81.0): each block's norm before the MLP standardises every channel over all
tokens of the batch (class token included), with statistics over the global batch under
DDP (:class:`TokenBatchNorm`). Attention keeps its LayerNorm, and so does the final norm
that the feature is read after.

Two speed choices keep the function (to rounding): ``forward``'s last block can compute the
class token alone, the only output read (:func:`set_class_token_only`; MoCo's encoders turn
it on, a standalone ViT runs every token so hooks on its last block see every call), and
each attention layer picks its kernel by dtype and device (:func:`set_attention_kernel`).

Parameter names and shapes equal timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``) so a state dict loads into timm with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mocov3.models.heads import SyncBatchNorm1d, SyncBatchNorm2d

LAYER_NORM_EPS = 1e-6
MLP_NORMS = ("layernorm", "batchnorm")
ATTENTION_KERNELS = ("auto", "sdpa", "explicit")
STEMS = ("patch", "conv")
CONV_STEM_LAYERS = 4  # stride-2 conv layers: 2**4 = patch 16, the only size the reference has


def sincos_position_table(
    grid_size: int, embed_dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """The paper's fixed 2-D sin-cos table, ``[1, 1 + grid_size**2, embed_dim]``.

    ``embed_dim / 4`` frequencies for each of sin/cos along each axis; the class token's
    row is all zeros. Axis order follows the reference implementation (its meshgrid uses
    'ij' indexing), so the table is bit-identical to the one the released weights saw.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for sin-cos positions")
    coords = torch.arange(grid_size, dtype=torch.float32)
    first_axis, second_axis = torch.meshgrid(coords, coords, indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles_a = first_axis.flatten()[:, None] * omega[None, :]
    angles_b = second_axis.flatten()[:, None] * omega[None, :]
    table = torch.cat([angles_a.sin(), angles_a.cos(), angles_b.sin(), angles_b.cos()], dim=1)
    class_row = torch.zeros(1, embed_dim)
    return torch.cat([class_row, table], dim=0)[None]


class DropPath(nn.Module):
    """Stochastic depth per sample (used when fine-tuning; 0 during MoCo pretraining)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution (timm's ``patch_embed``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """The reference's convolutional stem (its ``vits.ConvStem``, after Xiao et al. 2021,
    "Early convolutions help transformers see better"): four 3x3 stride-2 conv-BN-ReLU
    layers whose channels start at ``embed_dim / 8`` and double to ``embed_dim``, then a
    1x1 conv (with bias) to the width: the token grid of patch 16 (each token's receptive
    field overlaps its neighbours'). The first conv reads ``in_chans`` channels (the
    reference's reads 3: RGB only). Parameter names
    equal the reference's (``proj.0`` conv, ``proj.1`` BN, ..., ``proj.12`` the 1x1 conv).
    Its BatchNorms take statistics over the global batch under DDP (:class:`SyncBatchNorm2d`,
    as the reference's SyncBN)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if patch_size != 2**CONV_STEM_LAYERS:
            raise ValueError(
                f"the conv stem has patch size 16 only (as the reference), got {patch_size}"
            )
        if embed_dim % 8 != 0 or img_size % patch_size != 0:
            raise ValueError(
                f"the conv stem needs embed_dim divisible by 8 (got {embed_dim}) and an image "
                f"size that is a multiple of 16 (got {img_size})"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        layers: list[nn.Module] = []
        channels_in, channels_out = in_chans, embed_dim // 8
        for _ in range(CONV_STEM_LAYERS):
            conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False)
            layers += [conv, SyncBatchNorm2d(channels_out), nn.ReLU(inplace=True)]
            channels_in, channels_out = channels_out, channels_out * 2
        layers.append(nn.Conv2d(channels_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def build_stem(
    kind: str, img_size: int, patch_size: int, in_chans: int, embed_dim: int
) -> nn.Module:
    """The module that turns an image into patch tokens: ``patch`` or ``conv`` (STEMS)."""
    if kind == "patch":
        return PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    if kind == "conv":
        return ConvStem(img_size, patch_size, in_chans, embed_dim)
    raise ValueError(f"stem '{kind}' must be one of {', '.join(STEMS)}")


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as three plain ops (the function SDPA computes)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def uses_explicit_attention(kernel: str, q: torch.Tensor) -> bool:
    """``auto``: torch's fused SDPA, except bf16 on a CPU, where its flash kernel's backward
    ran 4x slower than three plain bf16 ops on an AVX-512-BF16 EPYC (65 tokens, head dim
    64; docs/benchmarks.md), while in fp32 SDPA is the faster of the two."""
    if kernel == "auto":
        return q.device.type == "cpu" and q.dtype == torch.bfloat16
    return kernel == "explicit"


class Attention(nn.Module):
    """Multi-head self-attention; ``kernel`` (one of ``ATTENTION_KERNELS``) picks how
    softmax(q k^T) v is computed. Every kernel is the same function, so the choice is a speed
    setting only (see :func:`set_attention_kernel`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(self._attend(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The output at the first token only, ``[B, 1, D]``: its query against every key,
        the other tokens' queries never computed (the last block's class token)."""
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], weight[:dim], bias[:dim]).reshape(batch, 1, heads, head_dim)
        kv = F.linear(x, weight[dim:], bias[dim:]).reshape(batch, tokens, 2, heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q.transpose(1, 2), k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, 1, dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if uses_explicit_attention(self.kernel, q):
            return explicit_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)


def set_attention_kernel(model: nn.Module, kernel: str) -> int:
    """Set every :class:`Attention` in ``model`` to ``kernel``; returns how many were set."""
    if kernel not in ATTENTION_KERNELS:
        choices = ", ".join(ATTENTION_KERNELS)
        raise ValueError(f"attention kernel '{kernel}' must be one of {choices}")
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.kernel = kernel
    return len(layers)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenBatchNorm(SyncBatchNorm1d):
    """BatchNorm over the channels of ``[B, N, D]`` tokens: statistics over all ``B * N``
    tokens of the (global) batch, one mean and variance per channel (ViT-BN's MLP norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def mlp_norm_layer(kind: str, dim: int) -> nn.Module:
    """The norm before a block's MLP: LayerNorm (the ViT) or BatchNorm (ViT-BN)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
    if kind == "batchnorm":
        return TokenBatchNorm(dim)
    raise ValueError(f"mlp_norm '{kind}' must be one of {', '.join(MLP_NORMS)}")


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        mlp_norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = mlp_norm_layer(mlp_norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output at the first token, ``[B, 1, D]``: every other token's
        attention output and MLP are skipped (exact with a per-token norm, LayerNorm)."""
        first = x[:, :1] + self.drop_path(self.attn.forward_first_token(self.norm1(x)))
        return first + self.drop_path(self.mlp(self.norm2(first)))


class VisionTransformer(nn.Module):
    """ViT whose ``forward`` returns the class token after the final LayerNorm, ``[B, D]``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        mlp_norm: str = "layernorm",
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed_type = pos_embed
        self.mlp_norm = mlp_norm
        self.stem = stem
        self.patch_embed = build_stem(stem, img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = self._make_pos_embed(pos_embed)
        # on the CPU even under a meta-device context (a large model counted without memory)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, rate, mlp_norm) for rate in rates]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # off by default: a standalone ViT keeps every block's forward (hooks, adapters on
        # qkv see every call); build_moco turns it on for pretraining's encoders
        self.class_token_only_last_block = False
        self._init_weights()

    def _make_pos_embed(self, kind: str) -> nn.Parameter | None:
        tokens = 1 + self.patch_embed.num_patches
        if kind == "sincos":
            table = sincos_position_table(self.patch_embed.grid_size, self.embed_dim)
            return nn.Parameter(table, requires_grad=False)
        if kind == "learned":
            return nn.Parameter(torch.randn(1, tokens, self.embed_dim) * 0.02)
        if kind == "none":
            return None
        raise ValueError(f"pos_embed '{kind}' must be sincos, learned or none")

    def _init_weights(self) -> None:
        """MoCo v3 init: xavier-uniform Linear (qkv bound as three separate matrices), zero
        biases, class token N(0, 1e-6), patch projection xavier-uniform over its flattened
        fan-in; a conv stem keeps torch's default init, as in the reference."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("attn.qkv"):
                    fan_out = module.weight.shape[0] // 3
                    bound = math.sqrt(6.0 / float(fan_out + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.stem != "patch":
            return
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        bound = math.sqrt(6.0 / float(fan_in + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)

    def freeze_patch_embed(self) -> None:
        """The paper's random patch projection: fixed after init (requires_grad False)."""
        if self.stem != "patch":
            raise ValueError(
                "a conv stem is not frozen (the reference freezes a patch projection only)"
            )
        self.patch_embed.proj.weight.requires_grad = False
        self.patch_embed.proj.bias.requires_grad = False

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens the first block reads: class token and patches, position added."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm, ``[B, 1 + num_patches, D]``."""
        return self.norm(self.blocks(self.embed_tokens(x)))

    def last_blocks_tokens(self, x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The tokens after each of the last ``count`` blocks, each through the final
        LayerNorm (DINO's ``get_intermediate_layers``), oldest first; the last one equals
        :meth:`forward_tokens`."""
        if not 1 <= count <= len(self.blocks):
            raise ValueError(f"the ViT has {len(self.blocks)} blocks, cannot take the last {count}")
        x = self.embed_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - count:
                outputs.append(self.norm(x))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final LayerNorm, ``[B, D]``. With
        ``class_token_only_last_block`` the last block computes only the class token: its
        other outputs are never read, and skipping them saves 7% of a depth-12 ViT's step
        FLOPs with the same function (to rounding); its forward hooks do not run then."""
        if not self.class_token_only_last_block:
            return self.forward_tokens(x)[:, 0]
        x = self.blocks[:-1](self.embed_tokens(x))
        return self.norm(self.blocks[-1].forward_first_token(x))[:, 0]


def set_class_token_only(model: nn.Module, enabled: bool) -> int:
    """Turn the class-token-only last block on or off in every ViT in ``model`` (never on
    for ViT-BN, where it would change the MLP norm's statistics); returns how many ViTs."""
    vits = [module for module in model.modules() if isinstance(module, VisionTransformer)]
    for vit in vits:
        vit.class_token_only_last_block = enabled and vit.mlp_norm == "layernorm"
    return len(vits)
