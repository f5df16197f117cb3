"""Train a method: ``deepspeed dsmoe/train.py --ds_config ds_configs/zero2.json [--config model.yaml]``.

Without ``--config`` it runs the embedded demo (synthetic data, tiny CLIP, experts over the ranks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script (deepspeed dsmoe/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsmoe.cli import add_common_arguments  # noqa: E402
from dsmoe.config import ConfigError, load_config, load_ds_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default): continue the newest complete checkpoint of train.output_dir if "
                             "there is one; 'none': start fresh; or a run/checkpoint directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # user mistakes in the YAML or JSON fail here, before any process group starts
        cfg = load_config(args.config, args.set)
        ds_config = load_ds_config(args.ds_config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from dsmoe import distributed
    from dsmoe.engine import Trainer, complete_tag

    rank, world_size, local_rank = distributed.init_distributed()
    try:
        try:
            cfg.check_world(world_size)
        except ConfigError as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return 2
        if cfg.demo:
            if rank == 0:
                from dsmoe.demo import prepare_demo

                prepare_demo(cfg.demo_dir, cfg.model)
            distributed.barrier()
        trainer = Trainer(cfg, ds_config, rank, world_size, local_rank)
        if args.resume == "none" and complete_tag(trainer.ckpt_root) is not None:
            if rank == 0:
                print(f"error: {trainer.run_dir} already holds checkpoints: use --resume auto to continue, or "
                      f"choose another train.output_dir", file=sys.stderr)
            return 2
        trainer.write_run_files()
        trainer.resume(None if args.resume == "none" else args.resume)
        trainer.train()
        return 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
