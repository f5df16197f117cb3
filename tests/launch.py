"""Starting real training processes from tests: the deepspeed launcher with 2 CPU ranks, and their outputs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from dsmoe.launcher import free_port  # noqa: F401  (tests take their launchers' ports from here)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 600
DASD_DEMO = REPO_ROOT / "dsmoe" / "configs" / "dasd" / "demo.yaml"


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-compiled shared-memory op is cached: one directory per virtual environment, so
    checkouts on one host neither rebuild each other's op nor wait on each other's build lock."""
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions" / f"venv-{venv}")


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_EXTENSIONS_DIR"] = extensions_dir()
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
