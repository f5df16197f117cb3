"""Export a run's trained adapters: ``python -m dsmoe.export --checkpoint runs/x --output adapters.safetensors``.

Writes every trainable tensor (all experts gathered, routers, prompts) to one safetensors file and the resolved
config next to it (``adapters.yaml``). ``train.py --init-from adapters.safetensors`` starts training from it at any
ep_size and world size; ``python -m dsmoe.evaluate --checkpoint adapters.safetensors`` scores it in one process.
"""
from __future__ import annotations

import argparse
import sys

from dsmoe.checkpoint.folder import check_checkpoint, run_config_for
from dsmoe.cli import RUN_CONFIG, add_config_arguments
from dsmoe.config import ConfigError, load_config
from dsmoe.launcher import launched_world_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints directory or tag directory")
    parser.add_argument("--output", required=True, help="the .safetensors file to write (config: same name, .yaml)")
    add_config_arguments(parser, RUN_CONFIG)
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        print("error: --output must end in .safetensors", file=sys.stderr)
        return 2
    config = args.config or run_config_for(args.checkpoint)
    try:
        cfg = load_config(config, args.set)
        if launched_world_size() != 1:
            raise ConfigError("run the export in a single process (python -m dsmoe.export)")
        check_checkpoint(args.checkpoint)
        cfg.check_models()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from dsmoe.distributed import process_group
    from dsmoe.engine import build_inference_engine
    from dsmoe.portable import save_portable

    with process_group(cfg.train):
        _, engine, source = build_inference_engine(cfg, args.checkpoint, ep_size=1)
        path = save_portable(engine.module, cfg, args.output, source)
    print(f"wrote {path} and {path.with_suffix('.yaml')} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
