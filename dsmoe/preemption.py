"""Preemption and stop signals: every rank saves the same checkpoint, then the job requeues itself or ends.

``#SBATCH --signal=USR1@300`` delivers SIGUSR1 to every task five minutes before the limit. Each rank only sets
a flag in the handler; at the next optimiser step the ranks agree (the training loop's one all-reduce per step)
so all of them save the same checkpoint, then rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and the job exits.
The requeued job keeps its id, finds the checkpoint in its run directory and continues (``--resume auto``).
SIGTERM (scancel, preemption without warning) and SIGINT (Ctrl-C) save too, then the ranks exit with 128 + the
signal's number (143, 130), so schedulers and workflow tools record that the run did not finish. A second Ctrl-C
interrupts at once, without saving.
"""
from __future__ import annotations

import os
import signal
import subprocess

REQUEUE, STOP = 2, 1


class PreemptionWatch:
    def __init__(self, requeue_signal: signal.Signals = signal.SIGUSR1):
        self.state = 0
        self.stop_signal: int | None = None  # the first SIGTERM or SIGINT received
        signal.signal(requeue_signal, self._on_requeue)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

    def _on_requeue(self, signum, frame) -> None:
        self.state = max(self.state, REQUEUE)

    def _on_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the save
        self.state = max(self.state, STOP)
        self.stop_signal = self.stop_signal or signum

    def exit_code(self) -> int:
        """What the process should exit with after a stop: 128 + the signal's number (SIGTERM 143, SIGINT 130)."""
        return 128 + (self.stop_signal or signal.SIGTERM)

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
