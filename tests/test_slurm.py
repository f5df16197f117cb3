"""Slurm for real: a one-host Slurm started by tools/slurm_local.sh runs slurm/train.sbatch and slurm/eval.sbatch.

Two CPU tasks per job (srun starts one ``python dsmoe/train.py`` per task, dsmoe maps SLURM_PROCID & co), the demo
recipe shrunk with --set overrides, and a job preempted with SIGUSR1 that requeues itself and resumes its run
directory under the same job id.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO_ROOT

pytestmark = pytest.mark.integration

SETUP = REPO_ROOT / "tools" / "slurm_local.sh"
TRAIN = REPO_ROOT / "slurm" / "train.sbatch"
EVAL = REPO_ROOT / "slurm" / "eval.sbatch"
# Two CPU tasks, no GPUs: the scripts' GPU defaults overridden on the command line, as on a CPU partition.
CPU_TASKS = ["--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------------------------
# a running Slurm and jobs on it


@pytest.fixture(scope="module")
def slurm():
    """Slurm up on this host (installed and started by tools/slurm_local.sh); yields the list of submitted jobs,
    cancelled at the end."""
    if os.geteuid() != 0 and shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed and installing it needs root (run: sudo bash tools/slurm_local.sh)")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 3:  # the script's code for "cannot be installed here" (no root, no apt, apt failed)
        pytest.skip(f"Slurm cannot be installed on this machine: {output[-600:]}")
    assert proc.returncode == 0, f"tools/slurm_local.sh failed:\n{output[-4000:]}"
    jobs: list[str] = []
    yield jobs
    for job in jobs:  # leave no job behind (the daemons keep running)
        subprocess.run(["scancel", job], capture_output=True)


@pytest.fixture(scope="module")
def slurm_demo(tmp_path_factory) -> dict[str, str]:
    """The demo's synthetic shards and tiny CLIP, built once in a temporary directory, as conftest.demo_assets but
    without the tiny CLIP's contrastive pre-training (these tests score no model)."""
    import dsmoe.demo.models
    from conftest import person_demo_assets

    root = tmp_path_factory.mktemp("slurm-demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dsmoe.demo.models, "pretrain_clip", lambda *args, **kwargs: None)
        assets = person_demo_assets(root)
    assert (root / "tiny-clip" / "config.json").is_file() and (root / "shards" / "test.manifest.json").is_file()
    return assets


def slurm_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it to the job): this venv's python and no launcher,
    Slurm or sbatch variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    # the JIT-built shared-memory op, cached per virtual environment as in conftest.dist_env
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" /
                                               f"venv-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"))
    env.update(extra)
    return env


