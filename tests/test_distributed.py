"""How dsmoe finds its rank and device from whichever launcher started it."""
from __future__ import annotations

import deepspeed
import pytest
import torch

from dsmoe import distributed
from dsmoe.distributed import map_slurm_env
from dsmoe.launcher import local_world_size, thread_budget


def test_slurm_variables_become_the_launcher_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "MASTER_ADDR": "node07"}
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "node07" and env["MASTER_PORT"] == str(29500 + 1234 % 2000)


def test_a_task_bound_to_its_own_gpu_uses_local_rank_zero():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3",
           "MASTER_ADDR": "node01"}
    map_slurm_env(env)
    assert env["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("env,cores,expected", [
    ({"LOCAL_SIZE": "2", "WORLD_SIZE": "4"}, 16, (8, "16 cores / 2 local ranks")),  # deepspeed, 2 hosts
    ({"LOCAL_WORLD_SIZE": "3"}, 16, (5, "16 cores / 3 local ranks")),  # torchrun
    ({"SLURM_NTASKS_PER_NODE": "4"}, 32, (8, "32 cores / 4 local ranks")),
    ({"SLURM_TASKS_PER_NODE": "2(x3)"}, 8, (4, "8 cores / 2 local ranks")),
    ({"WORLD_SIZE": "2"}, 2, (1, "2 cores / 2 local ranks")),  # this machine's demo: not 2 x 2 threads
    ({"WORLD_SIZE": "8"}, 2, (1, "2 cores / 8 local ranks")),  # never 0
    ({"WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 16, (3, "OMP_NUM_THREADS")),
    ({"WORLD_SIZE": "2", "SLURM_CPUS_PER_TASK": "6"}, 64, (6, "SLURM_CPUS_PER_TASK")),
    ({}, 4, (4, "4 cores / 1 local ranks")),
])
def test_each_rank_gets_its_share_of_the_cores(env, cores, expected):
    assert thread_budget(None, env, cores) == expected


def test_a_configured_thread_count_wins_and_the_launch_applies_the_budget_and_flushes_subnormals(monkeypatch):
    assert thread_budget(5, {"OMP_NUM_THREADS": "2", "LOCAL_SIZE": "2"}, 16) == (5, "train.threads_per_rank")
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "3,2"}) == 3
    applied, flushed = [], []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    monkeypatch.setattr(torch, "set_flush_denormal", flushed.append)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    monkeypatch.setattr(distributed, "release_shared_memory", lambda: None)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    distributed.init_distributed(60, threads=3)
    distributed.init_distributed(60)
    assert applied == [3, thread_budget(None)[0]]
    assert flushed == ([] if torch.cuda.is_available() else [True, True])  # subnormals flushed on a CPU


def test_a_launcher_that_set_the_rank_wins():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")


def test_more_ranks_than_visible_gpus_is_refused_before_the_process_group(monkeypatch):
    for key, value in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda: pytest.fail("the process group was started"))
    with pytest.raises(ValueError, match=r"local rank 2 has no GPU: this process sees 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        distributed.init_distributed()
