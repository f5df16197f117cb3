"""tools/bench_train.py runs under the deepspeed launcher and reports its figures (their values are not checked:
speed belongs to benchmarks, not tests)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch import LAUNCH_TIMEOUT, REPO_ROOT, free_port, launch_env, run_ok

pytestmark = pytest.mark.integration
BENCH = str(REPO_ROOT / "tools" / "bench_train.py")
TINY = ("--set", "model.image_size=[16, 24]", "--set", "model.text_length=16")


def test_bench_reports_speed_and_memory_with_experts_over_two_ranks(tiny_clip_dir):
    out = run_ok([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                  BENCH, "--ds_config", str(REPO_ROOT / "ds_configs" / "zero2_bf16.json"), "--clip", str(tiny_clip_dir),
                  "--batch", "4", "--steps", "2", "--warmup", "1", "--set", "adapter.ep_size=2", *TINY])
    lines = [line[line.index("{"):] for line in out.splitlines() if '"pairs_per_s"' in line]
    assert len(lines) == 1, "rank 0 alone prints the figures"
    figures = json.loads(lines[0])
    assert (figures["world_size"], figures["ep_size"], figures["dtype"]) == (2, 2, "bfloat16")
    assert figures["batch_per_rank"] == 4 and figures["image_size"] == [16, 24] and figures["steps"] == 2
    assert figures["pairs_per_s"] == pytest.approx(8 / figures["step_s_median"], rel=0.01)
    assert figures["peak_rss_MiB"] > 0 and figures["trainable_params_rank0"] > 0


def test_bench_refuses_an_ep_size_the_world_cannot_hold(tiny_clip_dir):
    proc = subprocess.run([sys.executable, BENCH, "--clip", str(tiny_clip_dir), "--set", "adapter.ep_size=2", *TINY],
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 2 and "adapter.ep_size=2 does not divide the world size 1" in proc.stderr
