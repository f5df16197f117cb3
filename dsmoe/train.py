"""Train a method: ``deepspeed dsmoe/train.py --ds_config ds_configs/zero2.json [--config model.yaml]``
(also ``deepspeed --module dsmoe.train``, ``python -m dsmoe.train`` or ``dsmoe-train`` for one process).

Without ``--config`` it runs the embedded demo (synthetic data, tiny CLIP, experts over the ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script (deepspeed dsmoe/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsmoe.checkpoint.folder import complete_tag, is_portable, read_marker, resume_point  # noqa: E402
from dsmoe.cli import add_common_arguments  # noqa: E402
from dsmoe.config import ConfigError, RunConfig, load_config  # noqa: E402
from dsmoe.ds_config import load_ds_config  # noqa: E402
from dsmoe.launcher import launched_world_size  # noqa: E402
from dsmoe.data.format import ManifestError, read_split  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default): continue the newest complete checkpoint of train.output_dir if "
                             "there is one; 'none': start fresh; or a run/checkpoint directory")
    parser.add_argument("--init-from", "--init_from", dest="init_from", default=None,
                        help="start from these trainable weights (a file written by python -m dsmoe.export, or a "
                             "run / checkpoint directory) at any ep_size and world size; optimiser state fresh "
                             "(sets train.init_from)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the run's settings differ from its checkpoint's (they are listed)")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, world_size: int) -> list[tuple[RunConfig, dict]]:
    """The runs to do, each with its composed DeepSpeed config; every user mistake is a ``ConfigError`` (or a
    ``FileNotFoundError`` for missing shards) raised here, before any process group starts."""
    from dsmoe.ds_config import DeviceSupport, compose_ds_config

    cfg = load_config(args.config, args.set)
    if os.environ.get("RANK", "0") == "0" and (note := _copied_run_note(args.config, cfg)):
        print(f"[dsmoe] {note}", flush=True)
    if args.init_from:
        cfg.train.init_from = args.init_from
    cfg.make_paths_absolute()  # the run's files then work from any directory
    if not cfg.demo:  # the demo builds its models after this
        cfg.check_models()
    ds_json = load_ds_config(args.ds_config)
    cfg.check_world(world_size)
    stages = cfg.stage_runs()
    for stage in stages:
        if args.resume == "none" and complete_tag(Path(stage.train.output_dir) / "checkpoints") is not None:
            raise ConfigError(f"{stage.train.output_dir} already holds checkpoints: use --resume auto to "
                              f"continue, or choose another train.output_dir")
    if not cfg.demo:  # the demo writes its shards after start-up
        read_split(cfg.data.shards, cfg.data.train_split, reads=cfg.data.remote)
        for split in filter(None, (cfg.data.val_split, cfg.data.test_split)):
            read_split(cfg.data.eval_shards or cfg.data.shards, split, reads=cfg.data.remote)
    device = DeviceSupport.detect()  # the first heavy import (torch, DeepSpeed)
    return [(stage, compose_ds_config(ds_json, stage, world_size, device)) for stage in stages]


def _stop_before_training(signum, frame) -> None:
    """Until a Trainer watches for stop signals there is nothing to save: end at once with 128 + the signal's
    number, as a stopped run does (dying of the signal would make the deepspeed launcher exit 256 - signal)."""
    sys.stderr.write(f"[dsmoe] stopped by {signal.Signals(signum).name} before training started\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _copied_run_note(config: str | None, cfg: RunConfig) -> str | None:
    """A run folder's own config.yaml names the folder it was written in: used from a moved or copied folder, say
    which folder this run trains in (None otherwise)."""
    if not config or Path(config).name != "config.yaml":
        return None
    here = Path(config).resolve().parent
    there = Path(cfg.train.output_dir).expanduser().resolve()
    if there == here or not ((here / "checkpoints").is_dir() or (here / "metrics.jsonl").is_file()):
        return None
    return (f"note: {config} is the config of the run folder {here}, but it names train.output_dir {there}: this "
            f"run trains in {there} (to continue the run in {here}, add --set train.output_dir={here})")


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_training)
    args = parse_args(argv)
    try:
        world_size = launched_world_size()
        stages = prepare(args, world_size)
    except (ConfigError, FileNotFoundError, ManifestError) as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if stages[0][0].demo:  # before the process group: no collective waits while the assets are built
        from dsmoe.demo import prepare_demo_once

        prepare_demo_once(stages[0][0])

    from dsmoe.distributed import process_group

    with process_group(stages[0][0].train) as (rank, world_size, local_rank):
        assert world_size == launched_world_size(), "the process group disagrees with the launcher's WORLD_SIZE"
        return run(stages, args.resume, rank, world_size, local_rank, args.allow_config_change)


def finished_results(cfg: RunConfig) -> str | None:
    """The results table of a run whose newest checkpoint completed every epoch, else None."""
    from dsmoe.evaluator import format_results
    from dsmoe.methods.registry import get_method

    root = Path(cfg.train.output_dir)
    tag = complete_tag(root / "checkpoints")
    results = root / "results.json"
    if tag is None or not results.is_file():
        return None
    if read_marker(root / "checkpoints", tag)["progress"]["epoch"] < cfg.train.epochs:
        return None
    return format_results(json.loads(results.read_text()), get_method(cfg).report_metrics, root)


def run(stages: list[tuple[RunConfig, dict]], resume: str, rank: int, world_size: int, local_rank: int,
        allow_config_change: bool = False) -> int:
    """Train each run in turn (one, or a method's stages), each from its checkpoint, or ``train.init_from``; the
    exit code: 0, or 128 + the signal that stopped the run (a requeue for Slurm is 0)."""
    from dsmoe.run_lock import RunLock
    from dsmoe.trainer import Trainer

    for stage, ds_config in stages:
        start = stage.train.init_from
        if resume == "auto" and (done := finished_results(stage)) is not None:
            if rank == 0:
                print(f"[dsmoe] {stage.train.output_dir} finished all {stage.train.epochs} epochs:\n{done}")
            continue
        lock = RunLock(stage.train.output_dir) if rank == 0 else None
        note = lock.acquire() if lock else None  # before anything is written into the folder
        if note:
            print(f"[dsmoe] {note}", flush=True)
        try:
            resumable = resume_point(resume, Path(stage.train.output_dir) / "checkpoints") is not None
            portable = start if start and is_portable(start) and not resumable else None
            trainer = Trainer(stage, ds_config, rank, world_size, local_rank, portable_init=portable,
                              allow_config_change=allow_config_change)
            trainer.write_run_files()
            if not trainer.resume(None if resume == "none" else resume) and start and not portable:
                trainer.init_from(start)
            outcome = trainer.train()
        finally:
            if lock:
                lock.release()
        if outcome.get("preempted"):
            return outcome.get("exit_code", 0)
    if len(stages) > 1 and rank == 0:
        print(stage_summary([stage for stage, _ in stages]))
    return 0


def stage_summary(stages: list[RunConfig]) -> str:
    """One table over the stages: the untrained model, then the test scores after each stage; then what the last
    stage trained and where to look next."""
    from dsmoe.evaluator import run_summary
    from dsmoe.methods.registry import get_method

    folders = [Path(s.train.output_dir) for s in stages]
    results = [json.loads((folder / "results.json").read_text()) for folder in folders]
    keys = get_method(stages[-1]).report_metrics
    rows = [("untrained", results[0].get("zero_shot"))] + [(f"after {folder.name}", r["test"])
                                                          for folder, r in zip(folders, results)]
    lines = [f"{'test split':<14}" + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{name:<14}" + "".join(f"{m[k]:9.2f}" if m and k in m else f"{'-':>9}" for k in keys)
              for name, m in rows]
    lines.append(run_summary(results[-1], folders[-1]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
