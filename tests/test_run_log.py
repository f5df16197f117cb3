"""What a run shows and records, in process: progress figures, wandb and TensorBoard keys, the whole model's
trainable count, stop signals, the demo recipe refusing real shards, and the entry points' help."""
from __future__ import annotations

import importlib.util
import io
import os
import signal

import pytest
from PIL import Image
from torch import nn

from dsmoe.config import DEFAULT_DEMO_CONFIG, ConfigError, load_config
from dsmoe.optim import whole_model_trainable
from dsmoe.preemption import STOP, PreemptionWatch
from dsmoe.run_log import Pace, RunLogger, prefixed_record, step_line


def test_pace_gives_throughput_over_all_ranks_data_wait_and_eta():
    pace = Pace(samples_per_step=64, total_steps=100)
    pace.add(wait=0.5, busy=1.5, steps=1)
    pace.add(wait=0.0, busy=2.0, steps=1)
    figures = pace.figures(step=10)
    assert figures == {"samples_per_s": 32.0, "step_s": 2.0, "data_wait": 0.125, "eta_s": 180.0}
    assert pace.figures(step=10)["samples_per_s"] == 0.0, "each report covers the steps since the last one"
    line = step_line(10, 100, 0, 3, {"loss": 1.23456, "lb": 0.5}, 3e-4, figures, "peak 1.00 GiB")
    assert line == ("step 10/100 epoch 1/3 | loss 1.2346 lb 0.5000 | lr 3.000e-04 | 32.0 samples/s, 2.00 s/step, "
                    "data wait 12% | peak 1.00 GiB (rank 0) | ETA 0:03:00")


def test_wandb_keys_say_the_split_and_routing_is_one_table():
    flat, table = prefixed_record({"time": 1.0, "step": 7, "epoch": 0, "loss": 2.0, "lr": 1e-3}, None)
    assert flat == {"train/epoch": 0, "train/loss": 2.0, "train/lr": 1e-3} and table is None
    flat, _ = prefixed_record({"event": "val", "split": "val", "step": 18, "R1": 50.0, "incomplete": True}, None)
    assert flat == {"val/R1": 50.0}
    flat, _ = prefixed_record({"event": "zero_shot", "step": 0, "R1": 10.0}, None)
    assert flat == {"zero_shot/R1": 10.0}
    _, table = prefixed_record({"step": 1, "loss": 1.0}, {"image.0": [3, 1], "text.0": [0, 4]})
    assert table["columns"] == ["layer", "expert", "share"]
    assert table["data"] == [["image.0", 0, 0.75], ["image.0", 1, 0.25], ["text.0", 0, 0.0], ["text.0", 1, 1.0]]


