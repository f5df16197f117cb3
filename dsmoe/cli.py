"""Shared command-line plumbing of the entry points (argument parsing only: no heavy imports)."""
from __future__ import annotations

import argparse

from dsmoe.ds_config import DEFAULT


RUN_CONFIG = "the run's config.yaml, or <name>.yaml beside exported adapters"


def add_config_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--config`` (``default`` says what is read without it) and ``--set``."""
    parser.add_argument("--config", default=None, help=f"model YAML (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set train.epochs=2 (repeatable)")


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """What the deepspeed launcher appends (--local_rank=N), accepted and hidden."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Training's: the config, the launcher's flag and the DeepSpeed JSON."""
    add_config_arguments(parser, "the embedded demo, dsmoe/configs/dm_adapter/demo.yaml")
    add_launcher_arguments(parser)
    # DeepSpeed's own flag for the JSON is --deepspeed_config.
    parser.add_argument("--ds_config", "--ds-config", "--deepspeed_config", dest="ds_config", default=str(DEFAULT),
                        help="DeepSpeed JSON config: a path, or the name of a shipped one such as zero2_bf16.json "
                             "(default: zero2.json)")
