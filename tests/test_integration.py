"""End to end with real processes: the deepspeed launcher, 2 CPU ranks, ep_size 2, ZeRO-2.

Trains a few steps, checkpoints, resumes after a SIGKILL, checks that the resumed run reproduces the losses of an
uninterrupted one, and evaluates the saved run in one process without a launcher; runs both demos as a user does
and holds them to the margins they must show over the untrained model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsmoe.checkpoint.folder import resolve_checkpoint
from dsmoe.ds_config import DeviceSupport
from launch import (DASD_DEMO, LAUNCH_TIMEOUT, REPO_ROOT, cpu_fp16_env, free_port, latest_tag, launch_env,
                    logged_losses, logged_records, run_ok, train_cmd)


pytestmark = pytest.mark.integration


def test_killed_run_resumes_from_its_last_checkpoint_and_evaluates(demo_assets, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    cmd = train_cmd(demo_assets, resumed, free_port(), "train.checkpoint_every=2", "train.max_steps=30")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + LAUNCH_TIMEOUT
    try:  # SIGKILL the whole launch (launcher and ranks) once a checkpoint is complete
        while time.time() < deadline and proc.poll() is None:
            if (resumed / "checkpoints" / "latest").is_file():
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = latest_tag(resumed)
    saved_step = int(saved.removeprefix("step"))
    assert saved_step >= 2
    tag_dir = resumed / "checkpoints" / saved
    assert (tag_dir / "COMPLETE").is_file()
    # experts are saved one file per (layer, expert): 4 MoE layers (2 image + 2 text blocks) x 6 experts
    expert_files = sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(expert_files) == 4 * 6
    # frozen CLIP excluded: the non-expert state holds kilobytes, not the backbone
    assert (tag_dir / "mp_rank_00_model_states.pt").stat().st_size < 200_000
    routing = [json.loads(line)["routing"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
               if "routing" in line]
    assert routing and set(routing[-1]) == {"image.0", "image.1", "text.0", "text.1"}
    assert all(len(counts) == 6 for counts in routing[-1].values())

    last = saved_step + 3
    out = run_ok(train_cmd(demo_assets, resumed, free_port(), "train.checkpoint_every=2", f"train.max_steps={last}"))
    assert "ep_size 2" in out and "world size 2" in out
    assert f"resumed from {resumed / 'checkpoints' / saved}" in out
    assert latest_tag(resumed) == f"step{last:08d}"

    run_ok(train_cmd(demo_assets, straight, free_port(), "train.checkpoint_every=2", f"train.max_steps={last}"))
    a, b = logged_losses(resumed), logged_losses(straight)
    assert set(range(1, last + 1)) == set(a) == set(b)
    for step in range(1, last + 1):  # the resumed run continues on the same data, optimiser and schedule
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), (step, a[step], b[step])

    results = json.loads((resumed / "results.json").read_text())
    env = launch_env()
    proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(resumed)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    single = json.loads(proc.stdout[proc.stdout.index("{"):])
    # one process, ep_size 1, experts gathered from the ep_size-2 files: the same scores as the 2-rank run
    assert single["captions"] == results["test"]["captions"] == 144
    assert single["images"] == results["test"]["images"] == 72
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert single[key] == pytest.approx(results["test"][key], abs=1e-3)

    # a config whose experts do not fit the checkpoint: one error naming the key, no traceback
    proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(resumed), "--set",
                           "adapter.num_experts=4"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "does not fit the model of this config" in proc.stderr
    assert "adapter.num_experts: 6 in the checkpoint, 4 here" in proc.stderr


def test_the_demo_makes_the_case(tmp_path):
    """tools/run_demo.sh as a newcomer runs it (assets built on first use): DM-Adapter at least doubles the untrained
    model's R@1 and adds 15 points of mAP, validation R@1 rises, and the closing table says what was trained and
    where to look next."""
    assets = tmp_path / "assets"
    proc = subprocess.run(["bash", str(REPO_ROOT / "tools" / "run_demo.sh"), "--set", f"demo_dir={assets}", "--set",
                           f"model.clip={assets / 'tiny-clip'}", "--set", f"data.shards={assets / 'shards'}", "--set",
                           f"train.output_dir={tmp_path / 'demo'}"], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    trained, untrained = results["test"], results["zero_shot"]
    assert trained["R1"] >= 2 * untrained["R1"] and trained["mAP"] >= untrained["mAP"] + 15, results
    val = [epoch["R1"] for epoch in results["validation"]]
    assert len(val) == 4 and val[-1] > val[0], val
    assert f"trained: dm_adapter, 6 experts a layer (top-2, domain_aware router) over 2 ranks (ep_size 2), " \
           f"{results['trainable_parameters']:,} trainable parameters" in out
    assert f"python -m dsmoe.report {tmp_path / 'demo'}" in out
    assert f"python -m dsmoe.retrieve --checkpoint {tmp_path / 'demo'}" in out


def test_config_errors_fail_before_launching_ranks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  imge_size: [64, 32]\n")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "dsmoe" / "train.py"), "--config", str(bad)],
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.imge_size" in proc.stderr and "model.image_size" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def dasd_assets(demo_assets, tmp_path_factory) -> dict[str, str]:
    """A small Multi30K-layout set (en + two made-up languages), its shards and a tiny "mBERT"; the English side
    reuses the person demo's tiny CLIP (same caption generator, same vocabulary)."""
    from dsmoe.demo.models import build_tiny_mbert
    from dsmoe.demo.multi30k import DEMO_LANGUAGES, make_synthetic_multi30k

    root = tmp_path_factory.mktemp("dasd")
    raw = make_synthetic_multi30k(root / "raw", splits={"train": 64, "val": 16, "test_2016_flickr": 24})
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_shards.py"), "--dataset", "multi30k", "--root",
                    str(raw), "--out", str(root / "shards"), "--task", "1", "--languages", "en,xx,yy",
                    "--samples-per-shard", "16", "--resize", "64x32"], check=True, capture_output=True)
    task = raw / "data" / "task1" / "raw"
    build_tiny_mbert(root / "mbert", [line for lang in DEMO_LANGUAGES
                                      for line in (task / f"train.{lang}").read_text().splitlines()])
    return {"demo_dir": str(root), "model.clip": demo_assets["model.clip"], "data.shards": str(root / "shards"),
            "dasd.tokenizer": str(root / "mbert"), "dasd.embeddings": str(root / "mbert")}


