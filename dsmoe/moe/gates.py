"""Routers that plug into DeepSpeed's MoE layer in place of its ``TopKGate``.

DeepSpeed's ``MOELayer`` calls ``gate(tokens [S, d], used_token, sparse_routes=True, use_tutel)`` and
expects the sparse-route tuple ``(l_aux, capacity, num_experts, indices [k, S], locations [k, S],
gates [k, S], exp_counts [E])``. Our routers compute their own logits and route every token to its
top-k experts with no gating noise. Without ``adapter.capacity_factor`` (the papers' setting) no token is
dropped: the capacity is the largest per-expert load, agreed across the expert-parallel group so the
all-to-all buffers match on every rank. With a capacity factor, routes beyond an expert's capacity are
dropped (they add nothing to the token's output).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from dsmoe.losses import load_balancing_loss


def dispatch(top_idx: torch.Tensor, gates: torch.Tensor, num_experts: int, ep_group=None,
             capacity_factor: float | None = None):
    """DeepSpeed's sparse-route tuple (without the loss) for chosen experts ``top_idx`` [S, k] and weights ``gates``.

    Slots inside each expert's buffer are assigned route-major (all first choices, then all second choices), as
    DeepSpeed's own top-2 does. With ``capacity_factor`` None no route is dropped; otherwise each expert takes at
    most ``ceil(capacity_factor * k * S / E)`` routes and the rest are flagged with expert index -1 (DeepSpeed
    then adds nothing for them). Returns ``(capacity, E, indices [k, S], locations [k, S], gates [k, S], counts)``.
    """
    num_tokens, k = top_idx.shape
    route_major = top_idx.t()  # [k, S]
    one_hot = F.one_hot(route_major.reshape(-1), num_experts)  # [k*S, E]
    positions = one_hot.cumsum(dim=0) - 1
    locations = positions.gather(1, route_major.reshape(-1, 1)).view(k, num_tokens)
    exp_counts = one_hot.sum(dim=0)
    if capacity_factor is None:
        capacity = exp_counts.max().clamp(min=1)
    else:
        capacity = torch.tensor(max(1, math.ceil(capacity_factor * k * num_tokens / num_experts)), device=top_idx.device)
        route_major = torch.where(locations < capacity, route_major, torch.full_like(route_major, -1))
    if ep_group is not None and dist.is_initialized() and dist.get_world_size(group=ep_group) > 1:
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)  # equal all-to-all buffers on every rank
    return (capacity, num_experts, route_major.to(torch.int32), locations.to(torch.int32), gates.t(),
            exp_counts.detach())


def route_top_k(logits: torch.Tensor, k: int, ep_group=None, capacity_factor: float | None = None):
    """Top-k routing of ``logits`` [S, E], without noise, in DeepSpeed's sparse-route format.

    Returns ``(lb_loss, capacity, E, indices, locations, gates, exp_counts)`` where ``gates`` are the softmax over
    the k selected logits and ``lb_loss`` is DM-Adapter's load-balancing loss (sum_e P_e f_e over the whole top-k).
    """
    probs = F.softmax(logits, dim=-1)
    top_logits, top_idx = logits.topk(k, dim=-1)  # [S, k]
    lb = load_balancing_loss(probs, top_idx, logits.shape[1])
    return (lb, *dispatch(top_idx, F.softmax(top_logits, dim=-1), logits.shape[1], ep_group, capacity_factor))


class _SparseRouter(TopKGate):
    """Shared forward: subclasses only say how logits are computed from the tokens."""

    def __init__(self, dim: int, num_experts: int, k: int, capacity_factor: float | None, route_dim: int | None = None):
        super().__init__(route_dim or dim, num_experts, k=k, noisy_gate_policy=None,
                         drop_tokens=capacity_factor is not None, top2_2nd_expert_sampling=False)
        self.route_capacity_factor = capacity_factor
        self.route_dim = route_dim  # route on the first route_dim channels (tokens may carry side channels)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # noqa: A002 (DeepSpeed's name)
        assert sparse_routes and not use_tutel, "DeepSpeed's MOELayer always asks for sparse routes"
        tokens = input.float() if self.route_dim is None else input[:, :self.route_dim].float()
        return route_top_k(self.logits(tokens), self.k, self.ep_group, self.route_capacity_factor)


class LinearRouter(_SparseRouter):
    """Plain linear router ``x W`` (ablation), top-k without noise."""

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.wg.weight.float())


class DomainAwareRouter(_SparseRouter):
    """DM-Adapter's domain-aware router: ``(1 - a) x W_in + a p W_d``.

    ``a`` is a learnable scalar (init 0.5) and ``p`` a learnable domain prompt (randn init); ``p`` only
    enters the router. ``wg`` keeps DeepSpeed's name for ``W_in``.
    """

    def __init__(self, dim: int, num_experts: int, k: int, capacity_factor: float | None = None,
                 route_dim: int | None = None):
        super().__init__(dim, num_experts, k, capacity_factor, route_dim)
        dim = route_dim or dim
        self.domain_proj = nn.Linear(dim, num_experts, bias=False)
        self.domain_prompt = nn.Parameter(torch.randn(dim))
        self.mix = nn.Parameter(torch.full((1,), 0.5))  # 1-d: DeepSpeed cannot broadcast 0-d parameters

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        token_logits = F.linear(tokens, self.wg.weight.float())
        domain_logits = F.linear(self.domain_prompt.float(), self.domain_proj.weight.float())
        mix = self.mix.float()
        return (1 - mix) * token_logits + mix * domain_logits


class LanguageRouter(TopKGate):
    """Sends every token to its language's expert (weight 1): the language index travels as the last channel.

    Nothing is learned, so DeepSpeed's unused ``wg`` is frozen (never a dead trainable parameter).
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None):
        super().__init__(1, num_experts, k=1, noisy_gate_policy=None, drop_tokens=capacity_factor is not None)
        self.wg.requires_grad_(False)
        self.route_capacity_factor = capacity_factor

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # noqa: A002
        assert sparse_routes and not use_tutel, "DeepSpeed's MOELayer always asks for sparse routes"
        language = input[:, -1].round().long().unsqueeze(1)  # [S, 1]; in range: the config checks num_experts
        # == len(dasd.languages), and ids index that list (no device sync on the hot path)
        gates = torch.ones(language.shape, dtype=torch.float32, device=input.device)
        zero = torch.zeros((), device=input.device)
        return (zero, *dispatch(language, gates, self.wg.out_features, self.ep_group, self.route_capacity_factor))
