"""Slurm for real, on two nodes: tools/slurm_local.sh starts a Slurm whose nodes dsmoe-n1 and dsmoe-n2 each live in
network and UTS namespaces of their own on this machine, so ranks on different nodes talk over a (virtual) network,
as on a cluster. slurm/train.sbatch and slurm/eval.sbatch run on them as users submit them: the demo recipes with
each MoE layer's experts on both nodes (srun starts one ``python dsmoe/train.py`` per task, dsmoe maps
SLURM_PROCID & co), a job preempted with SIGUSR1 that requeues itself, a lost node, and resumes at other sizes.
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

from dsmoe.checkpoint.folder import resolve_checkpoint
from dsmoe.launcher import free_port
from launch import DASD_DEMO, REPO_ROOT, logged_losses

pytestmark = pytest.mark.integration

SETUP = REPO_ROOT / "tools" / "slurm_local.sh"
TRAIN = REPO_ROOT / "slurm" / "train.sbatch"
EVAL = REPO_ROOT / "slurm" / "eval.sbatch"
# CPU tasks, no GPUs: the scripts' GPU defaults overridden on the command line, as on a CPU partition.
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", *CPU]  # one rank on each node
ONE_NODE = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", *CPU]  # both ranks on one node
ALONE = ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", *CPU]  # a single rank
NODES = ("dsmoe-n1", "dsmoe-n2")
FIRST_NODE_ADDRESS = "10.213.0.11"  # tools/slurm_local.sh: node i at 10.213.0.<10+i>
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------------------------
# a running Slurm and jobs on it


@pytest.fixture(scope="module")
def slurm():
    """A two-node Slurm on this host (installed and started by tools/slurm_local.sh); yields the list of submitted
    jobs, cancelled at the end."""
    if os.geteuid() != 0:
        pytest.skip("a Slurm of several nodes needs root (network namespaces): sudo SLURM_LOCAL_NODES=2 bash "
                    "tools/slurm_local.sh")
    proc = start_cluster()
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 3:  # the script's code for "cannot be installed here" (no root, no apt, apt failed)
        pytest.skip(f"Slurm cannot be installed on this machine: {output[-600:]}")
    assert proc.returncode == 0, f"tools/slurm_local.sh failed:\n{output[-4000:]}"
    jobs: list[str] = []
    yield jobs
    for job in jobs:  # leave no job behind
        subprocess.run(["scancel", job], capture_output=True)
    if "already running" not in output:  # the nodes this module started go: daemons, namespaces, links
        subprocess.run(["bash", str(SETUP), "--down"], capture_output=True, timeout=120)


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


def start_cluster() -> subprocess.CompletedProcess:
    """tools/slurm_local.sh for two nodes: starts them, or whatever of them is gone (a lost node)."""
    return subprocess.run(["bash", str(SETUP)], env={**os.environ, "SLURM_LOCAL_NODES": str(len(NODES))},
                          capture_output=True, text=True, timeout=900)


def node_pids(node: str, command: str | None = None) -> list[int]:
    """The processes in a node's network namespace (those whose executable is ``command``)."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    pids = [int(pid) for pid in out]
    if command is None:
        return pids
    named = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith(command):
                named.append(pid)
        except OSError:
            pass
    return named


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


def submit(jobs: list[str], script: Path | str, options: list[str], args: list[str], **env: str) -> str:
    """sbatch a script with its arguments (or ``--wrap`` and a command line)."""
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
            "data.workers": "1", "train.checkpoint_every": "2"}
    pairs = [f"{k}={v}" for k, v in sets.items()] + list(overrides)
    return [a for pair in pairs for a in ("--set", pair)]


