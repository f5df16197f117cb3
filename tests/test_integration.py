"""End to end with real processes: the deepspeed launcher, 2 CPU ranks, ep_size 2, ZeRO-2.

Trains a few steps, checkpoints, resumes after a SIGKILL, checks that the resumed run reproduces the losses of an
uninterrupted one, and evaluates the saved run in one process without a launcher; resumes two ranks' checkpoint in
one process and back, with the optimiser state resharded; runs the DM-Adapter demo as a user
does and holds it to the margins it must show over the untrained model (the DASD demo runs across two Slurm nodes:
tests/test_slurm.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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


def test_elastic_resume_keeps_the_optimiser_state(demo_assets, dist_env, signals, tmp_path, monkeypatch):
    """Two ranks (ep_size 2) save at step 4; this process (one rank, ep_size 1) resumes from there with the saved
    Adam moments and step in its own ZeRO partitions, and its first step is the Adam step computed here, without
    DeepSpeed, from the state the checkpoint holds and that step's gradient."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state

    from dsmoe.checkpoint import elastic
    from trainers import make_trainer

    run = tmp_path / "run"
    run_ok(train_cmd(demo_assets, run, free_port(), "train.max_steps=4"))
    saved_at = run / "checkpoints" / latest_tag(run)
    assert saved_at.name == "step00000004" and len(list((saved_at / elastic.FOLDER).glob("rank*"))) == 2

    trainer = make_trainer(demo_assets, run, "train.max_steps=5")
    assert trainer.resume("auto")
    engine, optimizer = trainer.engine, elastic.base_optimizer(trainer.engine)
    tensors = elastic._trainable(engine)
    saved, step = elastic.read_state(saved_at, {name for name, _ in tensors.values()})
    assert step == 4 == elastic.optimizer_step(optimizer) == engine.global_steps
    per_expert = sum(".deepspeed_experts.5." in name for name, _ in tensors.values())  # over the 4 MoE layers
    assert per_expert == 4 * 4 and len(tensors) > 6 * per_expert
    for name, param in tensors.values():
        assert torch.equal(safe_get_full_fp32_param(param), saved[f"param:{name}"]), name
        for key in elastic.MOMENTS:
            assert torch.equal(safe_get_full_optimizer_state(param, key), saved[f"{key}:{name}"]), (name, key)

    moved = [name for name, _ in tensors.values() if saved[f"exp_avg_sq:{name}"].any()]
    assert len(moved) > 0.75 * len(tensors)  # moments of 4 steps, not a fresh start (an unused expert's bias: 0)

    first = {}
    engine_step = engine.step

    def step():  # the gradient and learning rate of the first step after the resume, then its result
        first["grad"] = {name: safe_get_full_grad(p).clone() for name, p in tensors.values()}
        first["group"] = {name: optimizer.param_groups[p._hp_mapping.param_group_index] for name, p in tensors.values()}
        first["lr"] = {name: group["lr"] for name, group in first["group"].items()}
        engine_step()
        if "after" not in first:
            first["after"] = {name: safe_get_full_fp32_param(p).clone() for name, p in tensors.values()}
    monkeypatch.setattr(engine, "step", step)
    trainer.train()

    cfg = trainer.cfg.optim
    adam = torch.optim.AdamW if cfg.adamw else torch.optim.Adam
    for name, _ in tensors.values():
        weight = torch.nn.Parameter(saved[f"param:{name}"].clone())
        weight.grad = first["grad"][name]
        reference = adam([weight], lr=first["lr"][name], betas=cfg.betas, eps=cfg.eps,
                         weight_decay=first["group"][name]["weight_decay"])
        reference.state[weight] = {"step": torch.tensor(4.0), "exp_avg": saved[f"exp_avg:{name}"].clone(),
                                   "exp_avg_sq": saved[f"exp_avg_sq:{name}"].clone()}
        reference.step()
        torch.testing.assert_close(first["after"][name], weight.detach(), rtol=1e-6, atol=1e-8, msg=name)

    # and back to two ranks (ep_size 2): the state saved by one process resharded again
    out = run_ok(train_cmd(demo_assets, run, free_port(), "train.max_steps=6"))
    assert "world size 2, ep_size 2" in out
    assert f"{run / 'checkpoints' / 'step00000005'} was saved with {{'world_size': 1, 'ep_size': 1}}" in out
    held = len(tensors) - 3 * per_expert  # rank 0's: the dense tensors and 3 of the 6 experts
    assert f"the optimiser state too (Adam moments and step 5 of {held} tensors resharded)" in out


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
