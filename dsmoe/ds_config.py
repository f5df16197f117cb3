"""DeepSpeed JSON configs: the shipped ones, and composing one with a run config (every ``"auto"`` filled from the
YAML, the batch arithmetic and precision checked, configurations DeepSpeed gets wrong refused)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsmoe.schema import ConfigError

if TYPE_CHECKING:
    from dsmoe.config import RunConfig

SHIPPED = Path(__file__).resolve().parent / "ds_configs"
"""The DeepSpeed configs shipped with the package (``ds_configs/`` of a checkout links here)."""
DEFAULT = SHIPPED / "zero2.json"


def resolve_ds_config(path: str | Path) -> Path:
    """``path`` itself when it exists; else a shipped config of that name (``zero2.json``, ``ds_configs/zero2.json``)."""
    path = Path(path)
    if path.is_file() or not (SHIPPED / path.name).is_file():
        return path
    return SHIPPED / path.name


def load_ds_config(path: str | Path) -> dict:
    path = resolve_ds_config(path)
    if not path.is_file():
        shipped = sorted(p.name for p in SHIPPED.glob("*.json"))
        raise ConfigError(f"DeepSpeed config not found: {path} (shipped with dsmoe: {shipped})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


@dataclass(frozen=True)
class DeviceSupport:
    """What the machine offers to precision choices: GPUs, and the half types DeepSpeed's accelerator accepts."""
    cuda: bool
    bf16: bool
    fp16: bool

    @classmethod
    def detect(cls) -> DeviceSupport:
        import torch
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        return cls(cuda=torch.cuda.is_available(), bf16=bool(accelerator.is_bf16_supported()),
                   fp16=bool(accelerator.is_fp16_supported()))


CPU_ONLY = DeviceSupport(cuda=False, bf16=True, fp16=False)  # DeepSpeed's CPU accelerator: bf16 always


def resolve_precision(cfg: RunConfig, device: DeviceSupport) -> str:
    """``auto``: bf16 on GPUs that have it (Ampere and newer), else fp32."""
    if cfg.train.precision == "auto":
        return "bf16" if device.cuda and device.bf16 else "fp32"
    return cfg.train.precision


def compose_ds_config(ds: dict, cfg: RunConfig, world_size: int, device: DeviceSupport) -> dict:
    """Fill every ``"auto"`` in the DeepSpeed JSON from the run config and check the batch arithmetic.

    The optimiser is always described by the YAML (per-group learning rates come from dsmoe); the JSON
    may state its ``type`` and leave the numbers to "auto". A missing optimizer section is added.
    """
    ds = json.loads(json.dumps(ds))  # deep copy
    micro = cfg.micro_batch(world_size)
    precision = resolve_precision(cfg, device)
    fills = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    optimizer = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    if optimizer.get("type", "auto") == "auto":
        optimizer["type"] = "Adam"
    if optimizer["type"].lower() not in ("adam", "adamw"):
        raise ConfigError(f"optimizer.type {optimizer['type']!r}: dsmoe recipes use Adam or AdamW")
    params = optimizer.setdefault("params", {})
    param_fills = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                   "weight_decay": cfg.optim.weight_decay, "adam_w_mode": cfg.optim.adamw,
                   "torch_adam": cfg.optim.bias_correction}
    if not cfg.optim.bias_correction:  # torch's Adam always corrects; DeepSpeed's (fused or CPU) Adam can leave it
        param_fills["bias_correction"] = False
        if params.get("torch_adam") is True:
            raise ConfigError("optim.bias_correction false needs DeepSpeed's own Adam: set the JSON's "
                              "optimizer.params.torch_adam to \"auto\" (or remove it)")
    for key, value in param_fills.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") == "auto":
        ds["fp16"]["enabled"] = False  # fp16 is chosen explicitly in the JSON, never by "auto"
    fp16 = isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") is True
    if fp16 and isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") is True:
        raise ConfigError("the DeepSpeed JSON enables both fp16 and bf16: keep one")
    if not fp16:
        bf16 = ds.setdefault("bf16", {"enabled": "auto"})
        if bf16.get("enabled", "auto") == "auto":
            bf16["enabled"] = precision == "bf16"
    json_precision = "fp16" if fp16 else "bf16" if ds["bf16"]["enabled"] else "fp32"
    if cfg.train.precision != "auto" and cfg.train.precision != json_precision:
        raise ConfigError(f"train.precision is {cfg.train.precision} but the DeepSpeed JSON runs {json_precision}: "
                          f"set train.precision auto, or pick the matching ds_configs file")
    if "scheduler" in ds:
        raise ConfigError("the DeepSpeed JSON has a 'scheduler' section: dsmoe schedules the learning rate from "
                          "the YAML (optim.warmup_epochs, cosine); remove it")
    if json_precision == "fp16" and not device.fp16:
        raise ConfigError("fp16 (with loss scaling) is not supported by DeepSpeed on this device (on a CPU it needs "
                          "oneDNN's fp16 path: AVX512-FP16 or AMX-FP16); use a bf16 or fp32 config here")
    if json_precision == "bf16" and not device.bf16:
        raise ConfigError("bf16 is not supported on this device (GPUs before Ampere): use an fp32 config, or "
                          "ds_configs/zero2_fp16.json with loss scaling")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        raise ConfigError("ZeRO stage 3 does not support DeepSpeed MoE layers: use stage 1 or 2")
    ep = cfg.adapter.ep_size if cfg.adapter.router != "dense" else 1
    if zero.get("stage", 0) == 0 and ep > 1 and ds["gradient_clipping"]:
        raise ConfigError("gradient clipping under ZeRO stage 0 with expert parallelism (ep_size > 1): DeepSpeed "
                          "computes that global norm wrongly (it averages per-rank norms in fp32 and leaves expert "
                          "gradients out in bf16/fp16); use ZeRO stage 1 or 2, or set optim.grad_clip 0")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed JSON values left as \"auto\" that dsmoe cannot fill: {leftover}")
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise ConfigError(
            f"train_batch_size {ds['train_batch_size']} != micro batch {ds['train_micro_batch_size_per_gpu']} x "
            f"accumulation {ds['gradient_accumulation_steps']} x world size {world_size}")
    if ds["train_batch_size"] != cfg.train.batch_size:
        raise ConfigError(f"DeepSpeed train_batch_size {ds['train_batch_size']} disagrees with train.batch_size "
                          f"{cfg.train.batch_size}: write \"auto\" in the JSON")
    return ds


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node
