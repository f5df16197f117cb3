"""The baselines under the same trainer, in one process on the demo's assets: LoRA through peft trains only its
branches on the attention projections and exports them like adapters; full fine-tuning trains all of CLIP."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from dsmoe.config import load_config
from dsmoe.schema import ConfigError
from launch import REPO_ROOT
from trainers import make_trainer

BASELINES = REPO_ROOT / "dsmoe" / "configs" / "baselines"


def test_lora_trains_its_branches_alone_and_exports_them_like_adapters(demo_assets, dist_env, signals, tmp_path):
    from dsmoe.portable import load_portable, save_portable

    trainer = make_trainer(demo_assets, tmp_path / "lora", "train.max_steps=3", config=BASELINES / "lora_demo.yaml")
    model = trainer.model
    clip = model.backbone.clip
    blocks = clip.config.vision_config.num_hidden_layers + clip.config.text_config.num_hidden_layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # an A and a B matrix for each of q, k, v and out of every block of both encoders, and nothing else
    assert len(trainable) == blocks * 4 * 2, sorted(trainable)[:8]
    assert all(re.search(r"\.(q|k|v|out)_proj\.lora_[AB]\.default\.weight$", name) for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    assert all(not b.any() for b in lora_b.values())  # peft starts B at 0: the untrained model is CLIP

    results = trainer.train()
    assert results["trained"] == "LoRA rank 8 (alpha 16) on q_proj, k_proj, v_proj, out_proj of both encoders"
    assert results["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert any(p.any() for name, p in model.named_parameters() if "lora_B" in name)  # trained

    exported = save_portable(model, trainer.cfg, tmp_path / "lora.safetensors", source="test")
    fresh = make_trainer(demo_assets, tmp_path / "fresh", config=BASELINES / "lora_demo.yaml").model
    load_portable(fresh, exported)
    pixels = torch.randn(2, 3, *trainer.cfg.model.image_size)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), fresh.encode_image(pixels))
    assert json.loads((tmp_path / "lora" / "results.json").read_text())["test"]["captions"] == 144


def test_full_fine_tuning_trains_all_of_clip_but_the_resized_positions(demo_assets, dist_env, signals, tmp_path):
    trainer = make_trainer(demo_assets, tmp_path / "full", "train.max_steps=2", config=BASELINES / "full_demo.yaml")
    clip = trainer.model.backbone.clip
    fixed = {name for name, p in clip.named_parameters() if not p.requires_grad}
    assert fixed == {"logit_scale", "vision_model.embeddings.position_embedding.weight"}
    before = {name: p.detach().clone() for name, p in clip.named_parameters()}
    results = trainer.train()
    assert results["trained"] == "CLIP's encoders fine-tuned whole" and results["ep_size"] == 1
    moved = [name for name, p in clip.named_parameters() if not torch.equal(p, before[name])]
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in moved and len(moved) > 0.9 * len(before) - 2


def test_baseline_settings_are_checked_and_the_adapter_section_does_not_apply():
    cfg = load_config(BASELINES / "lora_demo.yaml", ["adapter.ep_size=2"])
    assert cfg.adapter.ep_size == 1  # no experts to shard, whatever the section says
    with pytest.raises(ConfigError, match="lora.target_modules=\\['qkv'\\]: name one or more of CLIP's linear"):
        load_config(BASELINES / "lora_demo.yaml", ["lora.target_modules=[qkv]"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(BASELINES / "lora_demo.yaml", ["lora.rank=0"])
    for recipe in sorted(BASELINES.glob("*.yaml")):
        assert load_config(recipe).method in ("lora", "full"), recipe


@pytest.mark.integration
def test_lora_and_full_train_resume_export_and_evaluate_over_two_ranks(demo_assets, tmp_path):
    from launch import LAUNCH_TIMEOUT, free_port, launch_env, run_ok, train_cmd

    def evaluate(checkpoint) -> dict:
        proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(checkpoint)],
                              cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return json.loads(proc.stdout[proc.stdout.index("{"):])

    # LoRA: two steps, resumed for a third, exported, and the file scored in one process: the run's scores
    run = tmp_path / "lora"
    recipe = ("--config", str(BASELINES / "lora_demo.yaml"))
    out = run_ok(train_cmd(demo_assets, run, free_port(), "train.max_steps=2", "train.checkpoint_every=1",
                           extra=recipe))
    assert "world size 2, ep_size 1" in out
    out = run_ok(train_cmd(demo_assets, run, free_port(), "train.max_steps=3", extra=recipe))
    assert f"resumed from {run / 'checkpoints' / 'step00000002'}: epoch 0, batch 2, step 2" in out
    assert "trained: lora, LoRA rank 8 (alpha 16) on q_proj, k_proj, v_proj, out_proj of both encoders" in out
    test = json.loads((run / "results.json").read_text())["test"]
    exported = tmp_path / "lora.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dsmoe.export", "--checkpoint", str(run), "--output", str(exported)],
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    scores = evaluate(exported)
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert scores[key] == pytest.approx(test[key], abs=1e-3), key

    # full fine-tuning: ZeRO-2 splits all of CLIP's optimiser state between the two ranks
    run = tmp_path / "full"
    run_ok(train_cmd(demo_assets, run, free_port(), "train.max_steps=2", extra=("--config",
                                                                                 str(BASELINES / "full_demo.yaml"))))
    results = json.loads((run / "results.json").read_text())
    tag = run / "checkpoints" / "step00000002"
    parts = sorted(p.stat().st_size for p in tag.glob("*optim_states.pt"))
    assert len(parts) == 2 and parts[0] > 0.45 * sum(parts)  # halves: each rank holds its share
    assert sum(parts) > 8 * results["trainable_parameters"]  # fp32 weights + two moments, over both files
    scores = evaluate(run)
    for key in ("R1", "mAP"):
        assert scores[key] == pytest.approx(results["test"][key], abs=1e-3), key
