"""Starting real training processes from tests: the deepspeed launcher with 2 CPU ranks, and their outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from dsmoe.config import REPO_ROOT

LAUNCH_TIMEOUT = 600


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_cmd(assets: dict, run_dir: Path, port: int, *overrides: str, resume: str = "auto",
               ds_config: str = "zero2.json", nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    sets = {**assets, "train.output_dir": str(run_dir), "train.log_every": "1", "train.epochs": "3",
            "train.eval_zero_shot": "false", "data.workers": "1"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    for o in overrides:
        args += ["--set", o]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            str(REPO_ROOT / "dsmoe" / "train.py"), "--ds_config", str(REPO_ROOT / "ds_configs" / ds_config),
            "--resume", resume, *args, *extra]


def run_ok(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env or launch_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def cpu_fp16_env() -> dict[str, str]:
    """launch_env() with DeepSpeed's CPU accelerator accepting fp16 (tests/shims/cpu_fp16/sitecustomize.py)."""
    env = launch_env()
    shim = REPO_ROOT / "tests" / "shims" / "cpu_fp16"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    return env


def logged_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logged_records(run_dir) if "loss" in r}


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()
