"""The optimiser's parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

from torch import nn

from dsmoe.config import OptimConfig


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Weights with decay; biases, norms and scalars with lr x bias_lr_factor and no decay."""
    decay, no_decay = [], []
    for p in trainable_parameters(model).values():
        (no_decay if p.ndim < 2 else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": optim.lr * optim.bias_lr_factor},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """Linear warm-up from ``start_factor`` to 1, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> int:
    """``optim.warmup_ratio`` of all steps when set, else ``optim.warmup_epochs`` epochs."""
    if optim.warmup_ratio is not None:
        return round(optim.warmup_ratio * total_steps)
    return round(optim.warmup_epochs * steps_per_epoch)
