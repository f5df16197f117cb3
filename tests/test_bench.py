"""tools/bench.py: every section runs at CI size and reports its rows (the values are speed, which benchmarks
measure and tests do not; that both metric implementations agree is checked)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch import LAUNCH_TIMEOUT, REPO_ROOT, launch_env

sys.path.insert(0, str(REPO_ROOT / "tools"))
from benchmarks.measure import Samples, extra_peak_rss  # noqa: E402

pytestmark = pytest.mark.integration


def test_quick_benchmark_prints_every_row_and_the_metrics_agree(tmp_path):
    # the experts section (two 2-rank launches of tools/bench_train.py) is covered by tests/test_bench_train.py
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench.py"), "--quick",
                           "--only", "metrics,scale,step,reader,gpu", "--work-dir", str(tmp_path / "work"),
                           "--json", str(out)], cwd=tmp_path, env=launch_env(), capture_output=True, text=True,
                          timeout=2 * LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    rows = {row["figure"]: row for row in figures["rows"]}
    expected = ["rank_metrics ICFG-PEDES test: dense time / dsmoe time",
                "rank_metrics ICFG-PEDES test: extra peak RSS, dsmoe / dense",
                "rank_metrics CUHK-PEDES test: dense time / dsmoe time",
                "recall_metrics COCO 5k: dense time / dsmoe time",
                "DM-Adapter step / full fine-tune step (1 thread)",
                "DM-Adapter step / frozen forward + backward (1 thread)",
                "DM-Adapter / full fine-tune peak memory", "LoRA / full fine-tune peak memory",
                "DM-Adapter step / full fine-tune step (batch", "LoRA step / full fine-tune step (batch",
                "shard reader / folder reader, 2 workers", "shard reader / folder reader, 0 workers",
                "shard reader with sha256 checks / without, 0 workers"]
    for name in expected:
        assert any(figure.startswith(name) for figure in rows), (name, sorted(rows))
    assert not any("metrics differ" in figure for figure in rows)
    peak = figures["baselines_step"]["peak_mib"]
    assert set(peak) == {"dm", "lora", "full"} and min(peak.values()) > 0, peak
    assert all(figures[key]["metrics_agree"] for key in ("rank_icfg", "rank_cuhk", "recall_coco"))
    assert any(figure.startswith("evaluation ") and "from features" in figure for figure in rows)
    assert figures["machine"]["cores"] >= 1 and figures["quick"] is True
    for line in [row["figure"] for row in figures["rows"]]:
        assert line in proc.stdout, "the table is printed as well as written"
    import torch

    if not torch.cuda.is_available():
        assert rows["GPU section"]["value"] == "skipped: no GPU visible"


def test_extra_peak_rss_counts_only_what_the_block_allocates():
    held = bytearray(150 * 2 ** 20)  # resident before the block: not counted
    held[::4096] = b"x" * len(held[::4096])
    out: dict = {}
    with extra_peak_rss(out):
        block = bytearray(200 * 2 ** 20)
        block[::4096] = b"y" * len(block[::4096])  # touch every page
        del block
    assert 180 <= out["extra_rss_mib"] < 260, out


def test_samples_summarise_min_median_and_noise():
    samples = Samples()
    for seconds in (2.0, 1.0, 4.0):
        samples.add({"seconds": seconds, "extra_rss_mib": seconds * 10})
    assert samples.summary() == {"min_s": 1.0, "median_s": 2.0, "noise": 1.5, "repeats": 3, "extra_rss_mib": 40.0}


def test_quick_scale_rehearsal_runs_its_sections(tmp_path):
    """Every section but ``s3``, whose 2-rank training from a loopback S3 server test_remote_shards runs."""
    figures_path = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_scale.py"), "--quick", "--only",
                           "convert,train,resume,evaluate", "--work-dir", str(tmp_path / "work"), "--json",
                           str(figures_path)], cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=3 * LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    figures = json.loads(figures_path.read_text())
    rows = [row["figure"] for row in figures["rows"]]
    assert rows[0].startswith("convert 156 images") and len(rows) == 8, rows
    assert figures["convert"]["images"] == 3 * (40 + 6 + 6) and figures["convert"]["shards"] == 3
    assert figures["train"]["test"]["images"] == 18 and figures["train"]["steps_per_s"] > 0
    assert figures["evaluate_icfg"]["images"] == figures["evaluate_icfg"]["captions"] == 30
    assert set(figures["resume"]) == {"batches_per_epoch", "replay", "cursor"}
    assert set(figures["resume"]["cursor"]) == set(figures["resume"]["replay"]) == {"0%", "10%", "90%"}