def test_tensorboard_gets_each_record_at_its_step_and_routing_as_a_heat_map(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["tensorboard.enabled=true"])
    log = RunLogger(tmp_path, rank=0, cfg=cfg)
    log.metrics({"event": "zero_shot", "split": "test", "step": 0, "R1": 10.0})
    log.metrics({"step": 2, "epoch": 0, "loss": 3.0, "lr": 1e-3}, routing={"image.0": [3, 1], "text.0": [0, 4]})
    log.metrics({"step": 4, "epoch": 0, "loss": 2.5, "lr": 2e-3}, routing={"image.0": [2, 2], "text.0": [4, 0]})
    log.metrics({"event": "val", "split": "val", "step": 4, "R1": 20.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == [(2, 3.0), (4, 2.5)]
    assert scalars["zero_shot/R1"] == [(0, 10.0)] and scalars["val/R1"] == [(4, 20.0)]
    assert [e.step for e in events.Images("routing/share")] == [2, 4]
    picture = Image.open(io.BytesIO(events.Images("routing/share")[0].encoded_image_string)).convert("L")
    assert picture.size == (2 * 12, 2 * 12)  # 2 experts wide, 2 layers high
    # image.0 sends 3/4 of its routes to expert 0; text.0 all of them to expert 1
    cells = [picture.getpixel((x * 12 + 6, y * 12 + 6)) for y in (0, 1) for x in (0, 1)]
    assert cells == [191, 63, 0, 255]  # 0.75, 0.25, 0 and 1 of 255


def test_tensorboard_without_its_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="tensorboard.enabled needs the tensorboard package"):
        load_config(None, ["tensorboard.enabled=true"])


def test_trainable_count_is_the_whole_model_at_any_ep_size():
    model = nn.Module()
    model.dense = nn.Linear(4, 4)  # 20
    model.expert = nn.Linear(4, 2)  # 10 on this rank
    model.frozen = nn.Linear(4, 4).requires_grad_(False)
    for p in model.expert.parameters():
        p.allreduce = False  # how DeepSpeed marks expert parameters
    assert whole_model_trainable(model, 1) == 30
    assert whole_model_trainable(model, 4) == 20 + 4 * 10


def test_a_second_ctrl_c_interrupts_at_once(signals):
    watch = PreemptionWatch()
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.state == STOP and watch.exit_code() == 130
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    watch = PreemptionWatch()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # after SIGTERM: still the save, then 143
    assert watch.exit_code() == 143


def test_the_demo_recipe_refuses_shards_outside_its_folder(tmp_path):
    with pytest.raises(ConfigError, match="pass --config with a recipe"):
        load_config(None, [f"data.shards={tmp_path / 'real'}"])
    cfg = load_config(None, [f"data.shards={tmp_path / 'real'}", "demo=false"])
    assert not cfg.demo
    load_config(None, [f"demo_dir={tmp_path}", f"data.shards={tmp_path / 'shards'}"])  # the demo's own place


def test_local_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["demo=false", "data.shards=shards/cuhk", "model.clip=openai/clip-vit-base-patch16",
                             "train.output_dir=runs/a", "data.eval_shards=s3://bucket/shards"])
    cfg.make_paths_absolute()
    assert cfg.data.shards == str(tmp_path / "shards" / "cuhk") and cfg.train.output_dir == str(tmp_path / "runs/a")
    assert cfg.model.clip == "openai/clip-vit-base-patch16" and cfg.data.eval_shards == "s3://bucket/shards"
    assert cfg.demo_dir == str(tmp_path / ".cache/dsmoe-demo")


def test_a_missing_local_model_is_named_by_its_key(tmp_path):
    cfg = load_config(None, ["demo=false", f"data.shards={tmp_path}", f"model.clip={tmp_path / 'no-such-clip'}"])
    with pytest.raises(ConfigError, match=r"^model.clip=.*no-such-clip: no such folder"):
        cfg.check_models()
    (tmp_path / "clip").mkdir()
    cfg = load_config(None, ["demo=false", f"data.shards={tmp_path}", f"model.clip={tmp_path / 'clip'}",
                             "model.tokenizer=./missing-tokenizer"])
    with pytest.raises(ConfigError, match=r"^model.tokenizer=./missing-tokenizer"):
        cfg.check_models()
    cfg = load_config(None, ["demo=false", f"data.shards={tmp_path}", "model.clip=openai/clip-vit-base-patch16"])
    cfg.check_models()  # a hub id is the hub's to resolve
    dasd = load_config(DEFAULT_DEMO_CONFIG.parents[1] / "dasd" / "demo.yaml",
                       ["demo=false", f"data.shards={tmp_path}", f"model.clip={tmp_path / 'clip'}",
                        "dasd.tokenizer=/nowhere/mbert"])
    with pytest.raises(ConfigError, match=r"^dasd.tokenizer=/nowhere/mbert"):
        dasd.check_models()


