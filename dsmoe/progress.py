"""Long phases that say what they are doing and how far they are: a bar at a terminal; in a log file or a Slurm
output, a line when the phase starts, at most every ``every`` seconds while it runs, and when it ends."""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from tqdm import tqdm


class Phase:
    def __init__(self, what: str, total: int | None = None, unit: str = "items", *, enabled: bool = True,
                 every: float = 30.0, stream: TextIO | None = None):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if not enabled:
            return
        if self.stream.isatty():
            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, dynamic_ncols=True)
        else:
            self._line(f"{what}: {total:,} {unit}" if total is not None else f"{what} ...")

    def _line(self, text: str) -> None:
        print(f"[dsmoe] {text}", file=self.stream, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(f"{self.what}: {self.status(now)}")

    def status(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.done:,} {self.unit} ({rate:.1f}/s)"
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(1, self.total):.0f}%, "
                f"{rate:.1f}/s, ETA {timedelta(seconds=round(left))})")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            return
        self._line(f"{self.what}: done, {self.done:,} {self.unit} in {time.monotonic() - self.start:.0f} s")

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
