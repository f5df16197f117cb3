"""The adapter branch: LayerNorm -> mixture of bottleneck adapters on a DeepSpeed MoE layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from dsmoe.config import AdapterConfig
from dsmoe.moe.gates import DomainAwareRouter, LinearRouter
from dsmoe.moe.layer import build_moe, init_expert

ROUTERS = {"domain_aware": DomainAwareRouter, "linear": LinearRouter}


class BottleneckExpert(nn.Module):
    """Linear(d, h) -> ReLU -> Linear(h, d) with a zero up-projection, so it starts as a no-op branch."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.up = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdapterBranch(nn.Module):
    """``norm`` then either a DeepSpeed MoE of bottleneck experts or one dense bottleneck adapter.

    ``forward`` returns the branch output; the routing loss and tokens per expert of the last call are
    kept in ``lb_loss`` and ``expert_counts``.
    """

    def __init__(self, dim: int, cfg: AdapterConfig, branch: str, seed: int):
        super().__init__()
        hidden = max(1, dim // cfg.bottleneck_ratio)
        self.norm = nn.LayerNorm(dim)
        self.lb_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        if cfg.router == "dense":
            self.adapter = BottleneckExpert(dim, hidden)
            init_expert(self.adapter, seed, branch, 0)
            self.moe = None
            return
        self.adapter = None
        router = ROUTERS[cfg.router]
        self.moe = build_moe(dim, BottleneckExpert(dim, hidden), cfg,
                             lambda: router(dim, cfg.num_experts, cfg.top_k, cfg.capacity_factor), branch, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.moe is None:
            self.lb_loss, self.expert_counts = x.new_zeros((), dtype=torch.float32), None
            return self.adapter(x)
        out, self.lb_loss, self.expert_counts = self.moe(x)
        return out
