"""A row of ``mocov3 bench`` that mirrors the reference implementation's training step.

Written here from the reference's published description (Chen, Xie, He, ICCV 2021 and its
code's README), so that the ratio to the reference can be read from our own bench on any
machine, a GPU included, without installing the reference (which runs only under multi-GPU
DDP). What it mirrors, and how it differs from our training path:

* the ViT of the timm version the reference pins: attention as three explicit ops
  (``softmax(q k^T * scale) v``, no fused kernel), each view through the network on its
  own, the projector as the ViT's ``head``;
* ``nn.BatchNorm1d`` in the heads (the reference converts them to SyncBN under DDP);
* the momentum update as a Python loop over parameters that allocates new tensors
  (``p_k = p_k * m + p_q * (1 - m)``), keys L2-normalised, ``einsum`` logits, cross-entropy
  times ``2 tau``;
* ``torch.optim.AdamW`` as torch 1.9 (which the reference pins) ran it, one tensor at a
  time, and gradients zeroed in place;
* per-image torchvision transforms on PIL images in ``DataLoader`` worker processes
  (crop, jitter, grayscale, PIL Gaussian blur and solarize, flip, ``ToTensor``,
  ``Normalize``), then a copy of both views to the device. Like every bench row it starts
  from decoded images of the preset's size (JPEG decoding is ``mocov3 bench --data``'s);
* fp16 autocast with a grad scaler on CUDA (the reference's mixed precision); fp32 on a
  CPU, where the reference has no path and fp16 would be unusable.

The weights are copied from our model at the same seed, so the mirror computes the same
function as our per-view fp32 step (tested) and its FLOPs are the same.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

from mocov3.config import AugmentConfig, Config
from mocov3.models.moco import MoCo
from mocov3.models.vit import LAYER_NORM_EPS, Mlp, VisionTransformer


class ReferenceAttention(nn.Module):
    """Multi-head attention as explicit matmuls and a softmax, as in the pinned timm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = ReferenceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1, exact GELU, fc2: timm's too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceViT(nn.Module):
    """The pinned timm ViT with the projector as its ``head``; ``forward`` returns the
    projection of the class token after the final LayerNorm. Parameter names equal our
    ViT's, so its weights load with ``strict=True``."""

    def __init__(self, ours: VisionTransformer, head: nn.Module) -> None:
        super().__init__()
        dim, heads = ours.embed_dim, ours.num_heads
        mlp_ratio = ours.blocks[0].mlp.fc1.out_features / dim
        self.patch_embed = copy.deepcopy(ours.patch_embed)
        self.cls_token = nn.Parameter(ours.cls_token.detach().clone())
        self.pos_embed = copy.deepcopy(ours.pos_embed)
        self.blocks = nn.Sequential(
            *[ReferenceBlock(dim, heads, mlp_ratio) for _ in range(len(ours.blocks))]
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.blocks.load_state_dict(ours.blocks.state_dict())
        self.norm.load_state_dict(ours.norm.state_dict())
        self.head = copy.deepcopy(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose BatchNorm1d layers are plain ``nn.BatchNorm1d`` (our heads
    use a subclass that also syncs across processes), same weights and buffers."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d) and type(child) is not nn.BatchNorm1d:
            plain = nn.BatchNorm1d(child.num_features, child.eps, child.momentum, child.affine)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            setattr(module, name, plain_batchnorm(child))
    return module


class ReferenceMoCo(nn.Module):
    """The reference's MoCo: base and momentum encoders (ViT with the projector as head), a
    predictor; each view on its own; the EMA as a loop over parameters."""

    def __init__(self, ours: MoCo) -> None:
        super().__init__()
        if not isinstance(ours.backbone, VisionTransformer):
            raise ValueError("the reference-mirroring row is a ViT's; this preset's is not")
        projector = plain_batchnorm(ours.projector)
        self.base_encoder = ReferenceViT(ours.backbone, projector)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for parameter in self.momentum_encoder.parameters():
            parameter.requires_grad = False
        self.predictor = plain_batchnorm(ours.predictor)
        self.temperature = ours.temperature

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        pairs = zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True)
        for query, key in pairs:
            key.data = key.data * m + query.data * (1.0 - m)

    def _contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / self.temperature
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self._contrastive_loss(q1, k2) + self._contrastive_loss(q2, k1)


# ----------------------------------------------------------------------------- input


class PILGaussianBlur:
    """PIL's Gaussian blur with sigma uniform in ``sigma`` (the reference's loader)."""

    def __init__(self, sigma: Sequence[float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = random.uniform(self.sigma[0], self.sigma[1])
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class PILSolarize:
    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image)


def reference_view(
    cfg: AugmentConfig, view: int, size: int, mean: Sequence[float], std: Sequence[float]
) -> transforms.Compose:
    """One view of the BYOL recipe as the reference's per-image PIL transforms."""
    jitter = transforms.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    ops: list = [
        transforms.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio),
        transforms.RandomApply([jitter], p=cfg.jitter_p),
        transforms.RandomGrayscale(p=cfg.grayscale_p),
        transforms.RandomApply([PILGaussianBlur(cfg.blur_sigma)], p=cfg.blur_p[view]),
    ]
    if cfg.solarize_p[view] > 0:
        ops.append(transforms.RandomApply([PILSolarize()], p=cfg.solarize_p[view]))
    ops += [
        transforms.RandomHorizontalFlip(cfg.flip_p),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ]
    return transforms.Compose(ops)


class TwoCropsDataset(Dataset):
    """uint8 ``[N, C, H, W]`` images served as two augmented float views each."""

    def __init__(self, images: torch.Tensor, views: Sequence[transforms.Compose]) -> None:
        pixels = images.permute(0, 2, 3, 1).numpy()
        self.images = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))
        return [view(image) for view in self.views]


