"""The optimiser's state in a form that fits any layout, so that a run resumed at another world size or ep_size
keeps its Adam moments and step instead of restarting them.

DeepSpeed's own files hold each rank's ZeRO partition of the tensors it trains (its experts among them), which only
the same layout can read back. So at every save each trainable tensor's fp32 master weight and Adam moments are
also gathered whole (a collective over the ranks that share the tensor: every rank for a dense one, the expert's
data-parallel group for an expert's) and written once, under the tensor's global name (``dsmoe.portable``), by the
first rank of that group into ``optimizer_state/rank<r>.safetensors`` of the checkpoint, with the optimiser's step
in the file's metadata. A run resumed at another layout reads the tensors its ranks hold from all those files and
writes them into its own partitions (``restore_state``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsmoe.checkpoint.folder import CheckpointWriteError
from dsmoe.checkpoint.safe_io import write_error_cause
from dsmoe.failures import RunError
from dsmoe.portable import global_name, local_expert_range

FOLDER = "optimizer_state"
FORMAT = "dsmoe-optimizer-state-v1"
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's; "param" is the fp32 master weight


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimiser under DeepSpeed's ZeRO or mixed-precision wrapper (or the engine's own)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_step(optimizer: torch.optim.Optimizer) -> float | None:
    """The optimiser's step count (torch's Adam keeps it per tensor, fused Adams per group); None before any."""
    for group in optimizer.param_groups:
        if "step" in group:
            return float(group["step"])
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def _sharing_group(param: torch.nn.Parameter):
    """The ranks that hold the same copy of ``param`` (ZeRO partitions it over them)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    if getattr(param, "_dp_group", None) is not None:
        return param._dp_group
    if is_moe_param(param):
        return groups._get_expert_data_parallel_group(param.group_name)
    return groups._get_data_parallel_group()


def master_copies(engine) -> Callable[[torch.nn.Parameter], torch.Tensor] | None:
    """Without ZeRO, the fp32 tensor the optimiser trains for each parameter, whole on every rank that holds it:
    the parameter itself (fp32), or its fp32 copy (bf16 / fp16: DeepSpeed's unfused optimiser). None for another
    wrapper (ZeRO's parameters say where their part of the flat copy is: ``_hp_mapping``)."""
    wrapper = engine.optimizer
    if wrapper is base_optimizer(engine):
        return lambda param: param
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
        copies = {id(low): high for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                  for low, high in zip(lows, highs)}
        return lambda param: copies[id(param)]
    return None


def supported(engine) -> bool:
    """Whether this module knows where the engine's optimiser keeps each trainable tensor's state."""
    return master_copies(engine) is not None or all(hasattr(p, "_hp_mapping") for _, p in _trainable(engine).values())


def _whole(engine, param: torch.nn.Parameter, key: str, master) -> torch.Tensor:
    """``param``'s fp32 master weight (``key`` "param") or Adam moment, whole (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2, or the bf16 optimiser: partitions of a flat fp32 copy
        return safe_get_full_fp32_param(param) if key == "param" else safe_get_full_optimizer_state(param, key)
    high = master(param)
    return high.detach().float() if key == "param" else base_optimizer(engine).state[high][key]


def _trainable(engine) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """This rank's trainable tensors: local name -> (global name, parameter)."""
    model = engine.module
    ranges = local_expert_range(model)
    return {name: (global_name(name, ranges), p) for name, p in model.named_parameters() if p.requires_grad}


def save_state(folder: Path, engine, rank: int) -> None:
    """Every rank, at every save (collectives): gather and write this rank's share of the whole state."""
    step = optimizer_step(base_optimizer(engine))
    if step is None or not supported(engine):
        return  # nothing trained yet, or a layout this module does not know: a resume restarts the optimiser
    master = master_copies(engine)
    _link_views(engine)
    mine = {}
    for stored_as, param in _trainable(engine).values():
        whole = {key: _whole(engine, param, key, master) for key in ("param", *MOMENTS)}
        if dist.get_rank(group=_sharing_group(param)) == 0:
            mine.update({f"{key}:{stored_as}": value.detach().float().cpu().contiguous()
                         for key, value in whole.items()})
    if mine:
        path = folder / FOLDER / f"rank{rank}.safetensors"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(mine, str(path), metadata={"format": FORMAT, "step": repr(step)})
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
            raise CheckpointWriteError(path, write_error_cause(exc, path)) from None


def has_state(folder: Path) -> bool:
    return any((folder / FOLDER).glob("rank*.safetensors"))


def read_state(folder: Path, names: set[str]) -> tuple[dict[str, torch.Tensor], float]:
    """From every file of ``folder``: the tensors of the global ``names`` ("param:<name>", "exp_avg:<name>", ...)
    and the optimiser step."""
    tensors: dict[str, torch.Tensor] = {}
    steps = set()
    for path in sorted((folder / FOLDER).glob("rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise RunError(f"{path} is not a dsmoe optimiser state file (format {meta.get('format')!r})")
            steps.add(float(meta["step"]))
            for key in f.keys():
                if key.split(":", 1)[-1] in names:
                    tensors[key] = f.get_tensor(key)
    wanted = {f"{key}:{name}" for name in names for key in ("param", *MOMENTS)}
    missing = sorted(wanted - tensors.keys())
    if missing or len(steps) != 1:
        raise RunError(f"{folder / FOLDER} does not hold this model's optimiser state (missing {len(missing)} "
                       f"tensors, e.g. {missing[:2]}; steps {sorted(steps)})")
    return tensors, steps.pop()


def restore_state(folder: Path, engine) -> str:
    """Write the saved whole state into this run's layout: master weights, Adam moments and step. Returns what was
    restored, for the log."""
    trainable = _trainable(engine)
    tensors, step = read_state(folder, {stored_as for stored_as, _ in trainable.values()})
    optimizer = base_optimizer(engine)
    master = master_copies(engine)
    _materialise(engine, optimizer)
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with torch.no_grad():
        for stored_as, param in trainable.values():
            if hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, tensors[f"param:{stored_as}"].to(param.device))
                for key in MOMENTS:
                    safe_set_full_optimizer_state(param, tensors[f"{key}:{stored_as}"].to(param.device), key)
            else:
                high = master(param)
                high.copy_(tensors[f"param:{stored_as}"])
                for key in MOMENTS:
                    optimizer.state[high][key].copy_(tensors[f"{key}:{stored_as}"])
                param.copy_(high)  # the model's (bf16) weights from their master
    _set_step(optimizer, step)
    return f"Adam moments and step {step:g} of {len(trainable)} tensors resharded"


def _materialise(engine, optimizer: torch.optim.Optimizer) -> None:
    """Give the optimiser its state tensors (torch's Adam creates them at its first step): one step with zero
    gradients at learning rate 0, which moves no weight; then link ZeRO's per-parameter views to them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(optimizer.state.get(p) for p in params):
        rates = [group["lr"] for group in optimizer.param_groups]
        grads = [p.grad for p in params]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
    _link_views(engine)


def _link_views(engine) -> None:
    """(Re)point ZeRO's per-parameter views at the optimiser's state tensors. DeepSpeed links them once, after the
    step of its first parameter group, before the other groups have any state (dsmoe has up to four: dense and
    expert tensors, with and without weight decay), so the others' views are empty until linked again."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _set_step(optimizer: torch.optim.Optimizer, step: float) -> None:
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = type(group["step"])(step)
    for state in optimizer.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = type(state["step"])(step)
