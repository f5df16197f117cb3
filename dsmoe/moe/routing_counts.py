"""Tokens routed to each expert of every MoE layer over a logging interval, counted on the device."""
from __future__ import annotations

import torch
import torch.distributed as dist


class RoutingCounts:
    """Adds each micro-batch's per-layer expert counts on the device (no host sync per step); ``take`` sums them
    over every rank and starts a new interval."""

    def __init__(self) -> None:
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, counts: dict[str, torch.Tensor]) -> None:
        for name, layer in counts.items():
            layer = layer.detach().to(torch.int64)
            self._counts[name] = self._counts[name] + layer if name in self._counts else layer.clone()

    def take(self) -> dict[str, list[int]]:
        """The interval's counts per layer, summed over the ranks (a collective when there are several)."""
        counts, self._counts = self._counts, {}
        if not counts:
            return {}
        flat = torch.cat(list(counts.values()))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        values, start, summed = flat.tolist(), 0, {}
        for name, layer in counts.items():
            summed[name], start = values[start:start + layer.numel()], start + layer.numel()
        return summed
