"""The training loop in one process (world size 1, gloo): steps, checkpoints, resume, model selection, pruning,
preemption, starting from exported adapters and evaluation, driven through the real ``Trainer``."""
from __future__ import annotations

import json
import os
import shutil
import signal

from dsmoe.checkpoint.folder import STAGING_PREFIX, complete_tag
from trainers import losses, make_trainer, records


def test_resume_continues_exactly_where_a_stopped_run_left_off(demo_assets, dist_env, signals, tmp_path, capfd):
    straight = make_trainer(demo_assets, tmp_path / "straight", "train.max_steps=7")
    assert straight.train()["test"]["captions"] == 144
    first = make_trainer(demo_assets, tmp_path / "resumed", "train.max_steps=4", "train.checkpoint_every=2")
    first.train()
    ckpt = tmp_path / "resumed" / "checkpoints"
    assert complete_tag(ckpt) == "step00000004" and not list(ckpt.glob(f"{STAGING_PREFIX}*"))
    marker = json.loads((ckpt / "step00000004" / "COMPLETE").read_text())
    assert marker["global_step"] == 4 and marker["config"]["train"]["max_steps"] == 4

    saved = json.loads((ckpt / "step00000004" / "data_cursors_rank0.json").read_text())
    assert (saved["epoch"], saved["batch"]) == (0, 4) and saved["cursors"]

    second = make_trainer(demo_assets, tmp_path / "resumed", "train.max_steps=7")
    assert second.resume("auto") and second.engine.global_steps == 4 and second.progress.batch == 4
    # every data slot continues from its saved place (the stream's own tests show it reads nothing before it)
    assert second.data_cursors.keys() == {int(k) for k in saved["cursors"]}
    assert all(state["batches"] > 0 for state in second.data_cursors.values())
    shutil.copytree(tmp_path / "resumed", tmp_path / "cut")  # a copy of the stopped run, before it goes on
    second.train()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 8)) and all(a[step] == b[step] for step in range(1, 8)), (a, b)

    # a cursor file cut short is named, and the epoch's order is replayed up to the saved batch: the same batches
    cursor_file = tmp_path / "cut" / "checkpoints" / "step00000004" / "data_cursors_rank0.json"
    cursor_file.write_text(cursor_file.read_text()[:100])
    third = make_trainer(demo_assets, tmp_path / "cut", "train.max_steps=7")
    capfd.readouterr()
    assert third.resume("auto") and third.data_cursors == {}
    said = capfd.readouterr()
    assert f"WARNING: {cursor_file} does not read (JSONDecodeError" in said.err
    assert "the epoch's order is replayed up to there" in said.out and "saved stream places" not in said.out
    third.train()
    assert losses(tmp_path / "cut") == a
    # another number of loader workers: the log says that the data order changes, and no cursor is used
    other = make_trainer(demo_assets, tmp_path / "resumed", "train.max_steps=7", "data.workers=1")
    other.allow_config_change = True
    capfd.readouterr()
    assert other.resume(str(tmp_path / "resumed" / "checkpoints" / "step00000004")) and other.data_cursors == {}
    assert "data.workers was 0 in" in capfd.readouterr().out


def test_a_signal_during_validation_saves_and_the_resumed_run_validates_first(demo_assets, dist_env, signals,
                                                                               tmp_path):
    """SIGTERM is read at every evaluation batch, not only at optimiser steps: the run saves the epoch's end with
    its validation still due and ends 143; resumed, it validates first and ends as an uninterrupted run."""
    settings = ("train.epochs=2", "train.eval_every=1", "train.batch_size=96")  # 6 steps per epoch
    expected = make_trainer(demo_assets, tmp_path / "straight", *settings).train()
    run = tmp_path / "run"
    trainer = make_trainer(demo_assets, run, *settings)
    evaluate = trainer.evaluator.evaluate

    def signalled(method, split):
        if split == "val":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives as the validation starts
        return evaluate(method, split)
    trainer.evaluator.evaluate = signalled
    assert trainer.train() == {"preempted": True, "checkpoint": "step00000006", "exit_code": 143}
    marker = json.loads((run / "checkpoints" / "step00000006" / "COMPLETE").read_text())
    assert marker["progress"]["pending_val"] and not [r for r in records(run) if r.get("event") == "val"]
    resumed = make_trainer(demo_assets, run, *settings)
    assert resumed.resume("auto") and resumed.progress.pending_val
    results = resumed.train()
    assert [(v["epoch"], v["R1"]) for v in results["validation"]] == \
        [(v["epoch"], v["R1"]) for v in expected["validation"]] and results["test"] == expected["test"]
    assert [r["epoch"] for r in records(run) if r.get("event") == "val"] == [1, 2]


