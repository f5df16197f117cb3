"""The adapter branch: LayerNorm -> mixture of bottleneck adapters on a DeepSpeed MoE layer."""
from __future__ import annotations

import math
import os
import zlib

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from dsmoe.config import AdapterConfig
from dsmoe.moe.gates import DomainAwareRouter, LinearRouter

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


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank inside its expert-parallel group.

    DeepSpeed builds expert-parallel groups from consecutive ranks ([0..ep-1], [ep..2ep-1], ...); the
    engine checks this assumption after ``deepspeed.initialize`` (see ``check_expert_placement``).
    """
    return int(os.environ.get("RANK", "0")) % ep_size


def expert_seed(seed: int, branch: str, global_expert: int) -> int:
    """Seed of one expert's initialisation: the same whatever the world size or ep_size."""
    return zlib.crc32(f"{seed}/{branch}/{global_expert}".encode())


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
            self.adapter.reset_parameters(torch.Generator().manual_seed(expert_seed(seed, branch, 0)))
            self.moe = None
            return
        self.adapter = None
        self.moe = MoE(dim, BottleneckExpert(dim, hidden), num_experts=cfg.num_experts, ep_size=cfg.ep_size,
                       k=cfg.top_k, drop_tokens=cfg.capacity_factor is not None, use_rts=False,
                       top2_2nd_expert_sampling=False)
        # Install the router before deepspeed.initialize, so it joins the expert-parallel group and the optimiser.
        self.moe.deepspeed_moe.gate = ROUTERS[cfg.router](dim, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        # DeepSpeed deep-copies one expert: give each its own initialisation, keyed by its global index.
        experts = self.moe.deepspeed_moe.experts.deepspeed_experts
        first = expert_parallel_rank(cfg.ep_size) * len(experts)
        for local, expert in enumerate(experts):
            expert.reset_parameters(torch.Generator().manual_seed(expert_seed(seed, branch, first + local)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.moe is None:
            self.lb_loss, self.expert_counts = x.new_zeros((), dtype=torch.float32), None
            return self.adapter(x)
        out, self.lb_loss, self.expert_counts = self.moe(x)
        return out
