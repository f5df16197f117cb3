"""How dsmoe finds its rank and device from whichever launcher started it."""
from __future__ import annotations

import deepspeed
import pytest
import torch

from dsmoe import distributed
from dsmoe.distributed import map_slurm_env


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
