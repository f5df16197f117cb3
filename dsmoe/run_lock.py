"""A run folder belongs to one run at a time.

Rank 0 holds an exclusive lock (``fcntl.lockf``) on ``<train.output_dir>/run.lock`` from before the run writes
anything until it ends, and writes its host, pid and start time into the file. A second run into the folder, or a
resume while the first run is alive, is refused with one line naming that host and pid. The operating system drops
the lock when its process dies however it dies, so a lock left by a dead run is taken over at once (the record it
left says whose it was). Such locks also hold across nodes on shared filesystems that support POSIX locks (NFS,
Lustre mounted with ``flock``); where a filesystem has none, the run says so and goes on unguarded.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from dsmoe.failures import RunError

LOCK_FILE = "run.lock"


class RunFolderBusy(RunError):
    """Another live run holds the folder."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = f", started {datetime.fromtimestamp(started):%Y-%m-%d %H:%M:%S}" if isinstance(started, (int, float)) \
        else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{when}"


class RunLock:
    """The lock of one run folder, held by this process between ``acquire`` and ``release`` (or its end)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the folder; ``RunFolderBusy`` when a live run holds it. Returns a note when the lock was taken over
        from a run that ended without releasing it (or when the filesystem has no locks), else None."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderBusy(f"{self.folder} is in use by another run ({_describe(holder)}): wait for it to "
                                    f"end, or give this run another train.output_dir") from None
            return f"WARNING: cannot lock {self.path} ({exc.strerror}): nothing stops a second run from using " \
                   f"{self.folder} at the same time"
        left = _read(fd)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if left:
            return f"took over {self.path} from a run that ended without releasing it ({_describe(left)})"
        return None

    def release(self) -> None:
        """Clear the record and drop the lock (never unlinking the file: another process may be waiting on it)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def _read(fd: int) -> dict:
    """The record in an open lock file ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?"}
    return record if isinstance(record, dict) else {}
