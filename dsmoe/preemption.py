"""Preemption: Slurm's warning signal before a time limit makes every rank save and the job requeue itself.

``#SBATCH --signal=USR1@300`` delivers SIGUSR1 to every task five minutes before the limit. Each rank only sets
a flag in the handler; at the next optimiser step the ranks agree (the training loop's one all-reduce per step)
so all of them save the same checkpoint, then rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and the job exits.
The requeued job keeps its id, finds the checkpoint in its run directory and continues (``--resume auto``). SIGTERM (scancel, preemption
without warning) saves too but does not requeue.
"""
from __future__ import annotations

import os
import signal
import subprocess

REQUEUE, STOP = 2, 1


class PreemptionWatch:
    def __init__(self, requeue_signal: signal.Signals = signal.SIGUSR1):
        self.state = 0
        signal.signal(requeue_signal, self._on_requeue)
        signal.signal(signal.SIGTERM, self._on_stop)

    def _on_requeue(self, signum, frame) -> None:
        self.state = max(self.state, REQUEUE)

    def _on_stop(self, signum, frame) -> None:
        self.state = max(self.state, STOP)

    @staticmethod
    def requeue() -> str:
        """Ask Slurm to requeue this job (rank 0 only); returns what happened, for the log."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return "not under Slurm: nothing to requeue"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            return f"scontrol requeue {job} failed: {result.stderr.strip()}"
        return f"requeued Slurm job {job}"