def wait_for_checkpoint(job: str, run_dir: Path, output: Path, after: str = "") -> str:
    """The tag of the job's first complete checkpoint newer than ``after`` (waited for while the job runs)."""
    deadline = time.time() + JOB_TIMEOUT
    while True:
        tag = latest_tag(run_dir) if (run_dir / "checkpoints" / "latest").is_file() else ""
        if tag > after:
            return tag
        info = job_info(job)
        assert info.get("JobState") not in FINAL_STATES, output.read_text()[-6000:] if output.is_file() else info
        assert time.time() < deadline, f"no checkpoint after {JOB_TIMEOUT}s: {info}"
        time.sleep(0.2)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_node_run(slurm, slurm_demo, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """The DM-Adapter demo recipe (shrunk) trained by one rank on each node, each MoE layer's 6 experts split 3 + 3
    between the nodes (ep_size 2): its run directory, its log and its job's record."""
    root = tmp_path_factory.mktemp("two-nodes")
    run_dir = root / "run"
    job = submit(slurm, TRAIN, [f"--output={root}/train-%j.out", "--job-name=dsmoe-test", *TWO_NODES],
                 demo_args(slurm_demo, "train.max_steps=30"), RUN_DIR=str(run_dir))
    out = root / f"train-{job}.out"
    info = wait_for(job, out)
    assert_completed(info, out)
    return run_dir, out.read_text(), info


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


def test_experts_on_two_nodes_train_as_on_one_node_and_evaluate_across_both(slurm, slurm_demo, two_node_run,
                                                                             tmp_path):
    run_dir, log, info = two_node_run
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2" and info["Restarts"] == "0"
    assert f"train.sbatch: job {info['JobId']} (restart 0) on dsmoe-n[1-2]: 2 tasks" in log
    # one rank on each node, meeting at the first node's address on the nodes' network, never at a loopback
    assert re.search(rf"ranks on 2 nodes: dsmoe-n1 \[0\], dsmoe-n2 \[1\]; rendezvous dsmoe-n1:\d+ "
                     rf"\({re.escape(FIRST_NODE_ADDRESS)}\)", log), log[-4000:]
    assert "world size 2, ep_size 2" in log and "each rank holds" in log  # 3 of each layer's 6 experts
    assert "resume auto: no complete checkpoint yet" in log
    tag = run_dir / "checkpoints" / latest_tag(run_dir)
    assert tag.name == "step00000030" and (tag / "COMPLETE").is_file()
    # the experts of each MoE layer saved by the node that holds them, into the one shared run folder
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4 * 6
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["captions"] == 144

    # the same job with both ranks on one node: the same losses, step by step
    one_node = tmp_path / "one-node"
    out = tmp_path / "one-node-%j.out"
    job = submit(slurm, TRAIN, [f"--output={out}", "--job-name=dsmoe-test", *ONE_NODE],
                 demo_args(slurm_demo, "train.max_steps=30"), RUN_DIR=str(one_node))
    out = tmp_path / f"one-node-{job}.out"
    assert_completed(wait_for(job, out), out)
    assert re.search(r"ranks on 1 node: dsmoe-n[12] \[0, 1\]", out.read_text())
    across, within = logged_losses(run_dir), logged_losses(one_node)
    assert sorted(across) == list(range(1, 31)) and across.keys() == within.keys()
    for step in across:
        assert across[step] == pytest.approx(within[step], rel=1e-6), (step, across[step], within[step])

    # DeepSpeed's launcher without ssh, started on each node with its place in the hostfile (by srun, here): the
    # same ranks, the same losses
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    no_ssh = tmp_path / "no-ssh"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", "$SLURM_NODEID", "--master_addr", NODES[0], "--master_port", str(free_port()),
               str(REPO_ROOT / "dsmoe" / "train.py"), "--ds_config", str(REPO_ROOT / "ds_configs" / "zero2.json"),
               *demo_args(slurm_demo, "train.max_steps=6", f"train.output_dir={no_ssh}")]
    out = tmp_path / "no-ssh-%j.out"
    job = submit(slurm, "--wrap", [f"--output={out}", *TWO_NODES],
                 [f"srun --kill-on-bad-exit=1 bash -c 'exec {' '.join(command)}'"])
    out = tmp_path / f"no-ssh-{job}.out"
    assert_completed(wait_for(job, out), out)
    assert "ranks on 2 nodes: dsmoe-n1 [0], dsmoe-n2 [1]" in out.read_text()
    assert logged_losses(no_ssh) == {step: across[step] for step in range(1, 7)}

    # the eval script with one task on each node: the saved experts read back by the nodes, the same scores
    eval_out = tmp_path / "eval-%j.out"
    eval_json = tmp_path / "eval.json"
    job = submit(slurm, EVAL, [f"--output={eval_out}", "--ntasks=2", *TWO_NODES], [],
                 RUN_DIR=str(run_dir), EVAL_OUTPUT=str(eval_json))
    eval_out = tmp_path / f"eval-{job}.out"
    assert_completed(wait_for(job, eval_out), eval_out)
    assert "ranks on 2 nodes: dsmoe-n1 [0], dsmoe-n2 [1]" in eval_out.read_text()
    scores = json.loads(eval_json.read_text())
    test = results["test"]
    best = (run_dir / "checkpoints" / "best").read_text().strip()  # what training tested: the best on validation
    assert scores["split"] == "test" and scores["checkpoint"].endswith(best)
    assert scores["images"] == 72 and scores["captions"] == 144
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert scores[key] == pytest.approx(test[key], abs=0.01), key


