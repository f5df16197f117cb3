"""Run logging on rank 0: messages, live progress, a JSON-lines metrics file, and wandb when enabled.

Progress: at a terminal, one bar over the whole run with its ETA and the current loss; in a file or a Slurm log
(stdout not a terminal), a plain line at every logged step.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmoe.config import RunConfig, to_dict
from dsmoe.files import write_atomic

logger = logging.getLogger("dsmoe")

# metrics.jsonl records by "event" -> wandb key prefix (step records have no event)
WANDB_PREFIX = {None: "train", "zero_shot": "zero_shot", "val": "val", "test": "test", "bad_samples": "data",
                "preempted": "run"}


def prefixed_record(record: dict, routing: dict | None) -> tuple[dict, dict | None]:
    """The numbers of a metrics.jsonl record as wandb and TensorBoard keys (``train/loss``, ``val/R1``, ...), and
    the routing as rows of a table: (layer, expert, share of that layer's routes)."""
    prefix = WANDB_PREFIX.get(record.get("event"), str(record.get("event")))
    flat = {f"{prefix}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step")}
    table = None
    if routing:
        table = {"columns": ["layer", "expert", "share"],
                 "data": [[layer, expert, count / max(1, sum(counts))]
                          for layer, counts in routing.items() for expert, count in enumerate(counts)]}
    return flat, table


def routing_image(routing: dict[str, list[int]], cell: int = 12) -> np.ndarray:
    """The routing as a grey-level heat-map, one row per layer and one column per expert (white: a layer's every
    route to that expert), each cell ``cell`` pixels wide: [H, W] floats in [0, 1], as TensorBoard shows images."""
    shares = np.array([[count / max(1, sum(counts)) for count in counts] for counts in routing.values()])
    return np.kron(shares, np.ones((cell, cell)))


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: Path, rank: int, cfg: RunConfig):
        self.rank = rank
        self.path = run_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        self.interactive = sys.stdout.isatty()
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="[dsmoe] %(message)s", stream=sys.stdout, force=True)
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    dir=str(run_dir), config=to_dict(cfg))
        if cfg.tensorboard.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if self.rank == 0:
            logger.info(message)

    def progress(self, total: int, initial: int, desc: str):
        """A bar over ``total`` optimiser steps at a terminal (nothing elsewhere: ``step_line`` speaks there)."""
        if self.rank != 0 or not self.interactive:
            return _NullBar()
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

    def step_line(self, line: str) -> None:
        """A logged step's progress line, in a log file (at a terminal the bar shows it)."""
        if self.rank == 0 and not self.interactive:
            logger.info(line)

    def cut_after(self, step: int) -> int:
        """Drop the records a crashed run logged after ``step`` (the checkpoint a resumed run continues from), so
        each step appears once; returns how many were dropped."""
        if self.rank != 0 or not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)

    def metrics(self, record: dict, routing: dict | None = None) -> None:
        """Append one record (plus per-layer routes per expert) to metrics.jsonl, wandb and TensorBoard."""
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        if routing:
            record["routing"] = routing
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step")
        flat, table = prefixed_record(record, routing)
        if self.wandb is not None:
            import wandb

            tables = {"routing": wandb.Table(columns=table["columns"], data=table["data"])} if table else {}
            self.wandb.log({**flat, **tables}, step=step)
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
            if routing:
                self.tensorboard.add_image("routing/share", routing_image(routing), step, dataformats="HW")
            self.tensorboard.flush()
        event = record.get("event")
        if event:
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in record.items()
                     if k not in ("time", "routing") and not isinstance(v, (dict, list))}
            logger.info(json.dumps(shown))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Pace:
    """Time spent waiting for data and stepping, between two logged steps, and what it says about the run."""

    def __init__(self, samples_per_step: int, total_steps: int):
        self.samples_per_step, self.total_steps = samples_per_step, total_steps
        self.wait = self.busy = 0.0
        self.steps = 0

    def add(self, wait: float, busy: float, steps: int) -> None:
        self.wait, self.busy, self.steps = self.wait + wait, self.busy + busy, self.steps + steps

    def figures(self, step: int) -> dict:
        """samples/s over all ranks, seconds per step, the share of it spent waiting for data, the ETA of the
        remaining steps (evaluations not counted); then starts the next interval."""
        seconds = self.wait + self.busy
        per_step = seconds / max(1, self.steps)
        out = {"samples_per_s": self.samples_per_step * self.steps / seconds if seconds else 0.0,
               "step_s": per_step, "data_wait": self.wait / seconds if seconds else 0.0,
               "eta_s": per_step * max(0, self.total_steps - step)}
        self.wait = self.busy = 0.0
        self.steps = 0
        return out


def peak_memory(device) -> str:
    """This rank's peak memory: allocated on its GPU, else the process's peak resident size."""
    import torch

    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"  # KiB on Linux


def step_line(step: int, total: int, epoch: int, epochs: int, scalars: dict, lr: float, pace: dict,
              memory: str) -> str:
    """One logged step as a plain line: what a Slurm log shows between evaluations."""
    terms = " ".join(f"{k} {v:.4f}" for k, v in scalars.items())
    return (f"step {step}/{total} epoch {epoch + 1}/{epochs} | {terms} | lr {lr:.3e} | "
            f"{pace['samples_per_s']:.1f} samples/s, {pace['step_s']:.2f} s/step, data wait "
            f"{pace['data_wait']:.0%} | {memory} (rank 0) | ETA {eta(pace['eta_s'])}")


def eta(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))
