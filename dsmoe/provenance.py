"""What a run was: the code that ran it (dsmoe version, git commit), where and when."""
from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path

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
