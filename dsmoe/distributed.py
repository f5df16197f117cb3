"""The process group: started from whichever launcher started us (``dsmoe.launcher``), with finite timeouts, its
shared-memory buffers released, small collective flags, and an orderly end."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from dsmoe.failures import FaultWatch, RunError
from dsmoe.launcher import free_port, local_world_size, map_slurm_env, thread_budget

if TYPE_CHECKING:
    from dsmoe.config import TrainConfig


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
    check_rendezvous(int(os.environ["WORLD_SIZE"]))
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
def process_group(train: TrainConfig) -> Iterator[tuple[int, int, int]]:
    """An entry point's ranks: the process group started (``init_distributed`` with ``train.collective_timeout`` and
    ``train.threads_per_rank``), where each rank runs said once, any failure on any rank (a lost node included,
    ``train.lost_rank_timeout``) ending every rank within seconds (``dsmoe.failures.FaultWatch``), and the group
    left in order once the work is done. Yields (rank, world_size, local_rank)."""
    try:
        rank, world_size, local_rank = init_distributed(train.collective_timeout, train.threads_per_rank)
    except RunError as exc:  # before the group exists: each rank stops on its own, rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            print(f"[dsmoe] error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    hosts = rank_hosts()
    if rank == 0 and world_size > 1:
        print(f"[dsmoe] {placement(hosts)}; rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
              f" ({rendezvous_address()})", flush=True)
    watch = FaultWatch(rank, world_size, hosts=hosts, lost_after_s=train.lost_rank_timeout)
    try:
        yield rank, world_size, local_rank
    except BaseException as exc:  # noqa: BLE001 - every failure ends every rank (see dsmoe.failures)
        watch.fail(exc)
    watch.stop()
    shutdown()


def rank_hosts() -> list[str]:
    """The host name of every rank, in rank order (a collective)."""
    hosts: list[str] = [""] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_gather_object(hosts, socket.gethostname())
    else:
        hosts[0] = socket.gethostname()
    return hosts


def placement(hosts: list[str]) -> str:
    """Which ranks run on which node: ``ranks on 2 nodes: dsmoe-n1 [0, 1], dsmoe-n2 [2, 3]``."""
    nodes: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        nodes.setdefault(host, []).append(rank)
    where = ", ".join(f"{host} {ranks}" for host, ranks in nodes.items())
    return f"ranks on {len(nodes)} node{'s' if len(nodes) > 1 else ''}: {where}"


def rendezvous_address(env: dict[str, str] = os.environ) -> str:
    """The address MASTER_ADDR resolves to here (the name itself when it does not resolve)."""
    try:
        return socket.gethostbyname(env.get("MASTER_ADDR", ""))
    except OSError:
        return env.get("MASTER_ADDR", "")


def check_rendezvous(world_size: int, env: dict[str, str] = os.environ) -> None:
    """A job over several hosts cannot meet at a loopback address: each rank would reach its own host (a hang until
    the rendezvous times out, the classic ``127.0.1.1`` line of /etc/hosts)."""
    if local_world_size(env) >= world_size:
        return
    address = rendezvous_address(env)
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:  # a name that does not resolve: the rendezvous itself says so
        return
    if loopback:
        raise RunError(
            f"the rendezvous MASTER_ADDR={env.get('MASTER_ADDR')} resolves to {address}, a loopback address, but the "
            f"{world_size} ranks run on several hosts ({local_world_size(env)} per host): the ranks on the other "
            f"hosts cannot reach it. Give the first node's name an address of its network in /etc/hosts (or DNS), "
            f"or set MASTER_ADDR to that address")
