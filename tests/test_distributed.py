"""How dsmoe finds its rank and device from whichever launcher started it."""
from __future__ import annotations

import threading
import time

import deepspeed
import pytest
import torch

from dsmoe import distributed
from dsmoe.distributed import map_slurm_env
from dsmoe.failures import RunError
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


# -- several hosts: where ranks run, the rendezvous, lost ranks ------------------------------------------------------


def test_the_placement_line_lists_each_nodes_ranks():
    assert distributed.placement(["n1", "n2", "n1", "n2"]) == "ranks on 2 nodes: n1 [0, 2], n2 [1, 3]"
    assert distributed.placement(["vm", "vm"]) == "ranks on 1 node: vm [0, 1]"


def test_a_rendezvous_at_a_loopback_address_is_refused_when_ranks_span_hosts():
    many_hosts = {"MASTER_ADDR": "localhost", "SLURM_TASKS_PER_NODE": "1(x2)", "WORLD_SIZE": "2"}
    with pytest.raises(RunError, match=r"MASTER_ADDR=localhost resolves to 127\.0\.0\.1, a loopback address"):
        distributed.check_rendezvous(2, many_hosts)
    distributed.check_rendezvous(2, {**many_hosts, "SLURM_TASKS_PER_NODE": "2"})  # one host: loopback is right
    distributed.check_rendezvous(2, {**many_hosts, "MASTER_ADDR": "192.0.2.7"})  # an address of the network


@pytest.fixture
def store(monkeypatch):
    """A rendezvous store in this process, as rank 0 hosts it, and a maker of FaultWatches on it whose ``_leave``
    is recorded instead of ending the process."""
    from torch.distributed import TCPStore

    from dsmoe import failures
    from dsmoe.launcher import free_port

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    left, done = [], threading.Event()

    def leave(code):  # the thread that would end the process waits for the end of the test instead
        left.append(code)
        done.wait(30)
    monkeypatch.setattr(failures, "_leave", leave)
    made = []

    def watch(*args, **kwargs) -> failures.FaultWatch:
        made.append(failures.FaultWatch(*args, **kwargs))
        return made[-1]
    yield server, left, watch
    for each in made:
        each._stopped.set()
    done.set()


def wait_until(condition, limit_s: float) -> float:
    start = time.monotonic()
    while not condition() and time.monotonic() - start < limit_s:
        time.sleep(0.02)
    return time.monotonic() - start


def test_rank_zero_ends_the_run_when_a_rank_stops_beating_and_names_it_and_its_node(store, capfd):
    from dsmoe.failures import ABORT_KEY

    server, left, watch = store
    hosts = ["n1", "n2", "n3"]
    watch(0, 3, poll_s=0.05, hosts=hosts, lost_after_s=0.6)
    watch(1, 3, poll_s=0.05, hosts=hosts, lost_after_s=60)
    rank2 = watch(2, 3, poll_s=0.05, hosts=hosts, lost_after_s=60)
    time.sleep(0.3)
    rank2._stopped.set()  # rank 2's node is gone: its heartbeat stops (its thread, not the process, here)
    took = wait_until(lambda: left, 5)
    assert left and left[0] == 1 and 0.6 <= took < 2, (left, took)
    wait_until(lambda: len(left) >= 2, 2)  # rank 1 ends on reading the abort key
    message = server.get(ABORT_KEY).decode()
    assert message.startswith("rank 2 on n3 is lost: no heartbeat for 1 s"), message
    err = capfd.readouterr().err
    assert "[dsmoe] rank 0: stopping because rank 2 on n3 is lost" in err
    assert "[dsmoe] rank 1: stopping because rank 2 on n3 is lost" in err


def test_a_rank_that_ended_normally_is_not_lost(store):
    _, left, watch = store
    rank0 = watch(0, 2, poll_s=0.05, hosts=["n1", "n2"], lost_after_s=0.3)
    rank1 = watch(1, 2, poll_s=0.05, hosts=["n1", "n2"], lost_after_s=60)
    time.sleep(0.2)
    rank1.stop()  # its work is done: it says so and leaves before rank 0
    time.sleep(1.0)
    assert left == []
    rank0.stop()


def test_a_transport_error_naming_another_hosts_address_names_the_lost_ranks(store):
    rank0 = store[2](0, 4, hosts=["n1", "n1", "n2", "n2"])
    rank0.stop()
    rank0.addresses = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    error = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:4170: Connection reset by peer."
    assert rank0.lost_peer(error) == "lost ranks 2, 3 on n2 (10.0.0.2): "
    assert rank0.lost_peer("Read error [10.0.0.1]:4170") == ""  # its own host: nothing to name
    assert rank0.lost_peer("ValueError: injected failure") == ""
