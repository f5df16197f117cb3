"""DM-Adapter's YAML section (``dm_adapter:``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsmoe.methods.registry import MethodSettings
from dsmoe.schema import ConfigError, positive, ranged, share

if TYPE_CHECKING:
    from dsmoe.config import RunConfig


@dataclass
class DMAdapterConfig(MethodSettings):
    image_scale: float = ranged(0.1, 0)
    """Scale of the adapter branch in the image blocks: ``x + mlp(ln_2 x) + s * SMA(ln_3 x)``."""
    text_scale: float = ranged(4.0, 0)
    """The same in the text blocks."""
    logit_scale: float = positive(50.0)
    """SDM temperature 1 / tau (fixed)."""
    lb_weight: float = ranged(0.5, 0)
    """Weight of the load-balancing loss summed over layers."""
    caption_corruption: float = share(0.15, high_open=True)
    """Share of caption tokens corrupted for the SDM loss (80% mask, 10% random, 10% kept); 0 disables."""

    def validate(self, run: RunConfig) -> None:
        if run.adapter.router == "language":
            raise ConfigError("adapter.router 'language' is DASD's; DM-Adapter uses domain_aware, linear or dense")
