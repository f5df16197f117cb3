"""The process group: started from whichever launcher started us (``dsmoe.launcher``), with finite timeouts, its
shared-memory buffers released, small collective flags, and an orderly end."""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from dsmoe.launcher import free_port, map_slurm_env, thread_budget


def init_distributed(timeout_s: float = 600.0, threads: int | None = None) -> tuple[int, int, int]:
    """Start the process group (gloo on CPU, nccl on GPUs) and return (rank, world_size, local_rank).

    Every collective, in the default group and in the groups DeepSpeed creates later (expert and data parallel),
    fails after ``timeout_s`` seconds instead of torch's defaults (30 min gloo, 10 min NCCL). The rank's intra-op
    threads follow ``thread_budget(threads)`` (``train.threads_per_rank``); on a CPU, subnormal floats are
    flushed to zero (values below 1.2e-38 in fp32).
    """
    import deepspeed
    from torch.distributed import distributed_c10d

    map_slurm_env()
    if "RANK" not in os.environ:  # plain `python ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():  # before any NCCL collective: each rank on its own GPU (flag_tensor relies on it)
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(
                f"local rank {local_rank} has no GPU: this process sees {visible} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank per GPU (deepspeed --num_gpus "
                f"or --include, one Slurm task per GPU)")
        torch.cuda.set_device(local_rank)
    else:  # Adam's second moments of tiny gradients go subnormal, and x86 CPUs are ~4x slower on subnormals
        torch.set_flush_denormal(True)
    torch.set_num_threads(thread_budget(threads)[0])
    timeout = timedelta(seconds=timeout_s)
    # new_group() without a timeout takes these module defaults, not the default group's timeout
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout)
    release_shared_memory()
    return dist.get_rank(), dist.get_world_size(), local_rank


def release_shared_memory() -> None:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce buffer (two per port and host otherwise stay in
    /dev/shm, 69 MB each, after every run). Called once every rank has mapped every buffer (inside
    ``deepspeed.init_distributed``), so the mappings stay valid until the processes end."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank() if dist.is_initialized() else 0}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def flag_tensor(*values: int) -> torch.Tensor:
    """A small integer tensor for a collective: on the GPU under NCCL (which reduces only CUDA tensors)."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.tensor(values, device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group once every rank is done (after an error, ``FaultWatch.fail`` ends the process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(timeout_s: float = 600.0, threads: int | None = None) -> Iterator[tuple[int, int, int]]:
    """An entry point's ranks: the process group started (``init_distributed``), any failure on any rank ending
    every rank within seconds (``dsmoe.failures.FaultWatch``), and the group left in order once the work is done.
    Yields (rank, world_size, local_rank)."""
    from dsmoe.failures import FaultWatch

    rank, world_size, local_rank = init_distributed(timeout_s, threads)
    watch = FaultWatch(rank, world_size)
    try:
        yield rank, world_size, local_rank
    except BaseException as exc:  # noqa: BLE001 - every failure ends every rank (see dsmoe.failures)
        watch.fail(exc)
    watch.stop()
    shutdown()
