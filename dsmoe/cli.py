"""Shared command-line plumbing of the entry points (argument parsing only: no heavy imports)."""
from __future__ import annotations

import argparse

from dsmoe.ds_config import DEFAULT


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="model YAML (default: the embedded demo, dsmoe/configs/dm_adapter/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set train.epochs=2 (repeatable)")
    # The deepspeed launcher appends --local_rank=N; DeepSpeed's own flag for the JSON is --deepspeed_config.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--ds_config", "--ds-config", "--deepspeed_config", dest="ds_config", default=str(DEFAULT),
                        help="DeepSpeed JSON config: a path, or the name of a shipped one such as zero2_bf16.json "
                             "(default: zero2.json)")