def test_a_signal_during_the_zero_shot_evaluation_ends_the_run_at_once(demo_assets, dist_env, signals, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(demo_assets, run, "train.eval_zero_shot=true")
    os.kill(os.getpid(), signal.SIGINT)
    assert trainer.train() == {"preempted": True, "checkpoint": None, "exit_code": 130}
    assert complete_tag(run / "checkpoints") is None and not [r for r in records(run) if "loss" in r]


def test_epochs_select_the_best_validation_checkpoint_and_prune_the_rest(demo_assets, dist_env, signals, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(demo_assets, run, "train.epochs=3", "train.eval_every=1", "train.keep_checkpoints=1",
                           "train.batch_size=96")  # 6 steps per epoch
    results = trainer.train()
    val = [r for r in records(run) if r.get("event") == "val"]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    best_epoch = max(val, key=lambda r: r["R1"])["epoch"]
    best = complete_tag(run / "checkpoints", "best")
    assert best == f"step{6 * best_epoch:08d}" and complete_tag(run / "checkpoints") == "step00000018"
    # one step folder kept besides the ones the pointers name
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == sorted({best, "step00000018"})
    assert results["model_selection"] == f"best validation R1 ({best})"
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]


def test_preemption_saves_where_the_run_is_and_a_restart_resumes_there(demo_assets, dist_env, signals, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(demo_assets, run, "train.max_steps=6")
    os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning signal: the handler only sets a flag
    outcome = trainer.train()
    assert outcome == {"preempted": True, "checkpoint": "step00000001"}
    assert complete_tag(run / "checkpoints") == "step00000001"
    event = [r for r in records(run) if r.get("event") == "preempted"]
    assert event and event[0]["step"] == 1
    restarted = make_trainer(demo_assets, run, "train.max_steps=3")
    assert restarted.resume("auto") and restarted.engine.global_steps == 1
    assert "test" in restarted.train()


def test_training_starts_from_exported_adapters_at_another_layout(demo_assets, dist_env, signals, tmp_path, capsys):
    from dsmoe.portable import save_portable

    source = make_trainer(demo_assets, tmp_path / "source", "train.max_steps=2")
    source.train()
    weights = save_portable(source.model, source.cfg, tmp_path / "adapters.safetensors", "test")
    capsys.readouterr()
    started = make_trainer(demo_assets, tmp_path / "started", "train.max_steps=1", portable_init=str(weights))
    assert (f"initialised the trainable weights from {weights} (exported adapters: all "
            f"{started.trainable_count:,} trainable parameters)") in capsys.readouterr().out
    trained = {n: p.detach().clone() for n, p in source.model.named_parameters() if p.requires_grad}
    loaded = {n: p.detach() for n, p in started.model.named_parameters() if p.requires_grad}
    assert trained.keys() == loaded.keys() and all((trained[n] == loaded[n]).all() for n in trained)
    assert started.train()["start_label"] == "at start"


def test_a_log_file_shows_a_progress_line_at_every_logged_step(demo_assets, dist_env, signals, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = make_trainer(demo_assets, run, "train.max_steps=4", "train.log_every=2")
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if "samples/s" in line]
    assert [line.split(" | ")[0] for line in lines] == ["[dsmoe] step 2/4 epoch 1/3", "[dsmoe] step 4/4 epoch 1/3"]
    for line in lines:  # loss terms, lr, throughput, data wait, memory, ETA
        assert all(part in line for part in (" loss ", " sdm ", " lr ", " s/step, data wait ", " peak ", "ETA ")), line
    assert lines[-1].endswith("ETA 0:00:00")
    steps = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert all(r["samples_per_s"] > 0 and r["step_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    assert all("step" in r for r in records(run)), "every record says at which step it was logged"
    # routing counts the whole interval: 2 steps x 32 samples x top-2 x (33 image tokens: CLS + 8x4 patches, or
    # 32 text tokens)
    for r in steps:
        assert {name: sum(counts) for name, counts in r["routing"].items()} == {
            "image.0": 4224, "image.1": 4224, "text.0": 4096, "text.1": 4096}


def test_a_crash_resumed_run_logs_each_step_once(demo_assets, dist_env, signals, tmp_path):
    from dsmoe.checkpoint import folder as checkpoints

    run = tmp_path / "run"
    make_trainer(demo_assets, run, "train.max_steps=5", "train.checkpoint_every=2").train()
    # the crash: step 5 was logged, its checkpoint never completed
    ckpt = run / "checkpoints"
    import shutil

    shutil.rmtree(ckpt / "step00000005")
    checkpoints.write_pointer(ckpt, "latest", "step00000004")
    logged_before = [r["step"] for r in records(run) if "loss" in r]
    assert logged_before == [1, 2, 3, 4, 5]
    resumed = make_trainer(demo_assets, run, "train.max_steps=7")
    assert resumed.resume("auto") and resumed.engine.global_steps == 4
    resumed.train()
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["event"] for r in records(run) if "event" in r] == ["test"], "the first run's test record was cut"


def test_sigterm_and_ctrl_c_save_then_end_the_run_non_zero(demo_assets, dist_env, signals, tmp_path):
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        run = tmp_path / signal.Signals(signum).name
        trainer = make_trainer(demo_assets, run, "train.max_steps=6")
        os.kill(os.getpid(), signum)  # the handler only sets a flag; the ranks save at the next step
        outcome = trainer.train()
        assert outcome == {"preempted": True, "checkpoint": "step00000001", "exit_code": code}
        assert complete_tag(run / "checkpoints") == "step00000001"
        event = [r for r in records(run) if r.get("event") == "preempted"]
        assert event[0]["outcome"] == f"stopped on {signal.Signals(signum).name}"


def test_resuming_with_other_settings_is_refused_unless_allowed(demo_assets, dist_env, signals, tmp_path):
    import pytest

    from dsmoe.config import ConfigError

    run = tmp_path / "run"
    first = make_trainer(demo_assets, run, "train.max_steps=2")
    first.train()
    facts = json.loads((run / "results.json").read_text())["run"]
    assert facts["world_size"] == 1 and facts["started"] and "dsmoe_version" in facts and "git_commit" in facts
    assert json.loads((run / "checkpoints" / "step00000002" / "COMPLETE").read_text())["run"] == facts
    changed = make_trainer(demo_assets, run, "train.max_steps=3", "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.5\nresume with --allow-config-change"):
        changed.resume("auto")
    allowed = make_trainer(demo_assets, run, "train.max_steps=3", "optim.lr=0.5")
    allowed.allow_config_change = True
    assert allowed.resume("auto") and allowed.engine.global_steps == 2
