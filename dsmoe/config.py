"""Typed run configuration: model YAML -> dataclasses, ``--set`` overrides, DeepSpeed JSON composition.

Every YAML key maps to a dataclass field; an unknown key or a value of the wrong type raises
``ConfigError`` naming the key (and the closest valid one) before any process group starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "dm_adapter" / "demo.yaml"


class ConfigError(ValueError):
    """A user mistake in the model YAML, an override or the DeepSpeed JSON."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (each element of a tuple field); checked when a config is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


def positive(default: Any) -> Any:
    return ranged(default, 0, low_open=True)


def at_least(low: int, default: Any) -> Any:
    return ranged(default, low)


def share(default: Any, *, high_open: bool = False) -> Any:
    """A value in [0, 1] (or [0, 1))."""
    return ranged(default, 0, 1, high_open=high_open)


@dataclass
class ModelConfig:
    clip: str = "openai/clip-vit-base-patch16"
    """Hugging Face hub id or local directory of a transformers ``CLIPModel``."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; defaults to ``clip``."""
    image_size: tuple[int, int] = at_least(1, (384, 128))
    """Input (height, width); the position embedding is resized bilinearly to this grid."""
    text_length: int = at_least(2, 77)
    """Tokens per caption (truncated / padded)."""


@dataclass
class AdapterConfig:
    router: Literal["domain_aware", "linear", "dense", "language"] = "domain_aware"
    """``domain_aware`` (DM-Adapter), ``linear`` (learned top-k router), ``dense`` (one adapter, no MoE) or
    ``language`` (DASD: one expert per target language, each caption's tokens go to its language's expert)."""
    num_experts: int = at_least(1, 6)
    top_k: int = at_least(1, 2)
    ep_size: int = at_least(1, 1)
    """Expert-parallel size: experts of every layer are sharded over this many ranks."""
    capacity_factor: float | None = positive(None)
    """None routes every token (the paper); a number caps each expert at factor * k * tokens / experts."""
    bottleneck_ratio: int = at_least(1, 8)
    """Expert hidden width is d / bottleneck_ratio."""
    image_scale: float = ranged(0.1, 0)
    text_scale: float = ranged(4.0, 0)


@dataclass
class StageConfig:
    epochs: int = at_least(1, 1)
    lr: float = positive(2.0e-4)


@dataclass
class DASDConfig:
    """DASD's target-language text path (DESIGN.md section 3)."""

    languages: list[str] = field(default_factory=lambda: ["de"])
    """Target languages (keys of the shards' ``captions``); English is the source."""
    stages: list[Literal["english", "cla", "cma"]] = field(default_factory=lambda: ["cla", "cma"])
    """Stages run in order, each in ``train.output_dir/<stage>`` and starting from the previous one's weights:
    ``english`` (optional, first) fine-tunes all of CLIP on the English captions and later stages use that CLIP;
    ``cla`` aligns target captions with English ones (text only); ``cma`` aligns them with images."""
    english: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lr=1.0e-6))
    cla: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lr=2.0e-4))
    cma: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lr=6.0e-6))
    stage: Literal["english", "cla", "cma"] = "cla"
    """The stage being run (set from ``stages`` by the stage runner)."""
    tokenizer: str = "bert-base-multilingual-cased"
    """Target-language tokenizer (mBERT) hub id or directory."""
    embeddings: str | None = "bert-base-multilingual-cased"
    """Model whose word embeddings initialise the trainable table; null: random init of the tokenizer's size."""
    embedding_dim: int = at_least(1, 768)
    """Width of the table when ``embeddings`` is null (mBERT's is read from the model)."""
    adapter_rank: int = at_least(1, 32)
    """Bottleneck of the dynamic adapter; W_z is rank x rank."""
    generator_dim: int = at_least(1, 512)
    """Width of z, the per-caption vector the W_z of every layer is generated from."""
    extractor_hidden: int = at_least(1, 256)
    extractor_blocks: int = at_least(1, 2)
    """Frozen CLIP text blocks the semantics extractors run through, each followed by a bottleneck MLP."""
    consistency_weight: float = ranged(0.1, 0)
    adversarial_weight: float = ranged(0.001, 0)
    discriminator_lr: float = positive(1.0e-4)
    logit_scale: float = positive(100.0)
    """InfoNCE scale of stage CMA."""
    init_from: str | None = None
    """A run or checkpoint whose trainable weights start the first stage (optimiser state fresh)."""


