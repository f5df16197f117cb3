"""How the benchmark measures: each variant of a comparison runs in a process of its own (``python tools/bench.py
--case ...``), times only its own work and reports its extra peak memory; the driver interleaves the variants'
processes and repeats them, so that a noisy moment of the machine hits every variant alike."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2 ** 20
BENCH = Path(__file__).resolve().parents[1] / "bench.py"
RESULT_PREFIX = "BENCH-RESULT "


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


@contextmanager
def extra_peak_rss(out: dict):
    """``out["extra_rss_mib"]``: the process's peak resident memory inside the block above what it held on entry
    (Linux: the peak is reset through /proc/self/clear_refs, so earlier allocations do not count)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    yield
    out["extra_rss_mib"] = round((_status_kib("VmHWM") - before) / 1024, 1)


@contextmanager
def stopwatch(out: dict, key: str = "seconds"):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def report(result: dict) -> None:
    """What a case process hands back to the driver (one line on stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_case(case: str, variant: str, options: dict, threads: int, timeout: float = 1800,
             launcher: list[str] | None = None) -> dict:
    """Run one variant of a case in a fresh process and return what it reported."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [*(launcher or [sys.executable]), str(BENCH), "--case", case, "--variant", variant,
               "--options", json.dumps(options)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    results = [line[line.index(RESULT_PREFIX) + len(RESULT_PREFIX):] for line in proc.stdout.splitlines()
               if RESULT_PREFIX in line]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{case}/{variant} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(results[0])


@dataclass
class Samples:
    """Repeated measurements of one variant."""

    seconds: list[float] = field(default_factory=list)
    extra_rss_mib: list[float] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)

    def add(self, reported: dict) -> None:
        self.seconds.append(reported["seconds"])
        if "extra_rss_mib" in reported:
            self.extra_rss_mib.append(reported["extra_rss_mib"])
        self.results.append(reported)

    def summary(self) -> dict:
        s = self.seconds
        out = {"min_s": round(min(s), 4), "median_s": round(statistics.median(s), 4),
               "noise": round((max(s) - min(s)) / statistics.median(s), 3), "repeats": len(s)}
        if self.extra_rss_mib:
            out["extra_rss_mib"] = max(self.extra_rss_mib)
        return out


def interleaved(case: str, variants: list[str], options: dict, repeats: int, threads: int,
                launcher: dict[str, list[str]] | None = None) -> dict[str, Samples]:
    """``repeats`` rounds, each running every variant once in turn (A B A B ..., not A A B B)."""
    samples = {v: Samples() for v in variants}
    for _ in range(repeats):
        for variant in variants:
            samples[variant].add(run_case(case, variant, options, threads,
                                          launcher=(launcher or {}).get(variant)))
    return samples
