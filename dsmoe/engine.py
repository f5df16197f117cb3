"""DeepSpeed engines, built one way for training (``Trainer``, ``tools/bench_train.py``) and one way for inference
(``python -m dsmoe.evaluate``, ``python -m dsmoe.export``): the method's model, dsmoe's parameter groups and
learning-rate schedule, checkpoints read and written through ``SafeCheckpointEngine``, and the expert layout checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

from dsmoe.checkpoint import safe_io
from dsmoe.checkpoint.folder import resolve_checkpoint
from dsmoe.config import RunConfig
from dsmoe.ds_config import DeviceSupport, resolve_precision
from dsmoe.methods.registry import get_method
from dsmoe.optim import param_groups, trainable_parameters
from dsmoe.checkpoint.folder import is_portable
from dsmoe.portable import load_portable


def device_for(local_rank: int) -> torch.device:
    return torch.device(get_accelerator().device_name(local_rank)) if torch.cuda.is_available() \
        else torch.device("cpu")


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() \
        else torch.float32


def expert_parallel_size(cfg: RunConfig) -> int:
    return cfg.adapter.ep_size if cfg.adapter.router != "dense" else 1


def check_expert_placement(ep_size: int) -> None:
    """Experts were initialised assuming DeepSpeed's consecutive-rank expert-parallel groups."""
    if ep_size <= 1:
        return
    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    assert dist.get_rank(group=group) == dist.get_rank() % ep_size, "unexpected expert-parallel rank layout"


@dataclass
class TrainingEngine:
    engine: deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable_parameters: int  # of this rank's model (its share of the experts)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def dtype(self) -> torch.dtype:
        return engine_dtype(self.engine)


def build_training_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict,
                          schedule: Callable[[int], float], portable_init: str | None = None) -> TrainingEngine:
    """A method's model in a DeepSpeed engine configured by ``ds_config`` (composed, see ``dsmoe.ds_config``),
    with dsmoe's parameter groups and the learning rate of each step ``schedule(step)`` x its group's base lr
    (``dsmoe.optim.lr_schedule``); ``portable_init``: exported adapters loaded before the engine starts (each rank
    takes its experts)."""
    if portable_init:
        load_portable(model, portable_init)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    safe_io.install(engine)
    check_expert_placement(expert_parallel_size(cfg))
    return TrainingEngine(engine, optimizer, scheduler, trainable)


def build_inference_engine(cfg: RunConfig, checkpoint: str | Path, ep_size: int | None = None):
    """(method, engine, source): a model built from ``cfg`` holding the weights of a DeepSpeed checkpoint (run,
    checkpoints or tag directory) or of a portable ``.safetensors`` file, in a DeepSpeed engine without optimiser.

    Any world size works: when it does not fit the saved ep_size (or ``ep_size`` asks), experts are resharded.
    """
    if ep_size is not None:
        cfg.adapter.ep_size = ep_size
    elif cfg.adapter.router != "dense" and dist.get_world_size() % cfg.adapter.ep_size:
        cfg.adapter.ep_size = 1
    method = get_method(cfg)
    model = method.build()
    source = str(checkpoint)
    if is_portable(checkpoint):
        load_portable(model, checkpoint)
    device = DeviceSupport.detect()
    # bf16 inference where training would use it on this GPU; fp32 on CPUs
    precision = "bf16" if device.cuda and device.bf16 and resolve_precision(cfg, device) == "bf16" else "fp32"
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    safe_io.install(engine)
    if not is_portable(checkpoint):
        root, tag = resolve_checkpoint(checkpoint)
        safe_io.load_checkpoint(engine, root, tag, cfg, load_optimizer_states=False,
                                          load_lr_scheduler_states=False, load_module_only=True)
        source = str(root / tag)
    return method, engine, source
