"""What a run was: the code that ran it (dsmoe version, git commit), where and when; and how a resumed run's
config differs from the one its checkpoint was trained with."""
from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path

# Keys a resumed run may change without changing what is trained: how long, how often, where, how many ranks.
RUN_CONTROL = ("demo", "demo_dir", "wandb.", "tensorboard.", "data.workers", "data.max_bad_share", "data.max_bad_count",
               "data.remote.", "data.checksums",
               "adapter.ep_size", "train.max_steps", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.eval_batch_size", "train.collective_timeout",
               "train.threads_per_rank", "train.init_from", "train.eval_zero_shot", "train.output_dir")


def _git_commit() -> str | None:
    """The commit of the checkout dsmoe runs from (None when installed from a wheel)."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() + ("+changes" if dirty else "") if proc.returncode == 0 else None


def run_facts(world_size: int) -> dict:
    try:
        version = metadata.version("dsmoe")
    except metadata.PackageNotFoundError:
        version = None
    return {"dsmoe_version": version, "git_commit": _git_commit(), "world_size": world_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(a, b) -> bool:
    if a == b:
        return True
    # a relative path saved by an older run and its absolute form now
    return isinstance(a, str) and isinstance(b, str) and Path(a).absolute() == Path(b).absolute()


def config_changes(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every setting that differs, run-control keys (``RUN_CONTROL``) left out."""
    before, after = _flat(saved), _flat(now)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(RUN_CONTROL) or key in RUN_CONTROL:
            continue
        if key in before and key in after and _same(before[key], after[key]):
            continue
        changes.append(f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}")
    return changes
