"""The optimiser (Adam, or AdamW with weight decay on matrices) and the learning-rate schedules.

The schedule is a pure function of the step (:func:`lr_at`); the trainer sets the rate on every
parameter group before each update, so resuming needs only the step number.

Schedules (``TrainConfig.lr_schedule``), ``step`` counted from 1:

- ``noam`` (the paper, section 5.3): ``lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``;
  the peak, at ``step == warmup``, is ``lr_scale * (d_model * warmup)^-0.5``.
- ``inverse_sqrt`` (fairseq): linear warmup from 0 to ``lr`` over ``warmup`` steps, then ``lr * sqrt(warmup / step)``.
- ``cosine`` (language models): linear warmup to ``lr``, then a half cosine down to ``min_lr`` at ``max_steps``.
- ``constant``: ``lr`` after a linear warmup over ``warmup`` steps (no warmup when ``warmup_steps == 0``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transformer.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, d_model: int) -> float:
    """The learning rate for update number ``step`` (1-based; step 0 is treated as 1).

    Returns:
        the rate as a float.
    """
    step = max(int(step), 1)
    warmup = cfg.warmup_steps
    if cfg.lr_schedule == "noam":
        return cfg.lr_scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if warmup > 0 and step < warmup:
        return cfg.lr * step / warmup
    if cfg.lr_schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / step)
    if cfg.lr_schedule == "cosine":
        span = max(cfg.max_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")  # validate() rejects this earlier


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (``weight_decay == 0``, the paper) or AdamW with decay only on tensors of rank >= 2 (as nanoGPT).

    Biases, LayerNorm weights and other vectors are never decayed. Tied parameters appear once.

    Returns:
        the optimiser; its learning rate is set by the trainer with :func:`set_lr` before every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() already de-duplicates ties
    # The fused kernel updates every tensor in one pass: about 3x faster than the per-tensor loop on CPU,
    # where the optimiser step was 30% of a small model's training step.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    common = dict(lr=0.0, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused or None)
    if cfg.weight_decay > 0:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, **common)
    return torch.optim.Adam(params, weight_decay=0.0, **common)


__all__ = ["lr_at", "set_lr", "build_optimizer"]
