"""Sweeps: one base recipe, rows of ``--set`` overrides (a list or a grid), and seeds, run one after another with
the deepspeed launcher (``--local``) or as one Slurm job array through slurm/train.sbatch (``--slurm``).

    python -m dsmoe.sweep SPEC.yaml --dry-run            # the runs, and whether each is done
    python -m dsmoe.sweep SPEC.yaml --local [--parallel K]
    python -m dsmoe.sweep SPEC.yaml --slurm [--sbatch=--partition=gpu ...]
    python -m dsmoe.report SWEEP_DIR                     # mean +- std of each row over its seeds

A spec (``dsmoe/sweeps/*.yaml`` ship the papers' ablations and baseline comparisons)::

    name: dm_adapter_ablation          # the sweep folder's name under --out's parent (default runs/sweeps/NAME)
    config: dm_adapter/demo.yaml       # base recipe: a path (relative to the spec's folder) or a shipped recipe
    ds_config: zero2.json              # a path or a shipped DeepSpeed config
    set: [train.epochs=2]              # overrides of every run
    seeds: [1, 2, 3]                   # train.seed of each run
    ranks: 2                           # processes per run (--local: deepspeed --num_gpus; --slurm: tasks)
    sbatch: [--gpus-per-node=0]        # options of the Slurm job array (--slurm)
    rows:                              # each row: a name, its overrides, and optionally its own recipe
      - {name: one adapter, set: [adapter.router=dense]}
      - {name: lora, config: baselines/lora_demo.yaml}
    grid:                              # or (and) every combination of these values, one row each
      adapter.num_experts: [2, 4]

Each run trains into ``SWEEP_DIR/<row>/seed<k>``; ``SWEEP_DIR/sweep.json`` lists the rows and runs. Running the same
command again skips finished runs and resumes unfinished ones (``--resume auto``). A mistake in the spec, or a
recipe or override that is not a valid config, is one ``error:`` line before anything starts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsmoe.schema import ConfigError

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
RUNS_FILE = "runs.jsonl"  # the job array's runs, one JSON object a line (read by slurm/train.sbatch)
SPEC_KEYS = {"name", "config", "ds_config", "set", "seeds", "ranks", "sbatch", "rows", "grid"}
ROW_KEYS = {"name", "set", "config"}
NAME = re.compile(r"[A-Za-z0-9+(][^/\\\x00-\x1f]{0,79}")  # a row's or sweep's name: printable, no slashes


@dataclass
class SweepRun:
    row: str
    seed: int
    run_dir: Path
    config: Path
    ds_config: str
    sets: list[str]

    def train_args(self) -> list[str]:
        """``dsmoe/train.py``'s arguments for this run."""
        sets = [*self.sets, f"train.seed={self.seed}", f"train.output_dir={self.run_dir}"]
        return ["--ds_config", self.ds_config, "--config", str(self.config),
                *(a for s in sets for a in ("--set", s))]


@dataclass
class Sweep:
    name: str
    folder: Path
    ranks: int
    sbatch: list[str]
    rows: dict[str, list[SweepRun]] = field(default_factory=dict)

    @property
    def runs(self) -> list[SweepRun]:
        return [run for runs in self.rows.values() for run in runs]


