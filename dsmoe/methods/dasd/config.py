"""DASD's YAML section (``dasd:``) and its stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dsmoe.methods.registry import MethodSettings
from dsmoe.schema import ConfigError, at_least, location, positive, ranged

if TYPE_CHECKING:
    from dsmoe.config import RunConfig


@dataclass
class StageConfig:
    epochs: int = at_least(1, 1)
    lr: float = positive(2.0e-4)


@dataclass
class DASDConfig(MethodSettings):
    """DASD's target-language text path and training stages."""

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
    """The stage being run (set from ``stages`` by ``stages()``)."""
    tokenizer: str = location("bert-base-multilingual-cased", "model")
    """Target-language tokenizer (mBERT) hub id or directory."""
    embeddings: str | None = location("bert-base-multilingual-cased", "model")
    """Model whose word embeddings initialise the trainable table; null: random init of the tokenizer's size."""
    embedding_dim: int = at_least(1, 768)
    """Width of the table when ``embeddings`` is null (mBERT's is read from the model)."""
    adapter_rank: int = at_least(1, 32)
    """Bottleneck of the dynamic adapter; W_z is rank x rank."""
    generator_dim: int = at_least(1, 512)
    """Width of z, the per-caption vector the W_z of every layer is generated from."""
    extractor_blocks: int = at_least(1, 2)
    """Frozen CLIP text blocks the semantics extractors run through (the release: 2)."""
    extractor_mlps: bool = False
    """The paper text's reading of the extractors: a residual bottleneck MLP (``extractor_hidden`` wide) after each
    block and a trainable LayerNorm, one set per feature. False: as the release runs them (no MLP, no trained
    LayerNorm; both features read from one pass)."""
    extractor_hidden: int = at_least(1, 256)
    consistency_weight: float = ranged(0.1, 0)
    adversarial_weight: float = ranged(0.001, 0)
    discriminator_lr: float = positive(1.0e-4)
    fresh_discriminator: bool = False
    """A stage started from another (CMA from CLA, ``train.init_from``) takes over its trained discriminator, as
    the release's CMA loads its CLA checkpoint with the discriminator's weights (its optimiser starts fresh); true
    starts a new one."""
    logit_scale: float = positive(100.0)
    """InfoNCE scale of stage CMA."""

    def validate(self, run: RunConfig) -> None:
        a = run.adapter
        if a.router == "domain_aware":
            raise ConfigError("adapter.router for DASD: language, linear or dense (domain_aware is DM-Adapter's)")
        if not self.stages:
            raise ConfigError("dasd.stages is empty: list cla and/or cma")
        if "english" in self.stages[1:]:
            raise ConfigError("dasd.stages: the English fine-tune comes first")
        if not self.languages or "en" in self.languages:
            raise ConfigError("dasd.languages lists the target languages (at least one, not 'en')")
        if a.router == "language" and a.num_experts != len(self.languages):
            raise ConfigError(f"adapter.router 'language' needs adapter.num_experts = len(dasd.languages) = "
                              f"{len(self.languages)}, got {a.num_experts}")

    def stage_runs(self, run: RunConfig) -> list[RunConfig]:
        """One run per stage, each in ``train.output_dir/<stage>`` with the stage's epochs and learning rate, and
        initialised from the previous stage's weights (the first from ``train.init_from``); the stages after an
        ``english`` one use the CLIP it fine-tuned."""
        runs, previous, clip = [], run.train.init_from, run.model.clip
        for stage in self.stages:
            stage_run = run.copy()
            settings = getattr(self, stage)
            DASDConfig.of(stage_run).stage = stage
            stage_run.train.epochs, stage_run.optim.lr = settings.epochs, settings.lr
            stage_run.train.output_dir = str(Path(run.train.output_dir) / stage)
            stage_run.model.clip = clip
            if stage == "english":  # later stages start from the fine-tuned CLIP, saved in the stage's run dir
                clip = str(Path(stage_run.train.output_dir) / "clip")
                stage_run.train.init_from = None
            else:
                stage_run.train.init_from = previous
                previous = stage_run.train.output_dir
            runs.append(stage_run)
        return runs