def test_a_preempted_two_node_job_requeues_itself_and_resumes_bit_identically(slurm, slurm_demo, two_node_run,
                                                                              tmp_path):
    """SIGUSR1 to the tasks on both nodes (what --signal=USR1@N sends before the time limit): every rank saves, rank 0
    requeues the job, and the job, started again under the same id, resumes its run directory (keyed by the job
    id) and trains exactly as the uninterrupted run did."""
    out = tmp_path / "preempt-%j.out"
    name = f"dsmoe-test-{os.getpid()}"
    job = submit(slurm, TRAIN, [f"--output={out}", f"--job-name={name}", *TWO_NODES],
                 demo_args(slurm_demo, "train.max_steps=30"))
    out = tmp_path / f"preempt-{job}.out"
    run_dir = REPO_ROOT / "runs" / f"{name}-{job}"  # the script's default: runs/<job name>-<job id>
    try:
        wait_for_checkpoint(job, run_dir, out)  # training under way: handlers installed, a checkpoint written
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
        assert log.count("ranks on 2 nodes: dsmoe-n1 [0], dsmoe-n2 [1]") == 2
        # each step trained once, and exactly as in the run nobody interrupted (fp32: bit for bit)
        steps = [r["step"] for r in records if "loss" in r]
        assert sorted(steps) == list(range(1, 31)), steps
        assert logged_losses(run_dir) == logged_losses(two_node_run[0])
        assert latest_tag(run_dir) == "step00000030"
        assert [r for r in records if r.get("event") == "test"], "no test evaluation after resuming"
        assert records.index(preempted[0]) < max(i for i, r in enumerate(records) if r.get("event") == "test")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_lost_node_ends_the_job_within_a_minute_and_resubmitted_jobs_resume_at_any_size(slurm, slurm_demo,
                                                                                         tmp_path):
    """A node cut off the network, then a node whose processes (slurmd and the rank) all die: each time every
    surviving rank ends within a minute with one line naming the lost rank and node, without waiting for a
    collective's or Slurm's timeout. Resubmitted, the run continues from its last complete checkpoint on one
    process (ep_size 1), then again on two nodes (ep_size 2), its optimiser state resharded each time."""
    run_dir = tmp_path / "run"
    args = demo_args(slurm_demo, "train.epochs=30", "train.max_steps=400", "train.lost_rank_timeout=10")

    def start(options: list[str], *extra: str) -> tuple[str, Path]:
        job = submit(slurm, TRAIN, [f"--output={tmp_path}/lost-%j.out", "--job-name=dsmoe-test", *options],
                     [*args, *(a for o in extra for a in ("--set", o))], RUN_DIR=str(run_dir))
        return job, tmp_path / f"lost-{job}.out"

    def survivors_end(job: str, lose) -> float:
        """Seconds from ``lose()`` until no rank runs on the first node; then the job is cancelled (its lost step
        completes once the node answers again, which the next job does not wait for)."""
        assert node_pids(NODES[0], "python"), "no rank on the first node"
        lost_at = time.monotonic()
        lose()
        while node_pids(NODES[0], "python") and time.monotonic() - lost_at < 120:
            time.sleep(0.2)
        took = time.monotonic() - lost_at
        subprocess.run(["scancel", job], capture_output=True)
        return took

    # 1. the second node's link goes down: no error anywhere, only silence; rank 0 misses its heartbeat
    job, out = start(TWO_NODES)
    first = wait_for_checkpoint(job, run_dir, out)
    link = f"{NODES[1]}-v"
    try:
        took = survivors_end(job, lambda: subprocess.run(["ip", "link", "set", link, "down"], check=True))
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    assert took < 60, f"{took:.0f} s"
    log = out.read_text()
    assert "[dsmoe] rank 0: stopping because rank 1 on dsmoe-n2 is lost: no heartbeat for 1" in log, log[-4000:]

    # 2. resubmitted as one process: the last complete checkpoint, at another world size and ep_size
    saved = latest_tag(run_dir)
    assert saved >= first
    job, out = start(ALONE, "adapter.ep_size=1", f"train.max_steps={int(saved.removeprefix('step')) + 4}")
    assert_completed(wait_for(job, out), out)
    log = out.read_text()
    assert f"resumed from {run_dir}/checkpoints/{saved}" in log
    assert "this run has {'world_size': 1, 'ep_size': 1}" in log
    assert f"the optimiser state too (Adam moments and step {int(saved.removeprefix('step'))} of" in log

    # 3. on two nodes again; then every process of the second node is killed, its slurmd with the rank
    saved = latest_tag(run_dir)
    job, out = start(TWO_NODES)
    wait_for_checkpoint(job, run_dir, out, after=saved)
    log_before = out.read_text()
    assert f"resumed from {run_dir}/checkpoints/{saved}" in log_before
    assert "this run has {'world_size': 2, 'ep_size': 2}" in log_before
    try:
        took = survivors_end(job, lambda: [os.kill(pid, 9) for pid in node_pids(NODES[1])])
    finally:
        proc = start_cluster()  # the node's slurmd started again
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 60, f"{took:.0f} s"
    log = out.read_text()
    assert "[dsmoe] rank 0 failed: lost rank 1 on dsmoe-n2 (10.213.0.12): " in log, log[-4000:]
    assert (run_dir / "checkpoints" / latest_tag(run_dir) / "COMPLETE").is_file()


