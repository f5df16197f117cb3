"""The run config: the shared sections of a model YAML as typed dataclasses, the method's own section (registered in
``dsmoe.methods``), ``--set`` overrides, and the checks that involve several sections.

The DeepSpeed JSON is composed in ``dsmoe.ds_config``; each method's section (``dm_adapter:``, ``dasd:``) is a
dataclass of its own package. Reading a config imports neither torch nor DeepSpeed.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsmoe.methods import registry
from dsmoe.data.location import RemoteReads
from dsmoe.schema import ConfigError, at_least, from_dict, location, locations, looks_local, positive, ranged, share

DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "dm_adapter" / "demo.yaml"
OPENAI_TOKENIZER = "openai/clip-vit-base-patch16"
"""The tokenizer of every OpenAI CLIP (hub id), for weights files that hold none."""
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_weights_file(value: str) -> bool:
    """Whether ``model.clip`` names a weights file (OpenAI's or open_clip's) rather than a folder or hub id."""
    return value.endswith(WEIGHTS_SUFFIXES)

# Keys that moved to the section of the method that reads them.
MOVED_KEYS = {
    "adapter.image_scale": "dm_adapter.image_scale",
    "adapter.text_scale": "dm_adapter.text_scale",
    "loss.logit_scale": "dm_adapter.logit_scale",
    "loss.lb_weight": "dm_adapter.lb_weight",
    "loss.caption_corruption": "dm_adapter.caption_corruption",
    "dasd.init_from": "train.init_from",
}


@dataclass
class ModelConfig:
    clip: str = location("openai/clip-vit-base-patch16", "model")
    """Hugging Face hub id or local directory of a transformers ``CLIPModel``, or a weights file of OpenAI's CLIP
    (the TorchScript ``ViT-B-16.pt`` the releases load, or a plain state dict) or of open_clip (``.pt``,
    ``.bin``, ``.safetensors``), converted in memory (``dsmoe.backbones.openai_clip``)."""
    tokenizer: str | None = location(None, "model")
    """Tokenizer hub id or directory; defaults to ``clip`` (for a weights file: OpenAI's, by hub id)."""
    image_size: tuple[int, int] = at_least(1, (384, 128))
    """Input (height, width); the position embedding is resized bilinearly to this grid."""
    text_length: int = at_least(2, 77)
    """Tokens per caption (truncated / padded)."""
    pad_id: int | None = at_least(0, 0)
    """Id written after each caption's end-of-text token: 0, as both releases pad CLIP's ids (IRRA's
    ``tokenize``); null: the tokenizer's pad token (CLIP's is its end-of-text token)."""

    def tokenizer_source(self) -> str:
        """Where the caption tokenizer comes from: ``tokenizer``, else the CLIP folder or hub id; OpenAI's weights
        files hold no tokenizer, and OpenAI's CLIP models share one (``OPENAI_TOKENIZER``)."""
        if self.tokenizer:
            return self.tokenizer
        return OPENAI_TOKENIZER if is_weights_file(self.clip) else self.clip


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


@dataclass
class DataConfig:
    shards: str = location("", "path")
    """Directory written by the shard converter (``python -m dsmoe.shards``): {split}-NNNNNN.tar +
    {split}.manifest.json."""
    eval_shards: str | None = location(None, "path")
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
    image_fit: Literal["stretch", "center_crop"] = "stretch"
    """How an image becomes model.image_size: ``stretch``, a bilinear resize to exactly that size (IRRA's and
    DM-Adapter's ``T.Resize((H, W))``); ``center_crop``, CLIP's preprocessing (DASD's): a bicubic resize of the
    side that binds, then the centre."""
    random_erasing: float = share(0.5)
    """Probability of random erasing (scale 0.02-0.4) when ``augment``."""
    max_bad_share: float = share(0.01)
    """A run stops once more than this share of a split's samples proved unusable (unreadable tar, missing member,
    bad JSON, undecodable image); fewer are skipped, counted and reported."""
    max_bad_count: int | None = at_least(0, None)
    """The same limit as a number of samples; when set it replaces ``max_bad_share`` (0: stop at the first)."""
    checksums: bool = True
    """Check every shard read whole from its start against its manifest's sha256 as it streams (its size is
    checked whenever it is opened); a shard that differs is a fault naming it."""
    remote: RemoteReads = field(default_factory=RemoteReads)
    """Retries and deadlines of shards read from a server, an object store or a ``pipe:`` command."""


@dataclass
class OptimConfig:
    lr: float = positive(3e-4)
    betas: tuple[float, float] = share((0.9, 0.999), high_open=True)
    eps: float = positive(1e-8)
    weight_decay: float = ranged(4e-5, 0)
    adamw: bool = False
    """Decoupled weight decay (AdamW) instead of Adam's L2 penalty."""
    bias_lr_factor: float = positive(2.0)
    """The no-decay group (see ``no_decay``) gets lr x this factor."""
    no_decay: Literal["bias", "1d"] = "bias"
    """Parameters trained without weight decay at lr x bias_lr_factor: ``bias``, those whose name contains "bias"
    (the rule of both releases: LayerNorm weights, DM-Adapter's domain prompt and mixing scalar keep the decay);
    ``1d``, every 1-d parameter (biases, norms, prompts, scalars)."""
    bias_correction: bool = True
    """Adam's bias correction of the moments. DASD's release trains with BertAdam, which has none: false selects
    DeepSpeed's fused Adam with ``bias_correction: false`` (compiled on first use) instead of torch's Adam."""
    warmup_epochs: float = ranged(5.0, 0)
    warmup_ratio: float | None = share(None, high_open=True)
    """Warm-up as a share of all steps (DASD: 0.1); when set it replaces ``warmup_epochs``."""
    warmup_start_factor: float = share(0.1)
    schedule_per: Literal["step", "epoch"] = "step"
    """``epoch`` moves the learning rate once per epoch, holding each epoch at the schedule's value at its start
    (warm-up and cosine in epochs): DM-Adapter's release, which steps its scheduler at epoch ends. ``step`` moves it
    every optimiser step."""
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
    """Fills ``bf16.enabled: "auto"`` in the DeepSpeed JSON: auto = bf16 on GPUs that support it (Ampere and
    newer), fp32 elsewhere (CPUs included)."""
    seed: int = 1
    output_dir: str = location("runs/dm_adapter", "path")
    init_from: str | None = location(None, "path")
    """Trainable weights to start from (a ``.safetensors`` file of ``python -m dsmoe.export``, or a run or
    checkpoint directory) at any ep_size and world size; the optimiser starts fresh. ``--init-from`` sets it."""
    eval_every: int = at_least(1, 1)
    """Evaluate on the validation split every N epochs."""
    eval_zero_shot: bool = True
    """Score the untrained model (adapters are the identity at init) on the test split first."""
    checkpoint_every: int = at_least(0, 0)
    """Also checkpoint every N optimiser steps (0: only at epoch ends)."""
    elastic_state: bool = True
    """Also write each checkpoint's optimiser state gathered whole (``optimizer_state/``: the fp32 master weights
    and Adam moments of the trainable tensors), so that a resume at another world size or ep_size keeps it; false
    saves that space (the size of DeepSpeed's own optimiser files) and such a resume restarts the optimiser."""
    keep_checkpoints: int = at_least(1, 2)
    """Step folders kept: the ones ``latest`` and ``best`` name, then the newest others."""
    log_every: int = at_least(1, 10)
    collective_timeout: float = positive(600.0)
    """Seconds a collective may wait for the other ranks before the run fails (a hung rank); a failed rank ends
    the others within seconds whatever this is."""
    lost_rank_timeout: float = positive(30.0)
    """Seconds without a heartbeat from a rank (its node died or dropped off the network) before rank 0 ends the
    run, naming that rank and its node (``dsmoe.failures.FaultWatch``)."""
    threads_per_rank: int | None = at_least(1, None)
    """Intra-op CPU threads of each rank; unset: ``OMP_NUM_THREADS`` if set, else the host's cores shared by the
    ranks on it (``dsmoe.launcher.thread_budget``). DataLoader workers use one thread each."""


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dsmoe"
    mode: Literal["online", "offline"] = "offline"
    name: str | None = None


@dataclass
class TensorBoardConfig:
    enabled: bool = False
    """Also write the run's records as TensorBoard events under ``<train.output_dir>/tensorboard`` (needs the
    ``tensorboard`` package: ``pip install 'dsmoe[tensorboard]'``)."""


def _inside(path: str, folder: str) -> bool:
    resolved, root = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return resolved == root or root in resolved.parents


@dataclass
class RunConfig:
    method: str = "dm_adapter"
    """The method trained (``dsmoe.methods``); its settings are the YAML section of the same name."""
    demo: bool = False
    """Create the synthetic dataset, its shards and a tiny CLIP under ``demo_dir`` when missing."""
    demo_dir: str = location(".cache/dsmoe-demo", "path")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    method_config: Any = field(default=None, metadata={"yaml": False})
    """The method's own settings (its registered dataclass), read from the YAML section named ``method``."""

    def __post_init__(self) -> None:
        if self.method_config is None:  # the method's defaults
            self.method_config = registry.method_spec(self.method).config()

    def validate(self) -> None:
        """Checks that need more than one field (single values are checked against their ``Range`` as they are
        read); world-size checks happen once it is known."""
        a = self.adapter
        self.method_config.validate(self)
        if not self.method_config.experts:
            a.ep_size = 1  # the adapter section does not apply: no experts to shard
        if a.router == "language" and a.top_k != 1:
            raise ConfigError("adapter.router 'language' sends each token to exactly one expert: set adapter.top_k 1")
        if a.router != "dense":
            if not 1 <= a.top_k <= a.num_experts:
                raise ConfigError(f"adapter.top_k={a.top_k} must be between 1 and adapter.num_experts={a.num_experts}")
            if a.num_experts % a.ep_size:
                raise ConfigError(f"adapter.ep_size={a.ep_size} must divide adapter.num_experts={a.num_experts}")
        if self.tensorboard.enabled and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard.enabled needs the tensorboard package: pip install 'dsmoe[tensorboard]'")
        if not self.data.shards and not self.demo:
            raise ConfigError("data.shards is empty: point it at a directory written by python -m dsmoe.shards")
        if self.demo and self.data.shards and not _inside(self.data.shards, self.demo_dir):
            raise ConfigError(
                f"data.shards={self.data.shards} with the demo recipe (demo: true builds synthetic shards under "
                f"demo_dir={self.demo_dir}): to train on your shards pass --config with a recipe (such as "
                f"dsmoe/configs/dm_adapter/cuhk_pedes.yaml), or --set demo=false to keep the demo's settings")

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

    def make_paths_absolute(self) -> None:
        """Local paths (shards, folders, local models) as absolute paths, so that a run's files work from any
        directory; hub ids and URLs stay as they are."""
        for section in (self, *(getattr(self, f.name) for f in dataclasses.fields(self)
                                if dataclasses.is_dataclass(getattr(self, f.name)))):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                kind = f.metadata.get("location")
                if not (kind and isinstance(value, str) and value):
                    continue
                local = looks_local(value) if kind == "model" else "://" not in value and not value.startswith("pipe:")
                if local:
                    setattr(section, f.name, str(Path(value).expanduser().absolute()))

    def check_models(self) -> None:
        """Every local model or tokenizer folder named by the config exists (before any process starts): a
        wrong path otherwise surfaces as a traceback about hub ids that never names the key."""
        for key, kind, value in locations(self) + locations(self.method_config, f"{self.method}."):
            if kind != "model" or not isinstance(value, str) or not looks_local(value):
                continue
            path = Path(value).expanduser()
            if key == "model.clip" and is_weights_file(value):
                if not path.is_file():
                    raise ConfigError(f"{key}={value}: no such file (OpenAI's CLIP weights, such as ViT-B-16.pt)")
            elif not path.is_dir():
                raise ConfigError(f"{key}={value}: no such folder (a local model is a folder written by "
                                  f"save_pretrained, or for model.clip a weights file such as ViT-B-16.pt; a "
                                  f"Hugging Face hub id looks like openai/clip-vit-base-patch16)")

    def stage_runs(self) -> list[RunConfig]:
        """The runs this config asks for, in order (several for a method with stages, such as DASD)."""
        return self.method_config.stage_runs(self)

    def copy(self) -> RunConfig:
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------------------------------------------
# YAML <-> RunConfig


def run_config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a YAML mapping: the shared sections, and the method's section by its registered class."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config: expected a mapping, got {data!r}")
    data = dict(data)
    spec = registry.method_spec(data.get("method", RunConfig.method))
    section = data.pop(spec.name, None)
    others = [name for name in registry.names() if name in data]
    if others:
        raise ConfigError(f"section '{others[0]}' belongs to method {others[0]}; this config's method is "
                          f"{spec.name} (method: {others[0]} to run it)")
    cfg = from_dict(RunConfig, data)
    cfg.method_config = from_dict(spec.config, section if section is not None else {}, spec.name)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    """Plain YAML-safe dict of a run config (tuples become lists; the method's settings under its name)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("yaml", True)}
    plain = json.loads(json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                   for k, v in shared.items()}))
    plain[cfg.method] = json.loads(json.dumps(dataclasses.asdict(cfg.method_config)))
    return plain


def _refuse_moved_keys(data: dict) -> None:
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(f"'{old}' is now '{new}' (the section of the component that reads it): rename it")


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
        _refuse_moved_keys(data)
        cfg = run_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.validate()
    return cfg
