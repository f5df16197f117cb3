"""Failures across ranks: the first rank that fails reports once, and every rank ends within seconds, non-zero.

Launchers (deepspeed, torchrun, ``srun --kill-on-bad-exit``) stop the other ranks only after a failed rank has
exited, and a failed rank may never exit by itself: Python joins its DataLoader workers at interpreter exit, and
dsmoe's workers ignore SIGTERM (``ignore_job_signals``). A rank blocked in a collective does not notice a dead peer
either (NCCL waits for its timeout). So every rank runs a ``FaultWatch``:

- a failing rank records its error under one key of the rendezvous store (the first writer wins), prints it
  (a traceback only for unexpected errors), kills its DataLoader workers and leaves with ``os._exit``;
- a watchdog thread on every rank polls that key (and the store itself: if rank 0, which hosts it, is gone, so is
  the job) and ends its own rank with one line that names the rank that failed first;
- the same thread writes a heartbeat into the store, and rank 0's reads everyone's: a rank silent for
  ``lost_after_s`` (its node died or dropped off the network, where no exit code ever reaches the launcher and the
  others would wait in a collective until it times out) is a failure that names that rank and its node.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import NoReturn

ABORT_KEY = "dsmoe/abort"
ACK_KEY = "dsmoe/abort-acks"
BEAT_KEY = "dsmoe/beat/"  # + rank: a counter, or DONE once the rank ended normally
DONE = "done"
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


def _addresses(hosts: list[str]) -> dict[str, str]:
    """Each host's address, where it resolves."""
    out = {}
    for host in dict.fromkeys(hosts):
        try:
            out[host] = socket.gethostbyname(host)
        except OSError:
            pass
    return out


