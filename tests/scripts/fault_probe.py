"""Two ranks under the deepspeed launcher, each with a DataLoader worker that ignores SIGTERM (as in training); one
rank fails while the other is busy (a long local step) or blocked in a collective. Used by tests/test_faults.py.

    deepspeed --num_gpus 2 tests/scripts/fault_probe.py --fail-rank 1 --other busy
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dsmoe import distributed, failures  # noqa: E402
from dsmoe.data.pipeline import ignore_job_signals  # noqa: E402
from dsmoe.failures import FaultWatch  # noqa: E402
from dsmoe.preemption import PreemptionWatch  # noqa: E402


class Forever(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=-1, help="the rank that raises (-1: none)")
    parser.add_argument("--other", choices=("busy", "collective"), default="collective",
                        help="what the other rank does meanwhile")
    parser.add_argument("--marks", default=None, help="a folder where each rank notes that the fault watch ended it")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    rank, world_size, _ = distributed.init_distributed(timeout_s=300)
    if args.marks:
        leave = failures._leave

        def noted(code: int):
            (Path(args.marks) / f"rank{rank}").write_text(str(code))
            leave(code)
        failures._leave = noted
    PreemptionWatch()  # as in training: SIGTERM (the launcher's, once a rank failed) only sets a flag
    watch = FaultWatch(rank, world_size)
    try:
        batches = iter(DataLoader(Forever(), batch_size=None, num_workers=1, worker_init_fn=ignore_job_signals))
        next(batches)
        dist.barrier()
        if rank == args.fail_rank:
            raise ValueError("injected failure")
        if args.fail_rank >= 0 and args.other == "busy":
            time.sleep(120)  # a long step of its own: no collective to notice that the peer is gone
        dist.all_reduce(torch.ones(1))
        print(f"rank {rank} finished", flush=True)
    except BaseException as exc:  # noqa: BLE001
        watch.fail(exc)
    watch.stop()
    distributed.shutdown()


if __name__ == "__main__":
    main()
