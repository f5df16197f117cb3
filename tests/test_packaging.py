"""The package works installed from a wheel, away from the checkout: shipped configs, entry points, a fast
config check, and a training run on the demo's assets."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launch import REPO_ROOT, launch_env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The repository built into a wheel and installed (without its dependencies) into a fresh directory."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist")], check=True, capture_output=True)
    wheel = next((root / "dist").glob("dsmoe-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dsmoe/ds_configs/zero2.json" in names and "dsmoe/configs/dm_adapter/demo.yaml" in names
    assert "dsmoe/configs/baselines/lora_demo.yaml" in names and "dsmoe/sweeps/baselines_demo.yaml" in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    for script in ("dsmoe-train = dsmoe.train:main", "dsmoe-evaluate = dsmoe.evaluate:main",
                   "dsmoe-export = dsmoe.export:main", "dsmoe-shards = dsmoe.shards.cli:main",
                   "dsmoe-retrieve = dsmoe.retrieve:main", "dsmoe-report = dsmoe.report:main",
                   "dsmoe-sweep = dsmoe.sweep:main"):
        assert script in entry_points
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True)
    return root / "site"


def _python(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**launch_env(), "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_the_installed_package_trains_from_anywhere(installed, demo_assets, tmp_path):
    where = _python(installed, tmp_path, "-c", "import dsmoe, dsmoe.ds_config as d; print(dsmoe.__file__, "
                    "d.DEFAULT.is_file())")
    assert where.stdout.split() == [str(installed / "dsmoe" / "__init__.py"), "True"], where.stderr
    typo = _python(installed, tmp_path, "-m", "dsmoe.train", "--set", "model.imge_size=[1, 1]")
    assert typo.returncode == 2 and "unknown key 'model.imge_size'" in typo.stderr
    # the config is checked before anything heavy loads
    loaded = _python(installed, tmp_path, "-c", "import sys; from dsmoe.train import main; code = main(['--set', "
                     "'model.imge_size=[1, 1]']); print(code, [m for m in ('torch', 'deepspeed', 'transformers', "
                     "'numpy') if m in sys.modules])")
    assert loaded.stdout.strip() == "2 []", loaded.stdout + loaded.stderr
    assert _python(installed, tmp_path, "-m", "dsmoe.shards", "--help").returncode == 0
    sets = [a for k, v in {**demo_assets, "adapter.ep_size": "1", "train.max_steps": "2",
                           "train.output_dir": "run", "train.eval_zero_shot": "false", "data.workers": "0"}.items()
            for a in ("--set", f"{k}={v}")]
    run = _python(installed, tmp_path, "-m", "dsmoe.train", "--ds_config", "zero2_fp32.json", *sets)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"]["captions"] == 144