def test_dasd_demo_language_experts_sharded_over_two_ranks(tmp_path):
    """The DASD demo recipe as a user runs it (assets built on first use): CLA then CMA with one expert per language
    over two ranks, three times the untrained model's mAR; then evaluation and retrieval from the saved run."""
    run, assets = tmp_path / "dasd", tmp_path / "assets"
    sets = {"demo_dir": assets, "model.clip": assets / "tiny-clip", "data.shards": assets / "shards",
            "dasd.tokenizer": assets / "tiny-mbert", "dasd.embeddings": assets / "tiny-mbert",
            "train.output_dir": run}
    out = run_ok([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(free_port()), str(REPO_ROOT / "dsmoe" / "train.py"), "--ds_config",
                  str(REPO_ROOT / "ds_configs" / "zero2.json"), "--config", str(DASD_DEMO),
                  *(a for key, value in sets.items() for a in ("--set", f"{key}={value}"))])
    assert "world size 2, ep_size 2" in out
    assert "initialised the trainable weights and its discriminator from" in out  # CMA starts from CLA
    for stage in ("cla", "cma"):
        results = json.loads((run / stage / "results.json").read_text())
        assert set(results["test"]) >= {"mAR", "AR_xx", "AR_yy"}
        assert results["test"]["xx"]["captions"] == results["test"]["yy"]["captions"] == 60
        tag = latest_tag(run / stage)
        # one dynamic-adapter expert per language in each of the 2 text blocks, saved by the rank holding it
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
                          env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    single = json.loads(proc.stdout[proc.stdout.index("{"):])
    best = json.loads((run / "cma" / "results.json").read_text())["test"]
    assert single["mAR"] == pytest.approx(best["mAR"], abs=1e-3)

    # queries in the second target language, from another directory: each caption's own image is marked
    proc = subprocess.run([sys.executable, "-m", "dsmoe.retrieve", "--checkpoint", str(run / "cma"), "--language",
                           "yy", "--split-captions", "3", "--top-k", "60"], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    blocks = proc.stdout.split("query: ")[1:]
    assert len(blocks) == 3 and all("(1 true images; the first at rank" in block for block in blocks)
    assert all(block.count("  match") == 1 and block.count(" label ") == 60 for block in blocks)
    page = run / "cma" / "retrieval" / resolve_checkpoint(run / "cma")[1] / "results.html"
    assert f"results page: {page}" in proc.stdout and page.read_text().count("class='hit match'") == 3


def test_dasd_trains_in_fp16_with_loss_scaling(dasd_assets, tmp_path):
    """The adversarial discriminator keeps its own fp32 optimiser while DeepSpeed runs the model in fp16."""
    run = tmp_path / "dasd"
    cmd = train_cmd(dasd_assets, run, free_port(), "dasd.stages=[cla]", "dasd.cla={epochs: 2, lr: 0.002}",
                    "train.batch_size=16", "demo=false", ds_config="zero2_fp16.json",
                    extra=("--config", str(DASD_DEMO)))
    out = run_ok(cmd, env=launch_env() if DeviceSupport.detect().fp16 else cpu_fp16_env())
    assert "dtype torch.float16" in out
    steps = [r for r in logged_records(run / "cla") if "loss" in r]
    assert len(steps) == 16 and steps[-1]["skipped_steps"] < 16  # overflowing steps skipped, the others applied
    assert all(0 < r["discriminator"] < 10 and r["loss_scale"] >= 1 for r in steps)
    assert sum(r["loss"] for r in steps[-4:]) < sum(r["loss"] for r in steps[:4])
    assert json.loads((run / "cla" / "results.json").read_text())["test"]["mAR"] > 0
