"""Run logging: a rank-0 progress bar and messages, a JSON-lines metrics file, and wandb when enabled."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dsmoe.config import RunConfig, to_dict

logger = logging.getLogger("dsmoe")


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: Path, rank: int, cfg: RunConfig, enabled_wandb: bool = False):
        self.rank = rank
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="[dsmoe] %(message)s", stream=sys.stdout, force=True)
        if enabled_wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    dir=str(run_dir), config=to_dict(cfg))

    def info(self, message: str) -> None:
        if self.rank == 0:
            logger.info(message)

    def progress(self, total: int, initial: int, desc: str):
        if self.rank != 0:
            return _NullBar()
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stdout,
                    mininterval=2.0, disable=None)

    def metrics(self, record: dict, routing: dict | None = None) -> None:
        """Append one record (plus per-layer tokens per expert) to metrics.jsonl and wandb."""
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        if routing:
            record["routing"] = routing
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            if routing:
                for layer, counts in routing.items():
                    total = max(1, sum(counts))
                    flat.update({f"routing/{layer}/expert{e}": c / total for e, c in enumerate(counts)})
            self.wandb.log(flat, step=record.get("step"))
        event = record.get("event")
        if event:
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in record.items()
                     if k not in ("time", "routing") and not isinstance(v, (dict, list))}
            logger.info(json.dumps(shown))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
