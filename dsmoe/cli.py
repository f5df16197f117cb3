"""Shared command-line plumbing of the entry points."""
from __future__ import annotations

import argparse

from dsmoe.config import REPO_ROOT


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="model YAML (default: the embedded demo, dsmoe/configs/dm_adapter/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set train.epochs=2 (repeatable)")
    # The deepspeed launcher appends --local_rank=N; DeepSpeed's own flag for the JSON is --deepspeed_config.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--ds_config", "--ds-config", "--deepspeed_config", dest="ds_config",
                        default=str(REPO_ROOT / "ds_configs" / "zero2.json"), help="DeepSpeed JSON config")
