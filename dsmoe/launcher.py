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
