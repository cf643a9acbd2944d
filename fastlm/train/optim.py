"""AdamW (built by the model, which knows which tensors must not decay) and the warmup-then-decay schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fastlm.train.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay; the model splits its parameters into decay / no-decay groups."""
    # fused=None: the model takes the fused kernel when every parameter is on CUDA (the kernel's requirement).
    return model.configure_optimizers(weight_decay=config.weight_decay, lr=config.lr,
                                      betas=(config.beta1, config.beta2), fused=None)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Factor applied to the peak lr before optimizer step `step` (0-based): linear warmup, then decay to
    min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"schedule={schedule!r}: expected 'cosine', 'linear' or 'constant'")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A partial (not a lambda) so that the scheduler's state_dict stays picklable for checkpoints.
    multiplier = functools.partial(
        lr_multiplier, warmup_steps=config.warmup_steps, max_steps=config.max_steps, schedule=config.schedule,
        min_lr_ratio=config.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
