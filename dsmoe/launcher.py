"""What the launcher that started this process says (deepspeed, torchrun, Slurm's srun, or none), read before any
process group exists and without importing torch."""
from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_slurm_env(env: dict[str, str] = os.environ) -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from Slurm's variables when a launcher did not."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    local = int(env.get("SLURM_LOCALID", "0"))
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    # with --gpus-per-task each task sees only its own GPU(s): the local rank indexes what the task can see
    env["LOCAL_RANK"] = str(local % len(visible) if visible and local >= len(visible) else local)
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        first = None
        if nodes:
            try:
                out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                     check=True).stdout.split()
                first = out[0] if out else None
            except (OSError, subprocess.CalledProcessError):
                first = None
        env["MASTER_ADDR"] = first or "127.0.0.1"
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 2000))


def launched_world_size() -> int:
    """How many processes the launcher started (1 for a plain ``python``), known before the process group."""
    map_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size(env: dict[str, str] = os.environ) -> int:
    """Ranks on this host: what the launcher says (deepspeed LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE, Slurm's tasks on
    this node), else every rank (one host)."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:  # "4" or "4(x2)" or "3,2": this node's count is not known, the largest is a safe divisor
        return max(int(part.split("(")[0]) for part in per_node.split(",") if part.split("(")[0].isdigit())
    return max(1, int(env.get("WORLD_SIZE", "1")))


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_budget(configured: int | None, env: dict[str, str] = os.environ,
                  cores: int | None = None) -> tuple[int, str]:
    """Intra-op threads for this rank and where the number comes from: ``train.threads_per_rank``, else an
    explicit ``OMP_NUM_THREADS``, else Slurm's ``--cpus-per-task``, else the cores this process may run on shared
    by the ranks on this host (N ranks each taking every core run many times slower than they should)."""
    if configured is not None:
        return configured, "train.threads_per_rank"
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit() and int(env["SLURM_CPUS_PER_TASK"]) > 0:
        return int(env["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    if cores is None:
        cores = available_cores()
    ranks = local_world_size(env)
    return max(1, cores // ranks), f"{cores} cores / {ranks} local ranks"