def test_dasd_demo_one_language_expert_per_node(slurm, tmp_path):
    """The DASD demo recipe as a user submits it (assets built on first use): CLA then CMA with each text block's
    language experts on the two nodes, three times the untrained model's mAR; then evaluation and retrieval from
    the saved run."""
    run, assets = tmp_path / "dasd", tmp_path / "assets"
    sets = {"demo_dir": assets, "model.clip": assets / "tiny-clip", "data.shards": assets / "shards",
            "dasd.tokenizer": assets / "tiny-mbert", "dasd.embeddings": assets / "tiny-mbert"}
    out = tmp_path / "dasd-%j.out"
    job = submit(slurm, TRAIN, [f"--output={out}", "--job-name=dsmoe-test", *TWO_NODES],
                 [a for key, value in sets.items() for a in ("--set", f"{key}={value}")],
                 RUN_DIR=str(run), MODEL_CONFIG=str(DASD_DEMO))
    out = tmp_path / f"dasd-{job}.out"
    assert_completed(wait_for(job, out, timeout=600), out)
    out = out.read_text()
    assert out.count("ranks on 2 nodes: dsmoe-n1 [0], dsmoe-n2 [1]") == 1 and "world size 2, ep_size 2" in out
    assert "initialised the trainable weights and its discriminator from" in out  # CMA starts from CLA
    for stage in ("cla", "cma"):
        results = json.loads((run / stage / "results.json").read_text())
        assert set(results["test"]) >= {"mAR", "AR_xx", "AR_yy"}
        assert results["test"]["xx"]["captions"] == results["test"]["yy"]["captions"] == 60
        tag = latest_tag(run / stage)
        # one dynamic-adapter expert per language in each of the 2 text blocks, saved by the node holding it
        experts = sorted(p.name for p in (run / stage / "checkpoints" / tag).glob("layer_*_expert_*_model_states.pt"))
        assert len(experts) == 2 * 2
        assert (run / stage / "checkpoints" / tag / "COMPLETE").is_file()
    cla = json.loads((run / "cla" / "results.json").read_text())
    untrained = cla["zero_shot"]["mAR"]
    assert cla["test"]["mAR"] > untrained  # CLA alone already beats the untrained path
    cma = json.loads((run / "cma" / "results.json").read_text())
    assert cma["test"]["mAR"] >= 3 * untrained, (untrained, cma["test"])
    assert f"trained: dasd, 2 experts a layer (top-1, language router) over 2 ranks (ep_size 2), " \
           f"{cma['trainable_parameters']:,} trainable parameters" in out
    assert f"python -m dsmoe.retrieve --checkpoint {run / 'cma'}" in out
    routing = [json.loads(line)["routing"] for line in (run / "cla" / "metrics.jsonl").read_text().splitlines()
               if '"routing"' in line]
    # each record counts the 5 steps since the last (log_every), each step's 2 x 16 captions (both ranks) and all
    # 32 tokens of each caption to its language's expert
    assert routing and all(sum(counts) == 5 * 2 * 16 * 32 for record in routing for counts in record.values())

    proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(run / "cma")], cwd=REPO_ROOT,
                          env=slurm_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    single = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert single["mAR"] == pytest.approx(cma["test"]["mAR"], abs=1e-3)

    # queries in the second target language, from another directory: each caption's own image is marked
    proc = subprocess.run([sys.executable, "-m", "dsmoe.retrieve", "--checkpoint", str(run / "cma"), "--language",
                           "yy", "--split-captions", "3", "--top-k", "60"], cwd=tmp_path, env=slurm_env(),
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    blocks = proc.stdout.split("query: ")[1:]
    assert len(blocks) == 3 and all("(1 true images; the first at rank" in block for block in blocks)
    assert all(block.count("  match") == 1 and block.count(" label ") == 60 for block in blocks)
    page = run / "cma" / "retrieval" / resolve_checkpoint(run / "cma")[1] / "results.html"
    assert f"results page: {page}" in proc.stdout and page.read_text().count("class='hit match'") == 3


def test_a_two_by_two_sweep_runs_locally_and_as_a_slurm_array_and_reports_mean_and_std(slurm, slurm_demo, tmp_path):
    """Two rows x two seeds of a one-epoch demo, run here with the deepspeed launcher and as one Slurm job array
    (one task per run, each task's run read from the sweep's runs file); the same command again skips what is
    finished; the report has each row's mean ± std over its two seeds."""
    sets = [f"{key}={value}" for key, value in slurm_demo.items()]
    sets += ["train.epochs=1", "train.eval_zero_shot=false", "adapter.ep_size=1", "data.workers=0",
             "train.threads_per_rank=1", "data.val_split=null"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({  # YAML is a superset of JSON
        "name": "two-by-two", "config": "dm_adapter/demo.yaml", "set": sets, "seeds": [1, 2], "ranks": 1,
        "sbatch": ["--ntasks-per-node=1", *CPU],
        "rows": [{"name": "one adapter", "set": ["adapter.router=dense"]}, {"name": "DM-Adapter"}]}))

    def sweep(folder: Path, *how: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dsmoe.sweep", str(spec), "--out", str(folder), *how],
                              cwd=tmp_path, env=slurm_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    def table(folder: Path) -> dict[str, str]:
        proc = subprocess.run([sys.executable, "-m", "dsmoe.report", str(folder)], cwd=tmp_path, env=slurm_env(),
                              capture_output=True, text=True, timeout=JOB_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}

    here = tmp_path / "local"
    out = sweep(here, "--local", "--parallel", "2")
    assert "4 runs in 2 rows; 4 to run" in out and out.count("[sweep] done") == 4, out
    assert "0 to run" in sweep(here, "--local")  # again: every run finished, nothing starts
    rows = table(here)
    for row in ("one adapter", "DM-Adapter"):
        assert re.search(r"\| 2 \| \d+\.\d\d ± \d+\.\d\d \|", rows[row]), rows[row]

    array = tmp_path / "array"
    out = sweep(array, "--slurm")
    job = re.search(r"submitted job array (\d+): 4 tasks", out).group(1)
    slurm.append(job)
    deadline = time.time() + JOB_TIMEOUT
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"job array {job} still queued or running"
        time.sleep(1)
    logs = sorted(array.glob(f"slurm-{job}_*.out"))
    assert len(logs) == 4, logs
    for log in logs:
        text = log.read_text()
        assert "train.sbatch: job" in text and "trained: dm_adapter" in text, text[-3000:]
    assert "0 to run" in sweep(array, "--dry-run")
    array_rows = table(array)
    for row in ("one adapter", "DM-Adapter"):  # the same runs (seeds, data, one rank, one thread): the same scores
        assert array_rows[row].split(" | ")[2] == rows[row].split(" | ")[2], (array_rows[row], rows[row])
