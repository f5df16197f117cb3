"""The optimiser's parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from dsmoe.config import OptimConfig


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def whole_model_trainable(model: nn.Module, ep_size: int) -> int:
    """Trainable parameters of the whole model, from one rank: its dense ones, and its share of the experts times
    the ``ep_size`` ranks that share them (DeepSpeed marks expert parameters ``allreduce = False``)."""
    from deepspeed.moe.utils import is_moe_param

    return sum(p.numel() * (ep_size if is_moe_param(p) else 1) for p in trainable_parameters(model).values())


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Two groups: with weight decay at the base lr, and without it at lr x bias_lr_factor. ``optim.no_decay``
    says which parameters go to the second: those named ``*bias*`` (the releases' rule) or every 1-d one."""
    decay, no_decay = [], []
    for name, p in trainable_parameters(model).items():
        plain = "bias" in name if optim.no_decay == "bias" else p.ndim < 2
        (no_decay if plain else decay).append(p)
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


def lr_schedule(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """The factor of the base learning rate at each optimiser step (for a ``LambdaLR``): a linear warm-up from
    ``optim.warmup_start_factor``, then a cosine to 0 at ``total_steps``. ``optim.schedule_per: step`` moves it every
    step; ``epoch`` holds each epoch at the value of its start, warm-up and cosine counted in epochs, as
    DM-Adapter's release steps its ``LRSchedulerWithWarmup`` once per epoch."""
    start = optim.warmup_start_factor
    if optim.schedule_per == "epoch":
        epochs = total_steps / steps_per_epoch
        warmup = optim.warmup_ratio * epochs if optim.warmup_ratio is not None else optim.warmup_epochs
        return lambda step: lr_factor(step // steps_per_epoch, warmup, epochs, start)
    warmup = warmup_steps(optim, steps_per_epoch, total_steps)
    return lambda step: lr_factor(step, warmup, total_steps, start)
