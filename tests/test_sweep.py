"""Sweeps: a spec becomes its runs (or one error line before anything starts), a Slurm array task finds its run,
and the report aggregates a sweep's rows over their seeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsmoe import sweep
from dsmoe.report import main as report_main
from dsmoe.report.sweep import load_sweep_results, sweep_markdown
from launch import REPO_ROOT


def write_spec(folder: Path, text: str) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(text)
    return spec


SPEC = """
name: tiny
config: dm_adapter/demo.yaml
set: [train.epochs=1]
seeds: [1, 2]
ranks: 2
rows:
  - {name: one adapter, set: [adapter.router=dense]}
  - {name: lora, config: baselines/lora_demo.yaml}
grid:
  adapter.top_k: [1, 2]
"""


def test_a_spec_becomes_rows_of_seeded_runs_in_their_folders(tmp_path, capsys):
    plan = sweep.load_sweep(write_spec(tmp_path, SPEC), tmp_path / "out")
    assert list(plan.rows) == ["one adapter", "lora", "top_k=1", "top_k=2"]
    runs = plan.rows["top_k=1"]
    assert [r.seed for r in runs] == [1, 2] and runs[0].run_dir == tmp_path / "out" / "top_k-1" / "seed1"
    args = runs[1].train_args()
    assert args[args.index("--config") + 1] == str(REPO_ROOT / "dsmoe" / "configs" / "dm_adapter" / "demo.yaml")
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets == ["train.epochs=1", "adapter.top_k=1", "train.seed=2",
                    f"train.output_dir={tmp_path / 'out' / 'top_k-1' / 'seed2'}"]
    assert plan.rows["lora"][0].config.name == "lora_demo.yaml" and plan.rows["lora"][0].sets == ["train.epochs=1"]

    assert sweep.main([str(tmp_path / "spec.yaml"), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "8 runs in 4 rows; 8 to run" in out and "one adapter" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("text, message", [
    ("name: x\nconfig: dm_adapter/demo.yaml\nrows: [{name: a}]\nseed: [1]\n", "unknown key 'seed'"),
    ("name: x\nconfig: nowhere.yaml\nrows: [{name: a}]\n", "nowhere.yaml is neither a file"),
    ("name: x/y\nconfig: dm_adapter/demo.yaml\nrows: [{name: a}]\n", "name must be a short folder name"),
    ("name: x\nconfig: dm_adapter/demo.yaml\n", "no rows"),
    ("name: x\nconfig: dm_adapter/demo.yaml\nseeds: [1, 1]\nrows: [{name: a}]\n", "distinct non-negative"),
    ("name: x\nconfig: dm_adapter/demo.yaml\nrows: [{name: a}, {name: a}]\n", "two rows named 'a'"),
    ("name: x\nconfig: dm_adapter/demo.yaml\nrows: [{name: a, set: [adapter.top_k=9]}]\n",
     "row 'a': adapter.top_k=9 must be between 1 and adapter.num_experts=6"),
    ("name: x\nconfig: dm_adapter/demo.yaml\nranks: 3\nrows: [{name: a}]\n",
     "row 'a': adapter.ep_size=2 does not divide the world size 3"),
    ("name: x\nconfig: dm_adapter/demo.yaml\nrows: [{name: a, sets: []}]\n", "rows[0] must be a mapping"),
])
def test_a_spec_mistake_is_one_error_line_before_anything_starts(tmp_path, capsys, text, message):
    assert sweep.main([str(write_spec(tmp_path, text)), "--local", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_array_task_reads_its_run_as_nul_separated_arguments(tmp_path, capsysbinary):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps({"run_dir": f"/r/{i}", "config": "/c.yaml", "ds_config": "zero2.json",
                                          "set": [f"train.seed={i}", "x=$(touch /tmp/pwned) ; y"]})
                              for i in range(3)) + "\n")
    assert sweep.main(["--array-task", str(runs), "2"]) == 0
    values = capsysbinary.readouterr().out.decode().split("\0")
    assert values == ["/r/2", "/c.yaml", "zero2.json", "--set", "train.seed=2", "--set", "x=$(touch /tmp/pwned) ; y",
                      ""]
    assert sweep.main(["--array-task", str(runs), "3"]) == 2


def fake_run(folder: Path, r1: float, seconds: float = 120.0, trainable: int = 1000) -> None:
    folder.mkdir(parents=True)
    results = {"test": {"R1": r1, "mAP": r1 / 2, "images": 72, "captions": 144},
               "zero_shot": {"R1": 10.0, "mAP": 5.0, "images": 72, "captions": 144},
               "trainable_parameters": trainable, "config": {"method": "dm_adapter"}}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.jsonl").write_text(json.dumps({"time": 1000.0, "step": 1}) + "\n"
                                          + json.dumps({"time": 1000.0 + seconds, "step": 2}) + "\n")


def test_the_sweep_table_has_mean_and_std_per_row_the_best_and_the_rows_within_its_noise(tmp_path, capsys):
    folder = tmp_path / "sweep"
    rows = {"a": [30.0, 34.0], "b": [31.0, 32.0], "c": [20.0, 21.0], "d": [25.0]}
    for name, values in rows.items():
        for seed, r1 in enumerate(values, 1):
            fake_run(folder / name / f"seed{seed}", r1)
    index = {"name": "t", "rows": {name: [{"seed": s, "run_dir": f"{name}/seed{s}"} for s in (1, 2)]
                                   for name in rows}}
    (folder / "sweep.json").write_text(json.dumps(index))
    name, results = load_sweep_results(folder)
    text, primary = sweep_markdown(name, results)
    assert primary == "R1"
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "32.00 ± 2.83" in lines["a"] and "best R1" in lines["a"]  # sample std of 30, 34
    assert "31.50 ± 0.71" in lines["b"] and "within 1 std of the best R1" in lines["b"]
    assert "20.50 ± 0.71" in lines["c"] and "within 1 std" not in lines["c"]
    assert "| d | 1 of 2 |" in lines["d"] and "25.00 ± 0.00" in lines["d"]
    assert "10.00" in lines["untrained (zero-shot)"] and "1,000" in lines["a"] and "2.0" in lines["a"]  # minutes

    assert report_main([str(folder)]) == 0
    printed = capsys.readouterr().out
    assert (folder / "report" / "table.md").read_text() in printed
    assert (folder / "report" / "rows.png").stat().st_size > 1000
