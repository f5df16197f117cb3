"""The baselines' YAML sections (``lora:`` and ``full:``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsmoe.methods.registry import MethodSettings
from dsmoe.schema import ConfigError, at_least, positive, share

if TYPE_CHECKING:
    from dsmoe.config import RunConfig

# CLIP's linear layers in each encoder block (transformers' names): attention, then the MLP
CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class SDMBaselineConfig(MethodSettings):
    logit_scale: float = positive(50.0)
    """SDM temperature 1 / tau (fixed; IRRA's 0.02)."""
    caption_corruption: float = share(0.0, high_open=True)
    """Share of caption tokens corrupted for the SDM loss, as DM-Adapter's option; 0 (IRRA's SDM sees clean
    captions)."""
    experts = False


@dataclass
class LoRAConfig(SDMBaselineConfig):
    """LoRA (``W x + alpha / rank * B A x``) on CLIP's attention projections in every block of both encoders."""

    rank: int = at_least(1, 16)
    alpha: float = positive(32.0)
    dropout: float = share(0.0, high_open=True)
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Which of CLIP's linear layers get a LoRA branch (of q_proj, k_proj, v_proj, out_proj, fc1, fc2)."""

    def validate(self, run: RunConfig) -> None:
        unknown = [m for m in self.target_modules if m not in CLIP_LINEARS]
        if not self.target_modules or unknown:
            raise ConfigError(f"lora.target_modules={self.target_modules}: name one or more of CLIP's linear layers "
                              f"({', '.join(CLIP_LINEARS)})")


@dataclass
class FullConfig(SDMBaselineConfig):
    """All of CLIP's weights trained (the resized position embedding and the unused logit scale stay fixed)."""
