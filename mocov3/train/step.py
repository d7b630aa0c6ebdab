"""One optimisation step of MoCo v3, with the non-finite guard.

Forward of both views under autocast (the momentum encoder's EMA happens inside, before the
keys), the loss of the global batch, backward, the gradient norms the stability monitor
records, and the optimiser step. A non-finite loss or gradient is caught before the
optimiser touches any weight: the step reports it, and is either refused (the trainer stops
the run with one line) or skipped (``train.skip_nonfinite``: gradients dropped, BatchNorm
statistics put back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mocov3.config import Config
from mocov3.models.moco import MoCo
from mocov3.optim.optimizers import build_optimizer
from mocov3.runtime.distributed import is_distributed, mean_over_processes, wrap_ddp
from mocov3.runtime.precision import autocast_context
from mocov3.train.stability import GradientMonitor
from mocov3.train.state import TrainingParts


@dataclass
class StepResult:
    """``loss``: the global batch's loss. ``nonfinite``: why the step was not taken (``"loss
    became nan at step 5 (lr 0.001)"``), else None. ``skipped``: it was skipped rather than
    refused. ``grad_norms``: the per-group gradient norms measured at this step, if any."""

    loss: float
    nonfinite: str | None = None
    skipped: bool = False
    grad_norms: dict[str, float] | None = None


def first_nonfinite_grad(named: list[tuple[str, nn.Parameter]]) -> str | None:
    """``"NAME (nan)"`` for the first parameter whose gradient holds a NaN or inf, else None
    (one device sync: the per-tensor max |g| propagates NaN)."""
    grads = [(name, p.grad) for name, p in named if p.grad is not None]
    if not grads:
        return None
    peaks = torch.stack([g.detach().abs().amax().float() for _, g in grads])
    bad = torch.nonzero(~torch.isfinite(peaks))
    if len(bad) == 0:
        return None
    name, grad = grads[int(bad[0, 0])]
    return f"{name} ({'nan' if bool(torch.isnan(grad).any()) else 'inf'})"


class TrainStep:
    """Takes optimisation steps on ``parts.model`` (called through ``forward_model``, its
    DDP wrapper under torchrun). ``grad_every``: steps between gradient-norm measurements
    (``grad_monitor`` None: never)."""

    def __init__(
        self,
        parts: TrainingParts,
        device: torch.device,
        precision: str,
        forward_model: nn.Module | None = None,
        skip_nonfinite: bool = False,
        grad_monitor: GradientMonitor | None = None,
        grad_every: int = 1,
    ) -> None:
        self.parts = parts
        self.model, self.optimizer, self.scaler = parts.model, parts.optimizer, parts.scaler
        self.device, self.precision = device, precision
        self.forward_model = forward_model or parts.model
        self.skip_nonfinite = skip_nonfinite
        self.grad_monitor, self.grad_every = grad_monitor, grad_every
        # the optimiser's parameters in its order, with their names (for the guard)
        self.named_trainable = [
            (name, p) for name, p in self.model.named_parameters() if p.requires_grad
        ]

    def __call__(
        self, x1: torch.Tensor, x2: torch.Tensor, step: int, lr: float, momentum: float
    ) -> StepResult:
        """Step ``step`` (0-based) on the two views at learning rate ``lr`` and EMA
        momentum ``momentum``. A skipped step keeps the momentum encoder's EMA (done in the
        forward pass, before the loss exists): an average toward unchanged query weights."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        skip = self.skip_nonfinite
        buffers = [b.detach().clone() for b in self.model.buffers()] if skip else None
        with autocast_context(self.device, self.precision):
            loss = self.forward_model(x1, x2, momentum)
        self.optimizer.zero_grad(set_to_none=True)
        bad = None
        global_loss = float(mean_over_processes(loss))
        if not math.isfinite(global_loss):
            bad = f"loss became {global_loss}"
        else:
            # (DDP's gradient all-reduce makes the gradients, and this check, identical
            # on every process)
            self.scaler.scale(loss).backward()
            # with an fp16 scaler, inf gradients are routine: the scaler skips those steps
            name = None if self.scaler.is_enabled() else first_nonfinite_grad(self.named_trainable)
            if name is not None:
                bad = f"gradient of {name} became non-finite (loss {global_loss:.4g})"
        if bad is not None:
            where = f"{bad} at step {step + 1} (lr {lr:.3g})"
            if skip:
                self._undo(buffers or [])
            return StepResult(global_loss, where, skipped=skip)
        norms = self._gradient_norms(step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(global_loss, grad_norms=norms)

    def _undo(self, buffers: list[torch.Tensor]) -> None:
        """Drop the gradients and put the BatchNorm statistics back."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)

    def _gradient_norms(self, step: int) -> dict[str, float] | None:
        """Gradient norms per layer group every ``grad_every`` steps, from the gradients the
        backward pass left (identical on every process after DDP's all-reduce); an fp16
        scaler's scale is divided out."""
        if self.grad_monitor is None or (step + 1) % self.grad_every:
            return None
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        return self.grad_monitor.norms(scale)


def build_train_step(
    config: Config, model: MoCo, device: torch.device, fused: bool | None = None
) -> TrainStep:
    """The step ``config`` describes: AdamW or LARS over the trainable tensors, a grad scaler
    for fp16, the DDP wrapper under torchrun (it averages the gradients over processes, each
    loss being its own batch's mean, and starts from rank 0's weights; SyncBatchNorm1d keeps
    the heads' statistics in step, so buffers need no broadcast), and the gradient monitor.
    ``fused``: AdamW's kernel, as :func:`build_optimizer` (None: its default)."""
    t, s = config.train, config.stability
    forward = wrap_ddp(model, device) if is_distributed() else model
    optimizer = build_optimizer(model, config.optim, device, fused)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    monitor = GradientMonitor(model) if s.grad_norms else None
    parts = TrainingParts(model, optimizer, scaler)
    return TrainStep(parts, device, t.precision, forward, t.skip_nonfinite, monitor, s.grad_every)
