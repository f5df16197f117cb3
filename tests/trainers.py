"""Building the real ``Trainer`` in the test process (world size 1, gloo: the ``dist_env`` fixture) on the demo's
assets, and reading what a run logged."""
from __future__ import annotations

import json
from pathlib import Path

from dsmoe.config import load_config
from dsmoe.ds_config import DeviceSupport, compose_ds_config, load_ds_config


def make_trainer(assets: dict, run_dir: Path, *overrides: str, portable_init: str | None = None,
                 config: Path | None = None):
    """A Trainer of the demo recipe (or the recipe ``config`` on the demo's assets) at ep_size 1 in this process,
    its run files written (as train.py does)."""
    from dsmoe.trainer import Trainer

    sets = {**assets, "demo": "false", "adapter.ep_size": "1", "train.output_dir": str(run_dir),
            "train.log_every": "1", "train.eval_zero_shot": "false", "data.workers": "0", "train.epochs": "3"}
    cfg = load_config(config, [f"{k}={v}" for k, v in sets.items()] + list(overrides))
    ds = compose_ds_config(load_ds_config("zero2.json"), cfg, 1, DeviceSupport.detect())
    trainer = Trainer(cfg, ds, rank=0, world_size=1, local_rank=0, portable_init=portable_init)
    trainer.write_run_files()
    return trainer


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