def test_run_demo_passes_launcher_options_and_picks_a_free_port(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "run_demo.sh").write_text((repo / "tools" / "run_demo.sh").read_text())
    (tmp_path / "tools" / "setup_env.sh").write_text("true\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    launcher = tmp_path / ".venv" / "bin" / "deepspeed"  # records what the real launcher would get
    launcher.write_text('#!/bin/sh\necho "$@"\n')
    launcher.chmod(0o755)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "dsmoe").symlink_to(repo / "dsmoe")

    def launched(*args: str) -> list[str]:
        out = subprocess.run(["bash", "tools/run_demo.sh", *args], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout
        return out.split()

    given = launched("--master_port", "29600", "--", "--set", "train.epochs=1")
    assert given == ["--num_gpus", "2", "--master_port", "29600", "dsmoe/train.py", "--ds_config",
                     "ds_configs/zero2.json", "--set", "train.epochs=1"]
    free = launched("--set", "train.epochs=1")
    assert free[:3] == ["--num_gpus", "2", "--master_port"] and free[3].isdigit() and free[3] != "29500"
    assert free[4:] == given[4:], "without --, every argument is train.py's"


def test_a_folder_of_stage_runs_says_which_runs_it_holds(tmp_path):
    import json

    from dsmoe.checkpoint.folder import STAGING_PREFIX, check_checkpoint, publish

    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as empty:
        check_checkpoint(tmp_path)
    assert "holds the runs" not in str(empty.value)
    for stage in ("cla", "cma"):
        root = tmp_path / stage / "checkpoints"
        (root / f"{STAGING_PREFIX}step00000002").mkdir(parents=True)
        publish(root, f"{STAGING_PREFIX}step00000002", "step00000002", json.dumps({"global_step": 2}))
    with pytest.raises(FileNotFoundError, match=f"holds the runs cla, cma: name one, such as --checkpoint "
                                                f"{tmp_path / 'cma'}"):
        check_checkpoint(tmp_path)
    check_checkpoint(tmp_path / "cla")


def test_config_changes_leave_out_run_control_and_equal_paths(tmp_path, monkeypatch):
    from dsmoe.checkpoint.folder import config_changes

    monkeypatch.chdir(tmp_path)
    saved = {"optim": {"lr": 0.003, "betas": [0.9, 0.999]}, "train": {"max_steps": 4, "output_dir": "runs/a"},
             "data": {"shards": "shards", "workers": 1}, "adapter": {"ep_size": 2, "top_k": 2}}
    now = {"optim": {"lr": 0.5, "betas": [0.9, 0.999]}, "train": {"max_steps": 9, "output_dir": str(tmp_path / "runs/a")},
           "data": {"shards": str(tmp_path / "shards"), "workers": 0}, "adapter": {"ep_size": 1, "top_k": 1}}
    assert config_changes(saved, now) == ["adapter.top_k: 2 -> 1", "optim.lr: 0.003 -> 0.5"]
    assert config_changes(saved, saved) == []


def test_a_long_phase_reports_start_progress_and_end_in_a_log():
    import io

    from dsmoe.progress import Phase

    log = io.StringIO()
    with Phase("writing shards", 4, "shards", every=0.0, stream=log) as phase:
        for _ in range(4):
            phase.advance()
    lines = log.getvalue().splitlines()
    assert lines[0] == "[dsmoe] writing shards: 4 shards"
    assert lines[1].startswith("[dsmoe] writing shards: 1/4 shards (25%, ") and "ETA " in lines[1]
    assert lines[4].startswith("[dsmoe] writing shards: 4/4 shards (100%")
    assert lines[5].startswith("[dsmoe] writing shards: done, 4 shards in ") and len(lines) == 6
    quiet = io.StringIO()
    with Phase("elsewhere", enabled=False, stream=quiet) as phase:
        phase.advance(3)
    assert quiet.getvalue() == "" and phase.done == 3


def test_pruning_keeps_as_many_folders_as_asked_pointers_first(tmp_path):
    import json

    from dsmoe.checkpoint.folder import STAGING_PREFIX, prune, publish, write_pointer

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"{STAGING_PREFIX}step{step:08d}").mkdir(parents=True)
        publish(root, f"{STAGING_PREFIX}step{step:08d}", f"step{step:08d}", json.dumps({"global_step": step}))
    write_pointer(root, "best", "step00000002")  # best is old; latest is step 8
    prune(root, 2)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000008"]
    write_pointer(root, "best", "step00000008")  # best moves to latest: one slot for the newest other
    prune(root, 2)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000008"]
    prune(root, 1)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000008"]


def test_evaluate_and_export_help_say_what_they_read_and_refuse_training_flags(capsys):
    from dsmoe import evaluate, export

    for command in (evaluate, export):
        with pytest.raises(SystemExit):
            command.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--config CONFIG model YAML (default: the run's config.yaml, or <name>.yaml beside exported" in text
        assert "--set KEY=VALUE override a YAML value" in text and "--ds_config" not in text
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--checkpoint", "runs/x", "--ds_config", "zero2.json"])
    assert stopped.value.code == 2 and "unrecognized arguments: --ds_config" in capsys.readouterr().err