def _leave(code: int) -> NoReturn:
    kill_worker_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class FaultWatch:
    """One per rank, between the process group's start and its orderly end (``stop`` before the last barrier).
    ``hosts``: each rank's host, for the messages; ``lost_after_s``: the silence after which a rank is lost."""

    def __init__(self, rank: int, world_size: int, poll_s: float = POLL_S, hosts: list[str] | None = None,
                 lost_after_s: float = 30.0):
        import torch.distributed as dist

        self.rank, self.world_size, self.poll_s = rank, world_size, poll_s
        self.hosts = hosts if hosts is not None else ["?"] * world_size
        self.lost_after_s = lost_after_s
        self.addresses = _addresses(self.hosts) if world_size > 1 else {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.store = None
        self._thread = None
        if world_size > 1:
            # A client of its own on the rendezvous store (never shared with the process group's threads).
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=10), wait_for_workers=False)
            self._contact = time.monotonic()  # the last answer from the store
            self._thread = threading.Thread(target=self._watch, name="dsmoe-fault-watch", daemon=True)
            self._thread.start()
            threading.Thread(target=self._cut_off, name="dsmoe-fault-watch-link", daemon=True).start()

    def _say(self, message: str) -> None:
        print(f"[dsmoe] rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        beats = 0
        heard = {r: ("", time.monotonic()) for r in range(1, self.world_size)}  # rank 0: last beat, when it changed
        while not self._stopped.wait(self.poll_s):
            lost = None
            try:
                beats += 1
                self.store.set(BEAT_KEY + str(self.rank), str(beats))
                failed = self.store.get(ABORT_KEY).decode() if self.store.check([ABORT_KEY]) else ""
                lost = self._silent_rank(heard) if self.rank == 0 and not failed else None
                if lost is not None:
                    failed = self.store.compare_set(ABORT_KEY, "", lost).decode()
                self._contact = time.monotonic()
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0, its host, is gone
                failed = None
            if failed == "" or self._stopped.is_set():
                continue
            with self._lock:
                if failed is None:
                    self._say(f"stopping: lost contact with rank 0 on {self.hosts[0]}, which hosts the rendezvous "
                              f"(it failed or was killed, or its node is down or unreachable)")
                elif failed == lost:
                    self._say(f"stopping because {lost}")
                    self._wait_for_acknowledgements(self.world_size - 2)
                else:
                    self._acknowledge()
                    self._say(f"stopping because {failed.splitlines()[0]}")
                _leave(1)

    def _cut_off(self) -> None:
        """A store request that never returns (this node's link is cut: no reset, no error) ends this rank too."""
        while not self._stopped.wait(self.poll_s):
            silent = time.monotonic() - self._contact
            if silent > self.lost_after_s:
                with self._lock:
                    if not self._stopped.is_set():
                        self._say(f"stopping: no answer from the rendezvous on rank 0 ({self.hosts[0]}) for "
                                  f"{silent:.0f} s: this node is cut off from it")
                        _leave(1)

    def _silent_rank(self, heard: dict[int, tuple[str, float]]) -> str | None:
        """Rank 0: the first rank whose heartbeat has not moved for ``lost_after_s``, said in one line."""
        ranks = list(heard)
        keys = [BEAT_KEY + str(r) for r in ranks]
        if self.store.check(keys):  # every rank has beaten once (a missing key would block multi_get)
            values = [v.decode() for v in self.store.multi_get(keys)]
        else:
            values = [self.store.get(k).decode() if self.store.check([k]) else "" for k in keys]
        now = time.monotonic()
        for rank, value in zip(ranks, values):
            last, since = heard[rank]
            if value == DONE:
                continue
            if value != last:
                heard[rank] = (value, now)
            elif now - since > self.lost_after_s:
                return (f"rank {rank} on {self.hosts[rank]} is lost: no heartbeat for {now - since:.0f} s (its node "
                        f"died or dropped off the network; train.lost_rank_timeout is {self.lost_after_s:g} s)")
        return None

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
            try:
                self.store.set(BEAT_KEY + str(self.rank), DONE)  # no longer beating, and not lost
            except Exception:  # noqa: BLE001 - rank 0 ended already
                pass

    def fail(self, exc: BaseException) -> NoReturn:
        """Report ``exc`` (if this rank failed first), tell the other ranks, and end this process."""
        self._stopped.set()
        with self._lock:  # the watchdog may be ending this rank already
            first, cause = self._claim(exc)
            if first:
                if not is_user_error(exc) and not isinstance(exc, KeyboardInterrupt):
                    traceback.print_exception(exc, file=sys.stderr)
                prefix = "error" if is_user_error(exc) else "failed"
                print(f"[dsmoe] rank {self.rank} {prefix}: {self.lost_peer(describe(exc))}{describe(exc)}",
                      file=sys.stderr, flush=True)
                self._wait_for_acknowledgements()
            else:
                here = describe(exc).splitlines()[0]
                self._say(f"stopping because {cause}" + ("" if here in cause else f" (here: {here})"))
            _leave(exit_code(exc))

    def lost_peer(self, message: str) -> str:
        """``lost rank 1 on dsmoe-n2 (10.213.0.12): `` when ``message`` (a transport error: a reset connection, a
        read error) names the address of another host's ranks, else "". A node that dies resets its connections,
        so the collectives fail before any heartbeat is missed; this names whom they lost."""
        here = self.hosts[self.rank]
        for host, address in self.addresses.items():
            if host != here and (f"[{address}]" in message or f" {address}:" in message):
                ranks = [r for r, h in enumerate(self.hosts) if h == host]
                which = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
                return f"lost {which} on {host} ({address}): "
        return ""

    def _claim(self, exc: BaseException) -> tuple[bool, str]:
        """(whether this rank is the first to fail, what the first failure was)."""
        if self.store is None:
            return True, ""
        message = f"rank {self.rank} failed: {self.lost_peer(describe(exc))}{describe(exc)}"
        try:
            stored = self.store.compare_set(ABORT_KEY, "", message).decode()
        except Exception:  # noqa: BLE001
            return False, "rank 0 is gone (lost contact with the rendezvous store)"
        return stored == message, stored.splitlines()[0]

    def _wait_for_acknowledgements(self, expected: int | None = None, limit_s: float = 3.0) -> None:
        """Rank 0 hosts the store: give the other ranks (``expected`` of them, default all) a moment to read the
        error before it goes."""
        if self.store is None or self.rank != 0:
            return
        expected = self.world_size - 1 if expected is None else expected
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                if self.store.add(ACK_KEY, 0) >= expected:
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(0.05)