@dataclass
class LossConfig:
    logit_scale: float = positive(50.0)
    """SDM temperature 1 / tau (fixed)."""
    lb_weight: float = ranged(0.5, 0)
    """Weight of the load-balancing loss summed over layers."""
    caption_corruption: float = share(0.15, high_open=True)
    """Share of caption tokens corrupted for the SDM loss (80% mask, 10% random, 10% kept); 0 disables."""


@dataclass
class DataConfig:
    shards: str = ""
    """Directory written by ``tools/make_shards.py`` ({split}-NNNNNN.tar + {split}.manifest.json)."""
    eval_shards: str | None = None
    """Shards the validation and test splits come from when they differ from ``shards`` (DASD zero-shot: train
    on generic pairs, test on Multi30K / COCO); null: ``shards``."""
    train_split: str = "train"
    val_split: str | None = "val"
    """Split used for model selection; null selects the last epoch (ICFG-PEDES has no val split)."""
    test_split: str = "test"
    workers: int = at_least(0, 2)
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = at_least(1, 2000)
    augment: bool = True
    random_erasing: float = share(0.5)
    """Probability of random erasing (scale 0.02-0.4) when ``augment``."""
    max_bad_share: float = share(0.01)
    """A run stops once more than this share of a split's samples proved unusable (unreadable tar, missing member,
    bad JSON, undecodable image); fewer are skipped, counted and reported."""
    max_bad_count: int | None = at_least(0, None)
    """The same limit as a number of samples; when set it replaces ``max_bad_share`` (0: stop at the first)."""


@dataclass
class OptimConfig:
    lr: float = positive(3e-4)
    betas: tuple[float, float] = share((0.9, 0.999), high_open=True)
    eps: float = positive(1e-8)
    weight_decay: float = ranged(4e-5, 0)
    adamw: bool = False
    """Decoupled weight decay (AdamW) instead of Adam's L2 penalty."""
    bias_lr_factor: float = positive(2.0)
    """Biases (and LayerNorm / router scalars) get lr x this factor and no weight decay."""
    warmup_epochs: float = ranged(5.0, 0)
    warmup_ratio: float | None = share(None, high_open=True)
    """Warm-up as a share of all steps (DASD: 0.1); when set it replaces ``warmup_epochs``."""
    warmup_start_factor: float = share(0.1)
    grad_clip: float = ranged(0.0, 0)
    """Global gradient-norm clipping; 0 disables."""


@dataclass
class TrainConfig:
    epochs: int = at_least(1, 60)
    batch_size: int = at_least(1, 128)
    """Global batch (captions) per optimiser step, summed over ranks and accumulation steps."""
    grad_accum: int = at_least(1, 1)
    eval_batch_size: int = at_least(1, 256)
    """Per-rank batch for feature extraction."""
    max_steps: int | None = at_least(1, None)
    """Stop after this many optimiser steps (smoke tests); the schedule still spans ``epochs``."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Fills ``bf16.enabled: "auto"`` in the DeepSpeed JSON: auto = bf16 on GPUs, fp32 on CPU."""
    seed: int = 1
    output_dir: str = "runs/dm_adapter"
    eval_every: int = at_least(1, 1)
    """Evaluate on the validation split every N epochs."""
    eval_zero_shot: bool = True
    """Score the untrained model (adapters are the identity at init) on the test split first."""
    checkpoint_every: int = at_least(0, 0)
    """Also checkpoint every N optimiser steps (0: only at epoch ends)."""
    keep_checkpoints: int = at_least(1, 2)
    log_every: int = at_least(1, 10)
    collective_timeout: float = positive(600.0)
    """Seconds a collective may wait for the other ranks before the run fails (a hung rank); a failed rank ends
    the others within seconds whatever this is."""


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dsmoe"
    mode: Literal["online", "offline"] = "offline"
    name: str | None = None


