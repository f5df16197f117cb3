"""Evaluate a saved run: ``python -m dsmoe.evaluate --checkpoint runs/x [--config model.yaml] [--split test]``.

Runs in one process without a launcher (or under ``deepspeed`` with several); the experts saved at any
ep_size are loaded into the current world. Without ``--config`` the run directory's config.yaml is used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsmoe.cli import RUN_CONFIG, add_config_arguments, add_launcher_arguments  # noqa: E402
from dsmoe.checkpoint import check_checkpoint, run_config_for  # noqa: E402
from dsmoe.config import ConfigError, load_config  # noqa: E402


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

    from dsmoe import distributed
    from dsmoe.evaluation import evaluate_checkpoint
    from dsmoe.faults import FaultWatch

    rank, world_size, local_rank = distributed.init_distributed(cfg.train.collective_timeout,
                                                                cfg.train.threads_per_rank)
    watch = FaultWatch(rank, world_size)
    try:
        metrics = evaluate_checkpoint(cfg, args.checkpoint, args.split or cfg.data.test_split, local_rank)
    except BaseException as exc:  # noqa: BLE001 - every failure ends every rank (see dsmoe.faults)
        watch.fail(exc)
    watch.stop()
    if rank == 0:
        text = json.dumps(metrics, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