def _strings(value, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise ConfigError(f"{what} must be a list of strings, not {value!r}")
    return [str(v) for v in value]


def _recipe(value, spec_dir: Path, what: str) -> Path:
    """A recipe path: as given (relative to the spec's folder), else a shipped recipe (``dsmoe/configs/...``)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must name a model YAML, not {value!r}")
    for candidate in (spec_dir / value, SHIPPED_CONFIGS / value):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{what}: {value} is neither a file (next to the spec) nor a shipped recipe under "
                      f"{SHIPPED_CONFIGS}")


def _row_folder(name: str) -> str:
    """A row's folder name: its name's letters, digits and . _ - (any run of others: one -)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "row"


def load_sweep(spec_path: Path, out: Path | None = None) -> Sweep:
    """The runs of a spec, every one checked as a config; ``ConfigError`` for any mistake."""
    from dsmoe.config import load_config
    from dsmoe.ds_config import load_ds_config

    try:
        spec = yaml.safe_load(spec_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{spec_path}: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{spec_path}: a sweep spec is a mapping (name, config, seeds, rows or grid)")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{spec_path}: unknown key {unknown[0]!r} (a spec has {', '.join(sorted(SPEC_KEYS))})")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise ConfigError(f"{spec_path}: name must be a short folder name (letters, digits, . _ -), not {name!r}")
    spec_dir = spec_path.resolve().parent
    base = _recipe(spec.get("config"), spec_dir, "config")
    ds_config = spec.get("ds_config", "zero2.json")
    if not isinstance(ds_config, str):
        raise ConfigError(f"ds_config must be a DeepSpeed JSON's path or name, not {ds_config!r}")
    ds_path = spec_dir / ds_config
    ds_config = str(ds_path.resolve()) if ds_path.is_file() else ds_config
    load_ds_config(ds_config)
    shared = _strings(spec.get("set"), "set")
    seeds = spec.get("seeds", [1])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a list of distinct non-negative integers, not {seeds!r}")
    ranks = spec.get("ranks", 1)
    if not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"ranks must be a positive integer, not {ranks!r}")

    rows: list[tuple[str, Path, list[str]]] = []
    listed = spec.get("rows") or []
    if not isinstance(listed, list):
        raise ConfigError("rows must be a list of {name, set, config}")
    for i, row in enumerate(listed):
        if not isinstance(row, dict) or set(row) - ROW_KEYS or "name" not in row:
            raise ConfigError(f"rows[{i}] must be a mapping with a name and optionally set and config, not {row!r}")
        config = _recipe(row["config"], spec_dir, f"rows[{i}].config") if "config" in row else base
        rows.append((str(row["name"]), config, _strings(row.get("set"), f"rows[{i}].set")))
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("grid must map override keys to non-empty lists of values")
    for values in itertools.product(*grid.values()) if grid else ():
        sets = [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
                for key, value in zip(grid, values)]
        rows.append((" ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in zip(grid, values)), base, sets))
    if not rows:
        raise ConfigError(f"{spec_path}: no rows (give rows, a grid, or both)")

    folder = (out or Path("runs") / "sweeps" / name).resolve()
    sweep = Sweep(name, folder, ranks, _strings(spec.get("sbatch"), "sbatch"))
    folders = [_row_folder(row) for row, _, _ in rows]
    for (row, _, _), folder_name in zip(rows, folders):
        if not NAME.fullmatch(row):
            raise ConfigError(f"row name {row!r}: up to 80 printable characters, no slashes")
        if folders.count(folder_name) > 1:
            raise ConfigError(f"two rows named {row!r} (or the same once made a folder name)")
    for (row, config, sets), folder_name in zip(rows, folders):
        try:
            load_config(config, [*shared, *sets]).check_world(ranks)
        except ConfigError as exc:
            raise ConfigError(f"row {row!r}: {exc}") from None
        sweep.rows[row] = [SweepRun(row, seed, folder / folder_name / f"seed{seed}", config, ds_config,
                                    [*shared, *sets]) for seed in seeds]
    return sweep


def is_finished(run: SweepRun) -> bool:
    """The run completed every epoch (its results.json and a checkpoint at its last epoch)."""
    from dsmoe.config import load_config
    from dsmoe.train import finished_results

    cfg = load_config(run.config, [*run.sets, f"train.output_dir={run.run_dir}"])
    return all(finished_results(stage) is not None for stage in cfg.stage_runs())


def write_index(sweep: Sweep, spec_path: Path) -> None:
    """``sweep.json``: what ``dsmoe.report`` aggregates (rows in order, each run's folder and seed)."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    index = {"name": sweep.name, "spec": str(spec_path.resolve()),
             "rows": {row: [{"seed": r.seed, "run_dir": str(r.run_dir.relative_to(sweep.folder))} for r in runs]
                      for row, runs in sweep.rows.items()}}
    (sweep.folder / "sweep.json").write_text(json.dumps(index, indent=2))


def run_locally(runs: list[SweepRun], ranks: int, parallel: int) -> int:
    """Each run with the deepspeed launcher (``parallel`` at a time); the number of runs that failed."""
    from dsmoe.launcher import free_port

    train = Path(__file__).resolve().parent / "train.py"
    waiting, active, failed = list(runs), [], 0
    while waiting or active:
        while waiting and len(active) < parallel:
            run = waiting.pop(0)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run.run_dir / "sweep.log", "a")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                   str(free_port()), str(train), *run.train_args()]
            print(f"[sweep] start {run.row} seed {run.seed} -> {run.run_dir}", flush=True)
            active.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for entry in list(active):
            run, proc, log = entry
            if proc.poll() is None:
                continue
            active.remove(entry)
            log.close()
            ok = proc.returncode == 0
            failed += not ok
            outcome = "done" if ok else f"FAILED (exit {proc.returncode}; log {run.run_dir / 'sweep.log'})"
            print(f"[sweep] {outcome}: {run.row} seed {run.seed}", flush=True)
    return failed


def submit_array(sweep: Sweep, runs: list[SweepRun], extra: list[str]) -> str:
    """One Slurm job array through slurm/train.sbatch, one task per run; returns the job id."""
    root = Path(__file__).resolve().parent.parent
    script = root / "slurm" / "train.sbatch"
    if not script.is_file():
        raise ConfigError(f"--slurm needs slurm/train.sbatch of a dsmoe checkout ({script} is missing)")
    every = sweep.runs
    lines = [json.dumps({"run_dir": str(r.run_dir), "config": str(r.config), "ds_config": r.ds_config,
                         "set": [*r.sets, f"train.seed={r.seed}"]}) for r in every]
    (sweep.folder / RUNS_FILE).write_text("\n".join(lines) + "\n")
    indices = ",".join(str(every.index(r)) for r in runs)
    env = {**os.environ, "SWEEP_RUNS": str(sweep.folder / RUNS_FILE), "DSMOE_ROOT": str(root)}
    cmd = ["sbatch", "--parsable", f"--array={indices}", f"--job-name=sweep-{_row_folder(sweep.name)}",
           f"--ntasks={sweep.ranks}", f"--output={sweep.folder}/slurm-%A_%a.out", *sweep.sbatch, *extra,
           str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def array_task(runs_file: Path, index: int) -> None:
    """slurm/train.sbatch's side: print the run dir, recipe, DeepSpeed config and --set arguments of task
    ``index``, each followed by NUL (values never reach a shell as code)."""
    lines = runs_file.read_text().splitlines()
    if not 0 <= index < len(lines):
        raise ConfigError(f"{runs_file} has {len(lines)} runs; task {index} is not one of them")
    run = json.loads(lines[index])
    values = [run["run_dir"], run["config"], run["ds_config"], *(a for s in run["set"] for a in ("--set", s))]
    if any("\0" in v for v in values):
        raise ConfigError(f"{runs_file}: task {index} has a NUL in its arguments")
    sys.stdout.write("".join(f"{v}\0" for v in values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsmoe.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, nargs="?", help="the sweep's YAML")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--dry-run", action="store_true", help="print the runs and whether each is finished")
    how.add_argument("--local", action="store_true", help="run them here with the deepspeed launcher")
    how.add_argument("--slurm", action="store_true", help="submit one Slurm job array (slurm/train.sbatch)")
    parser.add_argument("--out", type=Path, default=None, help="the sweep folder (default runs/sweeps/<name>)")
    parser.add_argument("--parallel", type=int, default=1, help="--local: runs at a time (default 1)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="--slurm: an sbatch option for the array (repeatable), e.g. --sbatch=--partition=gpu")
    parser.add_argument("--array-task", nargs=2, metavar=("RUNS_FILE", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.array_task:
            array_task(Path(args.array_task[0]), int(args.array_task[1]))
            return 0
        if args.spec is None:
            raise ConfigError("give the sweep's YAML")
        if not (args.dry_run or args.local or args.slurm):
            raise ConfigError("say how to run it: --local, --slurm or --dry-run")
        if args.parallel < 1:
            raise ConfigError("--parallel must be at least 1")
        sweep = load_sweep(args.spec, args.out)
        todo = [run for run in sweep.runs if not is_finished(run)]
        for run in sweep.runs:
            state = "to run" if run in todo else "finished"
            print(f"{run.row:<32} seed {run.seed:<4} {state:<9} {run.run_dir}")
        print(f"{len(sweep.runs)} runs in {len(sweep.rows)} rows; {len(todo)} to run; folder {sweep.folder}")
        if args.dry_run:
            return 0
        write_index(sweep, args.spec)
        if not todo:
            return 0
        if args.slurm:
            job = submit_array(sweep, todo, args.sbatch)
            print(f"submitted job array {job}: {len(todo)} tasks (logs {sweep.folder}/slurm-{job}_<task>.out)")
            return 0
        failed = run_locally(todo, sweep.ranks, args.parallel)
        print(f"{len(todo) - failed} of {len(todo)} runs finished; the table: python -m dsmoe.report {sweep.folder}")
        return 1 if failed else 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