@dataclass
class RunConfig:
    method: Literal["dm_adapter", "dasd"] = "dm_adapter"
    demo: bool = False
    """Create the synthetic dataset, its shards and a tiny CLIP under ``demo_dir`` when missing."""
    demo_dir: str = ".cache/dsmoe-demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    dasd: DASDConfig = field(default_factory=DASDConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        """Checks that need more than one field (single values are checked against their ``Range`` as they are
        read); world-size checks happen once it is known."""
        a = self.adapter
        if self.method == "dm_adapter" and a.router == "language":
            raise ConfigError("adapter.router 'language' is DASD's; DM-Adapter uses domain_aware, linear or dense")
        if self.method == "dasd":
            if a.router == "domain_aware":
                raise ConfigError("adapter.router for DASD: language, linear or dense (domain_aware is DM-Adapter's)")
            if not self.dasd.stages:
                raise ConfigError("dasd.stages is empty: list cla and/or cma")
            if "english" in self.dasd.stages[1:]:
                raise ConfigError("dasd.stages: the English fine-tune comes first")
            if not self.dasd.languages or "en" in self.dasd.languages:
                raise ConfigError("dasd.languages lists the target languages (at least one, not 'en')")
            if a.router == "language" and a.num_experts != len(self.dasd.languages):
                raise ConfigError(f"adapter.router 'language' needs adapter.num_experts = len(dasd.languages) = "
                                  f"{len(self.dasd.languages)}, got {a.num_experts}")
        if a.router == "language" and a.top_k != 1:
            raise ConfigError("adapter.router 'language' sends each token to exactly one expert: set adapter.top_k 1")
        if a.router != "dense":
            if not 1 <= a.top_k <= a.num_experts:
                raise ConfigError(f"adapter.top_k={a.top_k} must be between 1 and adapter.num_experts={a.num_experts}")
            if a.num_experts % a.ep_size:
                raise ConfigError(f"adapter.ep_size={a.ep_size} must divide adapter.num_experts={a.num_experts}")
        if not self.data.shards and not self.demo:
            raise ConfigError("data.shards is empty: point it at a directory written by tools/make_shards.py")

    def check_world(self, world_size: int) -> None:
        """Checks that depend on how many ranks were launched."""
        ep = self.adapter.ep_size if self.adapter.router != "dense" else 1
        if world_size % ep:
            raise ConfigError(f"adapter.ep_size={ep} does not divide the world size {world_size}: launch a multiple "
                              f"of {ep} processes (deepspeed --num_gpus N) or set adapter.ep_size")
        if self.train.batch_size % (world_size * self.train.grad_accum):
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by world size {world_size} "
                              f"x train.grad_accum {self.train.grad_accum}")

    def micro_batch(self, world_size: int) -> int:
        return self.train.batch_size // (world_size * self.train.grad_accum)


# ---------------------------------------------------------------------------------------------------------------
# YAML -> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and minimally converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
        _check_range(kwargs[key], fields[key].metadata.get("range"), full)
    return cls(**kwargs)


def _check_range(value: Any, allowed: Range | None, key: str) -> None:
    if allowed is None or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if not allowed.contains(v):
            raise ConfigError(f"{key}: {value!r} is out of range: must be {allowed}")


def to_dict(cfg: Any) -> dict:
    """Plain YAML-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a model YAML (the demo recipe when ``path`` is None), apply overrides and validate."""
    path = Path(path) if path else DEFAULT_DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
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
                   "weight_decay": cfg.optim.weight_decay, "adam_w_mode": cfg.optim.adamw, "torch_adam": True}
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


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """The runs a config asks for: itself, or one per DASD stage (own run directory, epochs and learning rate,
    initialised from the previous stage's weights)."""
    if cfg.method != "dasd":
        return [cfg]
    runs, previous, clip = [], cfg.dasd.init_from, cfg.model.clip
    for stage in cfg.dasd.stages:
        run = copy.deepcopy(cfg)
        settings = getattr(cfg.dasd, stage)
        run.dasd.stage, run.train.epochs, run.optim.lr = stage, settings.epochs, settings.lr
        run.train.output_dir = str(Path(cfg.train.output_dir) / stage)
        run.model.clip = clip
        if stage == "english":  # later stages start from the fine-tuned CLIP, saved in the stage's run dir
            clip = str(Path(run.train.output_dir) / "clip")
            run.dasd.init_from = None
        else:
            run.dasd.init_from = previous
            previous = run.train.output_dir
        runs.append(run)
    return runs