def submit(jobs: list[str], script: Path, options: list[str], args: list[str], **env: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=REPO_ROOT,
                          env=slurm_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    job = proc.stdout.strip().split(";")[0]
    assert job.isdigit(), proc.stdout
    jobs.append(job)
    return job


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (the controller keeps finished jobs for MinJobAge)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", out))


def wait_for(job: str, output: Path, until=lambda info: info.get("JobState") in FINAL_STATES,
             timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()[-6000:] if output.is_file() else "(no output file)"
    pytest.fail(f"job {job} still {info.get('JobState')} after {timeout:.0f}s; its output:\n{log}")


def assert_completed(info: dict[str, str], output: Path) -> None:
    log = output.read_text()[-6000:] if output.is_file() else "(no output file)"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"job {info.get('JobId')}: {info.get('JobState')} exit {info.get('ExitCode')}\n{log}"


def demo_args(assets: dict[str, str], *overrides: str) -> list[str]:
    sets = {**assets, "train.epochs": "2", "train.eval_zero_shot": "false", "train.log_every": "1",
            "data.workers": "1"}
    pairs = [f"{k}={v}" for k, v in sets.items()] + list(overrides)
    return [a for pair in pairs for a in ("--set", pair)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


# ---------------------------------------------------------------------------------------------------------------


def test_sbatch_scripts_ask_for_requeue_and_a_warning_signal():
    """What preemption relies on, in the #SBATCH header (a time-limit warning cannot be waited for in a test)."""
    header = [line.split(None, 1)[1].strip() for line in TRAIN.read_text().splitlines()
              if line.startswith("#SBATCH ")]
    assert "--requeue" in header
    signal = [h for h in header if h.startswith("--signal=")]
    assert len(signal) == 1 and re.fullmatch(r"--signal=USR1@\d+", signal[0]), signal  # to the tasks, not B:
    assert "--open-mode=append" in header  # a requeued job appends to its log instead of truncating it
    # one task per GPU with GPUs requested per node (overridable with --gpus-per-node=0), no hard --gres
    assert not any(h.startswith(("--gres", "--gpus-per-task")) for h in header)
    per_node = {h.split("=")[0]: h.split("=")[1] for h in header if h.startswith(("--gpus-per-node=",
                                                                                  "--ntasks-per-node="))}
    assert per_node["--gpus-per-node"] == per_node["--ntasks-per-node"], per_node


def test_train_then_eval_jobs(slurm, slurm_demo, tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "train-%j.out"
    job = submit(slurm, TRAIN, [f"--output={out}", "--job-name=dsmoe-test", *CPU_TASKS],
                 demo_args(slurm_demo, "train.max_steps=4", "train.checkpoint_every=2"), RUN_DIR=str(run_dir))
    out = tmp_path / f"train-{job}.out"
    info = wait_for(job, out)
    assert_completed(info, out)
    assert info["NumTasks"] == "2" and info["Requeue"] == "1" and info["Restarts"] == "0"
    log = out.read_text()
    assert f"train.sbatch: job {job} (restart 0)" in log and f"run dir {run_dir}" in log
    assert "world size 2, ep_size 2" in log  # two srun tasks became one process group of two ranks
    assert "resume auto: no complete checkpoint yet" in log

    # checkpointing: the last step's checkpoint complete and pointed at
    assert latest_tag(run_dir) == "step00000004"
    assert (run_dir / "checkpoints" / "step00000004" / "COMPLETE").is_file()
    records = metrics(run_dir)
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4]
    assert not any(r.get("event") == "preempted" for r in records)
    # evaluation at the end of training
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    test = results["test"]
    assert test["images"] == 72 and test["captions"] == 144
    assert all(0.0 <= test[k] <= 100.0 for k in ("R1", "R5", "R10", "mAP", "mINP"))
    assert [r for r in records if r.get("event") == "test"][-1]["R1"] == pytest.approx(test["R1"])

    # the eval script on the run directory: one task, the saved experts gathered, the same test scores
    eval_out = tmp_path / "eval-%j.out"
    eval_json = tmp_path / "eval.json"
    job = submit(slurm, EVAL, [f"--output={eval_out}", "--gpus-per-node=0", "--cpus-per-task=1"], [],
                 RUN_DIR=str(run_dir), EVAL_OUTPUT=str(eval_json))
    eval_out = tmp_path / f"eval-{job}.out"
    info = wait_for(job, eval_out)
    assert_completed(info, eval_out)
    assert info["NumTasks"] == "1"
    scores = json.loads(eval_json.read_text())
    assert scores["split"] == "test" and scores["checkpoint"].endswith("step00000004")
    assert scores["images"] == 72 and scores["captions"] == 144
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert scores[key] == pytest.approx(test[key], abs=0.01), key  # (1 vs 2 ranks: float rounding)


def test_preempted_job_requeues_itself_and_resumes(slurm, slurm_demo, tmp_path):
    """SIGUSR1 to the tasks (what --signal=USR1@N sends before the time limit): every rank saves, rank 0 requeues
    the job, and the job, started again under the same id, resumes its run directory (keyed by the job id)."""
    out = tmp_path / "preempt-%j.out"
    name = f"dsmoe-test-{os.getpid()}"
    job = submit(slurm, TRAIN, [f"--output={out}", f"--job-name={name}", *CPU_TASKS],
                 demo_args(slurm_demo, "train.max_steps=30", "train.checkpoint_every=2"))
    out = tmp_path / f"preempt-{job}.out"
    run_dir = REPO_ROOT / "runs" / f"{name}-{job}"  # the script's default: runs/<job name>-<job id>
    try:
        # signal once training is under way (handlers installed, a first checkpoint written)
        deadline = time.time() + JOB_TIMEOUT
        while not (run_dir / "checkpoints" / "latest").is_file():
            info = job_info(job)
            assert info.get("JobState") not in FINAL_STATES, out.read_text()[-6000:] if out.is_file() else info
            assert time.time() < deadline, f"no checkpoint after {JOB_TIMEOUT}s: {info}"
            time.sleep(0.2)
        # without --full/--batch, scancel signals the tasks of the job's steps (the python ranks), not the batch shell
        proc = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

        info = wait_for(job, out)  # requeued, the job is PENDING then RUNNING again: not final in between
        assert_completed(info, out)
        assert info["Restarts"] == "1", f"not requeued: {info}"  # the same job id ran a second time

        records = metrics(run_dir)
        preempted = [r for r in records if r.get("event") == "preempted"]
        assert len(preempted) == 1 and preempted[0]["outcome"] == f"requeue requested for Slurm job {job}", preempted
        saved = preempted[0]["step"]
        assert 2 <= saved < 30
        log = out.read_text()  # both runs, appended (--open-mode=append)
        assert f"train.sbatch: job {job} (restart 0)" in log and f"train.sbatch: job {job} (restart 1)" in log
        assert f"resumed from {run_dir}/checkpoints/step{saved:08d}: " in log, log[-6000:]  # paths made absolute
        assert log.index("(restart 1)") < log.index("resumed from")
        # each step trained once: the second run continued after the saved step instead of starting over
        steps = [r["step"] for r in records if "loss" in r]
        assert sorted(steps) == list(range(1, 31)), steps
        assert latest_tag(run_dir) == "step00000030"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["test"]["captions"] == 144
        assert [r for r in records if r.get("event") == "test"], "no test evaluation after resuming"
        assert records.index(preempted[0]) < max(i for i, r in enumerate(records) if r.get("event") == "test")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)
