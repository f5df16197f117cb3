"""One builder of DeepSpeed MoE layers for every adapter: the layer, its router, and each expert's own
initialisation.

DeepSpeed deep-copies one expert module, so all experts start identical; ``build_moe`` re-initialises each from a
seed derived from its global index (the same whatever the world size or ep_size). The router is installed before
``deepspeed.initialize`` so it joins the expert-parallel group and the optimiser.
"""
from __future__ import annotations

import os
import zlib
from typing import Callable

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from dsmoe.config import AdapterConfig


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank inside its expert-parallel group.

    DeepSpeed builds expert-parallel groups from consecutive ranks ([0..ep-1], [ep..2ep-1], ...); the
    trainer checks this assumption after ``deepspeed.initialize`` (``check_expert_placement``).
    """
    return int(os.environ.get("RANK", "0")) % ep_size


def expert_seed(seed: int, branch: str, global_expert: int) -> int:
    """Seed of one expert's initialisation: the same whatever the world size or ep_size."""
    return zlib.crc32(f"{seed}/{branch}/{global_expert}".encode())


def init_expert(expert: nn.Module, seed: int, branch: str, global_expert: int) -> None:
    """``expert.reset_parameters`` from the expert's own seed."""
    expert.reset_parameters(torch.Generator().manual_seed(expert_seed(seed, branch, global_expert)))


def build_moe(width: int, expert: nn.Module, adapter: AdapterConfig, make_router: Callable[[], TopKGate],
              branch: str, seed: int) -> MoE:
    """A DeepSpeed MoE layer over ``width`` channels with ``adapter.num_experts`` copies of ``expert`` (each
    re-initialised by its ``reset_parameters(generator)``) and the router ``make_router()``."""
    moe = MoE(width, expert, num_experts=adapter.num_experts, ep_size=adapter.ep_size, k=adapter.top_k,
              drop_tokens=adapter.capacity_factor is not None, use_rts=False, top2_2nd_expert_sampling=False)
    moe.deepspeed_moe.gate = make_router()
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    first = expert_parallel_rank(adapter.ep_size) * len(experts)
    for local, module in enumerate(experts):
        init_expert(module, seed, branch, first + local)
    return moe
