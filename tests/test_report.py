"""dsmoe.report on small synthetic run folders: what it reads from a run, what its pictures show, what the
comparison table says, and how the command answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dsmoe.report import figures, main, report_run, report_runs
from dsmoe.report.runs import (MISSING, RoutingLog, balance_series, best_validation, config_differences, encoders,
                               imbalance, load_cv, load_run, routing_shares, run_labels, summed_counts, thirds)

CONFIG = {"method": "dm_adapter", "adapter": {"num_experts": 2, "top_k": 1},
          "optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "train": {"epochs": 2, "output_dir": "runs/a"},
          "wandb": {"name": None}, "dm_adapter": {"lb_weight": 0.5}}


def step(n: int, loss: float, lr: float, routing: dict | None = None, **extra) -> dict:
    record = {"time": 100.0 + n, "step": n, "epoch": 0, "loss": loss, "sdm": loss - 1, "lb": 1.0 + n / 10, "lr": lr,
              "samples_per_s": 50.0, "step_s": 0.2, "data_wait": 0.1, **extra}
    if routing:
        record["routing"] = routing
    return record


def evaluation(event: str, n: int, r1: float) -> dict:
    return {"time": 200.0 + n, "event": event, "split": "test" if event != "val" else "val", "step": n,
            "R1": r1, "R5": r1 + 20, "mAP": r1 + 5, "images": 72, "captions": 144}


# a DM-Adapter run: zero-shot, 6 steps with routing, validation at steps 3 and 6, test; one corrupt line
ROUTING = [
    {"image.0": [10, 10], "image.1": [5, 15], "text.0": [20, 0]},
    {"image.0": [20, 0], "image.1": [10, 10], "text.0": [0, 20]},
    {"image.0": [10, 10], "image.1": [10, 10], "text.0": [10, 10]},
    {"image.0": [5, 15], "image.1": [20, 0], "text.0": [10, 10]},
    {"image.0": [10, 10], "image.1": [15, 5], "text.0": [20, 0]},
    {"image.0": [0, 20], "image.1": [10, 10], "text.0": [0, 20]},
]
RECORDS = [evaluation("zero_shot", 0, 10.0),
           *[step(n, loss=10.0 - n, lr=0.001 * n, routing=ROUTING[n - 1],
                  **({"loss_scale": 1024.0, "skipped_steps": 0, "bad_samples": 1} if n == 2 else {}))
             for n in (1, 2, 3)],
           evaluation("val", 3, 20.0),
           {"time": 300.0, "event": "bad_samples", "split": "train", "step": 3, "new": 1, "total": 1, "limit": 5,
            "reasons": ["x"]},
           *[step(n, loss=10.0 - n, lr=0.001 * n, routing=ROUTING[n - 1]) for n in (4, 5, 6)],
           evaluation("val", 6, 30.0),
           evaluation("test", 6, 25.0)]
RESULTS = {"model_selection": "best validation R1 (step00000006)",
           "zero_shot": {k: v for k, v in RECORDS[0].items() if k not in ("time", "event", "split", "step")},
           "test": {"R1": 25.0, "R5": 45.0, "mAP": 30.0, "images": 72, "captions": 144},
           "validation": [{"epoch": 0, "step": 3, "R1": 20.0}, {"epoch": 1, "step": 6, "R1": 30.0}],
           "trainable_parameters": 1234, "world_size": 2, "ep_size": 2}


def write_run(folder: Path, records: list[dict] = RECORDS, results: dict | None = RESULTS, config: dict = CONFIG,
              corrupt: bool = True) -> Path:
    """A run folder: metrics.jsonl (a line cut mid-write after the first step when ``corrupt``), config.yaml and,
    for a finished run, results.json."""
    folder.mkdir(parents=True)
    lines = [json.dumps(record) for record in records]
    if corrupt:
        lines.insert(2, '{"time": 101.5, "step": 2, "loss": 8.')
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs" / "dm")


def series_points(series) -> list[tuple[int, float]]:
    return list(zip(series.steps, series.values))


def assert_series(series, steps: list[int], values: list[float]) -> None:
    assert list(series.steps) == steps and list(series.values) == pytest.approx(values)


# --- data --------------------------------------------------------------------------------------------------------

def test_loss_terms_and_lr_are_read_at_their_steps_and_a_corrupt_line_is_skipped(run_dir, capsys):
    run = load_run(run_dir)
    assert list(run.losses) == ["loss", "sdm", "lb"], "bookkeeping keys (lr, speed, fp16, bad samples) are no loss"
    assert series_points(run.losses["loss"]) == [(n, 10.0 - n) for n in range(1, 7)]
    assert series_points(run.losses["sdm"]) == [(n, 9.0 - n) for n in range(1, 7)]
    assert_series(run.losses["lb"], [1, 2, 3, 4, 5, 6], [1.0 + n / 10 for n in range(1, 7)])
    assert_series(run.lr, [1, 2, 3, 4, 5, 6], [0.001 * n for n in range(1, 7)])
    assert run.skipped_lines == [3]
    assert "metrics.jsonl line 3" in capsys.readouterr().err
    assert run.method == "dm_adapter" and run.results["trainable_parameters"] == 1234 and run.last_step == 6


def test_dasd_loss_terms_are_found_without_a_list_of_names(tmp_path):
    records = [{"step": n, "epoch": 0, "loss": 2.0 / n, "mse": 1.0 / n, "consistency": 0.5, "discriminator": 0.69,
                "adversarial": 0.7, "lr": 1e-4, "routing": {"text.0": [5, 3], "text.1": [4, 4]}} for n in (1, 2)]
    run = load_run(write_run(tmp_path / "cla", records, results=None, corrupt=False))
    assert list(run.losses) == ["loss", "mse", "consistency", "discriminator", "adversarial"]
    assert series_points(run.losses["mse"]) == [(1, 1.0), (2, 0.5)]
    assert encoders(run.routing) == {"text": ["text.0", "text.1"]}


def test_evaluations_keep_their_event_step_and_top_level_metrics(run_dir):
    run = load_run(run_dir)
    assert [(p.event, p.step) for p in run.evals] == [("zero_shot", 0), ("val", 3), ("val", 6), ("test", 6)]
    assert run.evals[1].metrics == {"R1": 20.0, "R5": 40.0, "mAP": 25.0}, "counts and bookkeeping are no metrics"
    assert best_validation(run)[0] == "R1" and best_validation(run)[1].step == 6


def test_dasd_evaluations_drop_per_language_dicts_and_stepless_records_take_the_last_step(tmp_path):
    language = {"t2i_R1": 1.0, "AR": 5.0, "images": 60, "captions": 60}
    records = [{"event": "zero_shot", "split": "test", "AR_xx": 5.0, "xx": language, "mAR": 4.0},
               {"step": 4, "loss": 1.0, "lr": 1e-3},
               {"event": "val", "split": "val", "epoch": 1, "AR_xx": 9.0, "xx": language, "mAR": 8.0},
               {"event": "preempted", "step": 4, "outcome": "saved"}]
    run = load_run(write_run(tmp_path / "old", records, results=None, corrupt=False))
    assert [(p.event, p.step, p.metrics) for p in run.evals] == [("zero_shot", 0, {"AR_xx": 5.0, "mAR": 4.0}),
                                                                 ("val", 4, {"AR_xx": 9.0, "mAR": 8.0})]
    assert best_validation(run)[0] == "mAR", "without results.json, R1 or else mAR is the selection metric"


def test_routing_shares_are_each_layers_tokens_summed_over_the_logs():
    logs = [RoutingLog(1, {"image.0": [10, 10], "image.10": [1, 3], "image.2": [0, 0]}),
            RoutingLog(2, {"image.0": [20, 0], "image.10": [3, 1], "image.2": [0, 0]})]
    assert encoders(logs) == {"image": ["image.0", "image.2", "image.10"]}, "layers in numeric order"
    shares = routing_shares(logs, ["image.0", "image.10", "image.2"])
    assert shares[:2] == [[0.75, 0.25], [0.5, 0.5]]
    assert np.isnan(shares[2]).all(), "a layer that routed no token has no shares"
    first, last = thirds([RoutingLog(n, {}) for n in range(1, 8)])
    assert [log.step for log in first] == [1, 2, 3] and [log.step for log in last] == [5, 6, 7]


def test_balance_is_the_mean_over_an_encoders_layers_per_logged_step():
    assert imbalance([30, 10]) == 1.5 and imbalance([10, 10]) == 1.0 and imbalance([0, 0]) is None
    assert load_cv([30, 10]) == pytest.approx(0.5) and load_cv([10, 10]) == 0.0
    logs = [RoutingLog(1, {"image.0": [10, 10], "image.1": [30, 10], "text.0": [40, 0]}),
            RoutingLog(5, {"image.0": [20, 0], "image.1": [0, 0], "text.0": [5, 5]})]
    ratio = balance_series(logs)
    assert series_points(ratio["image"]) == [(1, 1.25), (5, 2.0)], "a layer without tokens is left out of the mean"
    assert series_points(ratio["text"]) == [(1, 2.0), (5, 1.0)]
    assert_series(balance_series(logs, load_cv)["image"], [1, 5], [0.25, 1.0])


def test_config_differences_and_labels():
    other = {**CONFIG, "optim": {"lr": 0.002, "betas": [0.9, 0.999]}, "train": {"epochs": 2, "output_dir": "runs/b"},
             "wandb": {"name": "b"}, "dasd": {"stage": "cla"}}
    del other["dm_adapter"]
    differences = config_differences([CONFIG, other])
    assert differences["optim.lr"] == [0.001, 0.002]
    assert differences["dasd.stage"] == [MISSING, "cla"]
    assert differences["dm_adapter.lb_weight"] == [0.5, MISSING]
    assert not {"optim.betas", "train.epochs", "train.output_dir", "wandb.name"} & set(differences)
    assert run_labels([Path("/x/final/dm"), Path("/x/now/dm"), Path("/x/final/cla")]) == ["final/dm", "now/dm", "cla"]


# --- pictures ----------------------------------------------------------------------------------------------------

def test_losses_figure_has_one_titled_subplot_per_term_with_its_points(run_dir):
    fig = figures.losses_figure([load_run(run_dir)])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "sdm", "lb"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xydata(), [(n, 10.0 - n) for n in range(1, 7)])
    np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_xydata(), [(n, 1.0 + n / 10) for n in range(1, 7)])
    figures._pyplot().close(fig)


def test_eval_figure_draws_val_as_a_line_and_zero_shot_and_test_as_markers(run_dir):
    fig = figures.eval_figure([load_run(run_dir)])
    assert [ax.get_title() for ax in fig.axes] == ["R1", "R5", "mAP"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["val"].get_xydata(), [(3, 20.0), (6, 30.0)])
    np.testing.assert_allclose(lines["zero-shot"].get_xydata(), [(0, 10.0)])
    np.testing.assert_allclose(lines["test"].get_xydata(), [(6, 25.0)])
    assert lines["test"].get_linestyle() == "None" and lines["val"].get_marker() == "o"
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["zero-shot", "val", "test"]
    figures._pyplot().close(fig)


def test_routing_figure_heat_maps_hold_each_layers_expert_shares(run_dir):
    fig = figures.routing_figure(load_run(run_dir))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert set(panels) == {f"{encoder}: {period}" for encoder in ("image", "text")
                           for period in ("whole run", "first third (steps 1–2)", "last third (steps 5–6)")}
    # over the whole run, image.0 sent 55 and 65 of its 120 tokens to experts 0 and 1; image.1 70 and 50
    np.testing.assert_allclose(panels["image: whole run"].images[0].get_array(),
                               [[55 / 120, 65 / 120], [70 / 120, 50 / 120]])
    np.testing.assert_allclose(panels["text: first third (steps 1–2)"].images[0].get_array(), [[0.5, 0.5]])
    np.testing.assert_allclose(panels["image: last third (steps 5–6)"].images[0].get_array(), [[0.25, 0.75],
                                                                                              [0.625, 0.375]])
    ax = panels["image: whole run"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["image.0", "image.1"] and ax.get_xlabel() == "expert"
    assert any(a.get_ylabel().startswith("share of the layer's tokens") for a in fig.axes), "a colour bar"
    figures._pyplot().close(fig)


def test_balance_figure_plots_each_encoders_mean_imbalance(run_dir):
    fig = figures.balance_figure(load_run(run_dir))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"image", "text"}
    # image at step 1: layers [10, 10] -> 1.0 and [5, 15] -> 1.5; text: [20, 0] -> 2.0
    assert tuple(lines["image"].get_xydata()[0]) == (1, 1.25) and tuple(lines["text"].get_xydata()[0]) == (1, 2.0)
    figures._pyplot().close(fig)


def assert_real_picture(path: Path) -> None:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{path.name} is (nearly) one colour"


def test_one_run_report_writes_pictures_and_a_summary(run_dir, tmp_path):
    written = report_run(load_run(run_dir), tmp_path / "out")
    names = [path.name for path in written]
    assert names == ["losses.png", "lr.png", "eval.png", "routing.png", "balance.png", "summary.md"]
    for path in written[:-1]:
        assert_real_picture(path)
    summary = written[-1].read_text()
    for text in ("# dm", str(run_dir.resolve()), "dm_adapter", "best validation R1 (step00000006)",
                 "R1 30.00 (step 6)", "1,234", "| R1 | 10.00 | 25.00 |", "- [routing.png](routing.png)"):
        assert text in summary


def test_a_run_without_experts_or_results_gets_no_routing_pictures(tmp_path):
    records = [{"step": n, "loss": 1.0, "lr": 1e-3} for n in (1, 2)]
    written = report_run(load_run(write_run(tmp_path / "plain", records, results=None)), tmp_path / "out")
    assert [path.name for path in written] == ["losses.png", "lr.png", "summary.md"]
    assert "unfinished (no results.json; last logged step 2)" in written[-1].read_text()


def test_several_runs_compare_their_configs_and_results(tmp_path):
    a = write_run(tmp_path / "final" / "dm")
    b = write_run(tmp_path / "now" / "dm", results={**RESULTS, "test": {"R1": 27.5}},
                  config={**CONFIG, "optim": {"lr": 0.002, "betas": [0.9, 0.999]},
                          "train": {"epochs": 2, "output_dir": "runs/b"}, "wandb": {"name": "b"}})
    c = write_run(tmp_path / "now" / "unfinished", RECORDS[:3], results=None)
    runs = [load_run(path) for path in (a, b, c)]
    for run, label in zip(runs, run_labels([run.path for run in runs])):
        run.label = label
    written = report_runs(runs, tmp_path / "out")
    assert [path.name for path in written] == ["losses.png", "lr.png", "eval.png", "comparison.md"]
    text = written[-1].read_text()
    config_table, results_table = text.split("## Results")
    assert "| key | final/dm | now/dm | unfinished |" in config_table
    assert "| `optim.lr` | 0.001 | 0.002 | 0.001 |" in config_table
    for key in ("optim.betas", "train.epochs", "train.output_dir", "wandb.name", "method"):
        assert f"`{key}`" not in config_table
    assert "| test R1 | 25.00 | 27.50 | — |" in results_table
    assert "| best val R1 | 30.00 (step 6) | 30.00 (step 6) | — |" in results_table
    assert "| trainable parameters | 1,234 | 1,234 | — |" in results_table
    assert "unfinished (no results.json; last logged step 2)" in results_table
    fig = figures.losses_figure(runs)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["final/dm", "now/dm", "unfinished"]
    figures._pyplot().close(fig)


# --- command -----------------------------------------------------------------------------------------------------

def test_cli_refuses_a_missing_path_and_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "no metrics.jsonl" in err and "Traceback" not in err


def test_cli_prints_the_paths_it_wrote(run_dir, tmp_path, capsys):
    assert main([str(run_dir)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [path.name for path in printed][-1] == "summary.md" and len(printed) == 6
    assert all(path.is_file() and path.parent == run_dir.resolve() / "report" for path in printed)
    other = write_run(tmp_path / "other", results=None)
    assert main([str(run_dir), str(other), "--out", str(tmp_path / "cmp")]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[-1] == tmp_path / "cmp" / "comparison.md" and all(path.is_file() for path in printed)


def test_non_finite_values_and_steps_that_repeat_or_go_back_are_warned_about(tmp_path, capsys):
    """What a diverged run or two runs in one folder leave in metrics.jsonl is said, not drawn silently."""
    records = [{"step": n, "loss": 1.0 / n, "lr": 0.1} for n in range(1, 6)]
    records[3]["loss"] = float("nan")
    records += [{"step": n, "loss": float("inf"), "lr": 0.1} for n in (3, 4)]  # a second run's records
    run = load_run(write_run(tmp_path / "mixed", records, results=None, corrupt=False))
    err = capsys.readouterr().err
    assert "'loss' is not finite (NaN or infinite) at 3 logged steps, the first at step 4" in err
    assert "steps repeat or go back 1 times (the first at line 6: step 3 after step 5)" in err
    assert len(run.warnings) == 2 and list(run.losses["loss"].steps) == [1, 2, 3, 4, 5, 3, 4]
    summary = (report_run(run, tmp_path / "out")[-1]).read_text()
    assert "- Warning: steps repeat or go back" in summary and "- Warning: 'loss' is not finite" in summary


def test_routing_logs_of_a_long_run_are_merged_keeping_their_sums(tmp_path, monkeypatch):
    from dsmoe.report import runs

    monkeypatch.setattr(runs, "MAX_ROUTING_LOGS", 4)
    records = [{"step": n, "loss": 1.0, "routing": {"image.0": [n, 1]}} for n in range(1, 20)]
    run = load_run(write_run(tmp_path / "long", records, results=None, corrupt=False))
    assert 4 <= len(run.routing) < 8 and run.routing[-1].step == 19
    assert summed_counts(run.routing, "image.0") == [sum(range(1, 20)), 19]
