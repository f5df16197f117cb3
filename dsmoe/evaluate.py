"""Evaluate a saved run: ``python -m dsmoe.evaluate --checkpoint runs/x [--config model.yaml] [--split test]``.

Runs in one process without a launcher (or under ``deepspeed`` with several); the experts saved at any
ep_size are loaded into the current world. Without ``--config`` the run directory's config.yaml is used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsmoe.checkpoint.folder import check_checkpoint, run_config_for
from dsmoe.cli import RUN_CONFIG, add_config_arguments, add_launcher_arguments
from dsmoe.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, RUN_CONFIG)
    add_launcher_arguments(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoints directory, tag directory or exported .safetensors file")
    parser.add_argument("--split", default=None, help="split to score (default: data.test_split)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    config = args.config or run_config_for(args.checkpoint)
    try:
        cfg = load_config(config, args.set)
        check_checkpoint(args.checkpoint)
        cfg.check_models()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from dsmoe.distributed import process_group

    with process_group(cfg.train) as (rank, _, local_rank):
        metrics = evaluate_checkpoint(cfg, args.checkpoint, args.split or cfg.data.test_split, local_rank)
        if rank == 0:
            text = json.dumps(metrics, indent=2)
            print(text)
            if args.output:
                Path(args.output).write_text(text)
    return 0


def evaluate_checkpoint(cfg, checkpoint: str | Path, split: str, local_rank: int) -> dict[str, float]:
    """Score ``split`` with a saved run's adapters (any world size / ep_size); needs the process group."""
    from dsmoe.engine import build_inference_engine, device_for
    from dsmoe.evaluator import Evaluator

    method, engine, source = build_inference_engine(cfg, checkpoint)
    evaluator = Evaluator(cfg, engine, device_for(local_rank))
    metrics = evaluator.evaluate(method, split)
    return {"checkpoint": source, "split": split, **metrics, **evaluator.completeness(split)}


if __name__ == "__main__":
    sys.exit(main())
