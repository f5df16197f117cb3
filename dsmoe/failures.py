"""Failures across ranks: the first rank that fails reports once, and every rank ends within seconds, non-zero.

Launchers (deepspeed, torchrun, ``srun --kill-on-bad-exit``) stop the other ranks only after a failed rank has
exited, and a failed rank may never exit by itself: Python joins its DataLoader workers at interpreter exit, and
dsmoe's workers ignore SIGTERM (``ignore_job_signals``). A rank blocked in a collective does not notice a dead peer
either (NCCL waits for its timeout). So every rank runs a ``FaultWatch``:

- a failing rank records its error under one key of the rendezvous store (the first writer wins), prints it
  (a traceback only for unexpected errors), kills its DataLoader workers and leaves with ``os._exit``;
- a watchdog thread on every rank polls that key (and the store itself: if rank 0, which hosts it, is gone, so is
  the job) and ends its own rank with one line that names the rank that failed first.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import NoReturn

ABORT_KEY = "dsmoe/abort"
ACK_KEY = "dsmoe/abort-acks"
POLL_S = 0.5


class RunError(RuntimeError):
    """A failure whose message says everything the user needs (no traceback): too many unreadable samples, a
    checkpoint that cannot be read or written."""


def is_user_error(exc: BaseException) -> bool:
    from dsmoe.schema import ConfigError

    return isinstance(exc, (RunError, ConfigError))


def describe(exc: BaseException) -> str:
    """One line: the message of a user error, or the exception's type and message."""
    if is_user_error(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()


def exit_code(exc: BaseException) -> int:
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def kill_worker_processes() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers ignore SIGTERM, see above)."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except (OSError, AttributeError):
            pass


def _leave(code: int) -> NoReturn:
    kill_worker_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class FaultWatch:
    """One per rank, between the process group's start and its orderly end (``stop`` before the last barrier)."""

    def __init__(self, rank: int, world_size: int, poll_s: float = POLL_S):
        import torch.distributed as dist

        self.rank, self.world_size, self.poll_s = rank, world_size, poll_s
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.store = None
        self._thread = None
        if world_size > 1:
            # A client of its own on the rendezvous store (never shared with the process group's threads).
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=10), wait_for_workers=False)
            self._thread = threading.Thread(target=self._watch, name="dsmoe-fault-watch", daemon=True)
            self._thread.start()

    def _say(self, message: str) -> None:
        print(f"[dsmoe] rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                failed = self.store.get(ABORT_KEY).decode() if self.store.check([ABORT_KEY]) else ""
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0, its host, is gone
                failed = None
            if failed == "" or self._stopped.is_set():
                continue
            with self._lock:
                if failed is None:
                    self._say("stopping: lost contact with rank 0, which hosts the rendezvous (it failed or was "
                              "killed)")
                else:
                    self._acknowledge()
                    self._say(f"stopping because {failed.splitlines()[0]}")
                _leave(1)

    def _acknowledge(self) -> None:
        try:
            self.store.add(ACK_KEY, 1)
        except Exception:  # noqa: BLE001 - rank 0 gone: nobody waits for the acknowledgement
            pass

    def stop(self) -> None:
        """The run ended normally on this rank: stop watching before the final barrier (ranks leave at their own
        pace, and rank 0's store goes with it)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def fail(self, exc: BaseException) -> NoReturn:
        """Report ``exc`` (if this rank failed first), tell the other ranks, and end this process."""
        self._stopped.set()
        with self._lock:  # the watchdog may be ending this rank already
            first, cause = self._claim(exc)
            if first:
                if not is_user_error(exc) and not isinstance(exc, KeyboardInterrupt):
                    traceback.print_exception(exc, file=sys.stderr)
                prefix = "error" if is_user_error(exc) else "failed"
                print(f"[dsmoe] rank {self.rank} {prefix}: {describe(exc)}", file=sys.stderr, flush=True)
                self._wait_for_acknowledgements()
            else:
                here = describe(exc).splitlines()[0]
                self._say(f"stopping because {cause}" + ("" if here in cause else f" (here: {here})"))
            _leave(exit_code(exc))

    def _claim(self, exc: BaseException) -> tuple[bool, str]:
        """(whether this rank is the first to fail, what the first failure was)."""
        if self.store is None:
            return True, ""
        message = f"rank {self.rank} failed: {describe(exc)}"
        try:
            stored = self.store.compare_set(ABORT_KEY, "", message).decode()
        except Exception:  # noqa: BLE001
            return False, "rank 0 is gone (lost contact with the rendezvous store)"
        return stored == message, stored.splitlines()[0]

    def _wait_for_acknowledgements(self, limit_s: float = 3.0) -> None:
        """Rank 0 hosts the store: give the other ranks a moment to read the error before it goes."""
        if self.store is None or self.rank != 0:
            return
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                if self.store.add(ACK_KEY, 0) >= self.world_size - 1:
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(0.05)
