"""Portable adapters: every trainable tensor of a run (all experts gathered) in one safetensors file + its YAML.

Expert tensors are stored under their global expert index (``...deepspeed_experts.{global}...``), so a file loads
into a model of any ep_size / world size: each rank takes the experts it holds.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.config import RunConfig, to_dict

FORMAT = "dsmoe-adapters-v1"
EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".yaml")


def local_expert_range(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per MoE layer (module path): (first global expert index on this rank, number of local experts)."""
    from deepspeed.moe.layer import MoE

    from dsmoe.moe.layer import expert_parallel_rank

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            local = module.num_local_experts
            out[name] = (expert_parallel_rank(module.ep_size) * local, local)
    return out


def global_name(name: str, ranges: dict[str, tuple[int, int]]) -> str:
    """A parameter's name with its layer's local expert index made global (other names as they are)."""
    match = EXPERT.search(name)
    if not match:
        return name
    layer = next(prefix for prefix in ranges if name.startswith(prefix + "."))
    first, _ = ranges[layer]
    return f"{name[:match.start()]}.deepspeed_experts.{first + int(match.group(1))}.{name[match.end():]}"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's trainable tensors under global expert names (a world of one holds them all)."""
    ranges = local_expert_range(model)
    return {global_name(n, ranges): p.detach().float().cpu().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def save_portable(model: nn.Module, cfg: RunConfig, path: str | Path, source: str) -> Path:
    """Write the adapters (from a model holding every expert: ep_size 1) and the resolved config."""
    from deepspeed.moe.layer import MoE

    path = Path(path)
    if any(m.ep_size != 1 for m in model.modules() if isinstance(m, MoE)):
        raise ValueError("export needs a model that holds every expert (ep_size 1)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(path), metadata={"format": FORMAT, "source": source})
    config_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def load_portable(model: nn.Module, path: str | Path) -> None:
    """Load a portable file into ``model`` (its ep layout whatever it is); every trainable tensor must be there."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dsmoe adapters file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        stored = set(f.keys())
        ranges = local_expert_range(model)
        wanted = {n: global_name(n, ranges) for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(g for g in wanted.values() if g not in stored)
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} trainable tensors of this model, e.g. {missing[:3]}; "
                             f"was it exported from another method or model size?")
        state = {local: f.get_tensor(stored_as) for local, stored_as in wanted.items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)