# batches one DataLoader iterator serves before it is rebuilt: one iterator keeps the
# workers prefetching the next batch while the current step runs, as in a real epoch
STEPS_PER_ITERATOR = 10_000


class ReferenceInput:
    """Batches of both views from ``workers`` DataLoader processes, endlessly."""

    def __init__(self, config: Config, images: torch.Tensor, normalise: tuple[float, float],
                 workers: int, device: torch.device) -> None:  # fmt: skip
        channels, size = images.shape[1], config.data.image_size
        mean, std = (normalise[0],) * channels, (normalise[1],) * channels
        views = [reference_view(config.augment, view, size, mean, std) for view in (0, 1)]
        dataset = TwoCropsDataset(images, views)
        self.loader = DataLoader(
            dataset,
            batch_size=len(images),
            sampler=RandomSampler(dataset, num_samples=len(images) * STEPS_PER_ITERATOR),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
        )
        self.batches: Iterator[list[torch.Tensor]] | None = None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch's two views on ``device``."""
        try:
            first, second = next(self.batches or self._start())
        except StopIteration:
            first, second = next(self._start())
        return first.to(device, non_blocking=True), second.to(device, non_blocking=True)

    def _start(self) -> Iterator[list[torch.Tensor]]:
        self.batches = iter(self.loader)
        return self.batches

    def close(self) -> None:
        """Stop the worker processes."""
        self.batches = None


class ReferenceStep:
    """One training step as the reference's loop takes it: the next batch from the loader,
    forward under autocast (fp16 on CUDA), ``loss.item()``, ``zero_grad``, backward and
    AdamW through a grad scaler. Called with the step number, it returns (seconds waiting
    for the input, seconds of the whole step)."""

    def __init__(self, ours: MoCo, config: Config, images: torch.Tensor, device: torch.device,
                 lr: float, workers: int, normalise: tuple[float, float]) -> None:  # fmt: skip
        self.device = device
        self.model = ReferenceMoCo(ours).to(device)
        # torch 1.9's AdamW, which the reference pins: one tensor at a time (no foreach)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=config.optim.weight_decay, foreach=False
        )
        self.fp16 = device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.momentum = config.moco.momentum
        self.input = ReferenceInput(config, images, normalise, workers, device)
        self.skipped_steps = 0  # steps whose AdamW the fp16 grad scaler skipped

    def __call__(self, step: int) -> tuple[float, float]:
        start = time.perf_counter()
        x1, x2 = self.input.next(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        loaded = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            loss = self.model(x1, x2, self.momentum)
        loss.item()  # the reference logs every step's loss
        self.optimizer.zero_grad(set_to_none=False)  # torch 1.9's default: zeroed in place
        scale = self.scaler.get_scale() if self.fp16 else None
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if scale is not None and self.scaler.get_scale() < scale:
            self.skipped_steps += 1
        return loaded - start, seconds

    def close(self) -> None:
        self.input.close()
