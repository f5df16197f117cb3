"""Shards read from where users keep them: an HTTP server and an S3-compatible object store on loopback (real
servers, see ``tools/benchmarks/servers.py``) and webdataset's ``pipe:`` form, in process against the same shards
read locally; and a 2-rank training run with its evaluation reading only from the servers."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

from dsmoe.data.faults import SampleFault
from dsmoe.data.pipeline import EvalImages, TrainStream, TrainStreamConfig
from dsmoe.data.shard_reader import shard_samples
from dsmoe.demo.people import make_synthetic_pedes
from dsmoe.shards import location
from dsmoe.shards.format import read_split
from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.writer import write_shards
from launch import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
from benchmarks.servers import http_server, s3_server, upload  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    raw = make_synthetic_pedes(root / "raw", num_ids={"train": 6, "test": 3}, images_per_id=2, image_size=(64, 32))
    write_shards(read_person_layout("cuhk-pedes", raw), root / "shards", dataset="cuhk-pedes", samples_per_shard=4)
    return root / "shards"


@pytest.fixture
def aws_env(monkeypatch):
    with s3_server() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield env


def _stream(shard_dir: str) -> TrainStreamConfig:
    return TrainStreamConfig(shard_dir=shard_dir, split="train", image_size=(64, 32), micro_batch=3,
                             batches_per_epoch=7, rank=0, world_size=1, seed=5, shuffle_buffer=4)


def _same_data(local: str, remote: str, encoder) -> None:
    here, there = read_split(local, "train"), read_split(remote, "train")
    assert there.shards == [location.child(remote, location.file_name(p)) for p in here.shards]
    assert (there.samples, there.captions, there.shard_samples) == (12, 24, [4, 4, 4])
    fresh = list(TrainStream(_stream(local), encoder, epoch=1))
    streamed = list(TrainStream(_stream(remote), encoder, epoch=1))
    for near, far in zip(fresh, streamed, strict=True):
        for key in ("pid", "text", "image", "erase"):
            assert torch.equal(near[key], far[key])
    assert [b["cursor"].state is None for b in streamed] == [location.is_pipe(remote)] * 7
    # a resumed stream continues on the same batches: from its cursor, whose samples are read again by ranged
    # reads (a pipe: source has no cursors), or by replaying the epoch, seeking through the remote shards
    saved = fresh[4]["cursor"]  # saved reading local shards: it names shards, not where they are
    remote_cursors = {saved.slot: None if location.is_pipe(remote) else saved.state}
    for cursors in (remote_cursors, {}):
        for before, far in zip(fresh[5:], TrainStream(_stream(remote), encoder, epoch=1, start_batch=5,
                                                      cursors=cursors), strict=True):
            assert torch.equal(before["image"], far["image"]) and torch.equal(before["text"], far["text"])
    here = [(s.index, s.key, torch.equal(s.image, t.image)) for s, t in
            zip(EvalImages(local, "test", (64, 32), 0, 1), EvalImages(remote, "test", (64, 32), 0, 1), strict=True)]
    assert len(here) == 6 and all(same for *_, same in here)


@pytest.fixture
def encoder(tmp_path_factory, shards):
    from dsmoe.data.text import CaptionEncoder
    from dsmoe.demo.models import train_tokenizer

    captions = [c for r in read_person_layout("cuhk-pedes", shards.parent / "raw") for c in r.captions]
    return CaptionEncoder(train_tokenizer(captions, tmp_path_factory.mktemp("tok")), 32)


def test_http_shards_stream_the_same_batches_as_local_ones(shards, encoder):
    with http_server(shards.parent) as url:
        _same_data(str(shards), f"{url}/shards", encoder)


def test_s3_shards_stream_the_same_batches_as_local_ones(shards, encoder, aws_env):
    upload(aws_env, shards, "s3://data/cuhk/shards")
    _same_data(str(shards), "s3://data/cuhk/shards", encoder)


def test_pipe_shards_stream_the_same_batches_as_local_ones(shards, encoder):
    _same_data(str(shards), f"pipe:cat {shards}/{{name}}", encoder)


def test_a_server_error_is_retried_and_a_missing_file_named(shards, monkeypatch):
    monkeypatch.setattr(location, "RETRY_WAIT", 0.01)
    with http_server(shards.parent, failures={"train-000000.tar": 2, "train.manifest.json": 1}) as url:
        info = read_split(f"{url}/shards", "train")  # the manifest's first request fails: retried
        faults: list[SampleFault] = []
        assert [p for p, _ in shard_samples(info.shards[0], 4, faults)] == [0, 1, 2, 3] and not faults
        with pytest.raises(FileNotFoundError, match=f"no manifest for split 'val' in {url}/shards"):
            read_split(f"{url}/shards", "val")
    with http_server(shards.parent, failures={"train-000001.tar": 99}) as url:
        faults = []
        assert list(shard_samples(f"{url}/shards/train-000001.tar", 4, faults)) == []
        assert len(faults) == 4 and all(f.shard == "train-000001.tar" for f in faults)
        assert "503" in faults[0].reason, faults[0].reason
        with pytest.raises(location.ShardSourceError, match=f"could not read {url}/shards/train-000001.tar after 4"):
            location.read_bytes(f"{url}/shards/train-000001.tar")


def test_a_missing_bucket_and_a_pipe_without_a_name_are_clear_errors(shards, aws_env, monkeypatch):
    monkeypatch.setattr(location, "RETRY_WAIT", 0.01)
    with pytest.raises(FileNotFoundError, match="no manifest for split 'train' in s3://nobucket/shards"):
        read_split("s3://nobucket/shards", "train")
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        read_split(f"pipe:cat {shards}/train.manifest.json", "train")


def test_remote_locations_are_kept_as_given_in_run_files(tmp_path):
    from dsmoe.config import load_config

    cfg = load_config(None, ["demo=false", "data.shards=s3://data/cuhk/shards",
                             "data.eval_shards=pipe:curl -sf http://host/shards/{name}"])
    cfg.make_paths_absolute()
    assert cfg.data.shards == "s3://data/cuhk/shards"
    assert cfg.data.eval_shards == "pipe:curl -sf http://host/shards/{name}"


@pytest.mark.integration
def test_two_ranks_train_from_s3_and_evaluate_from_http(demo_assets, tmp_path):
    """The deepspeed launcher's 2 ranks read training shards from the object store and evaluation shards over
    HTTP, from copies that exist only behind the servers; then a separate evaluation reads them there too."""
    import json
    import subprocess

    from launch import LAUNCH_TIMEOUT, free_port, launch_env, run_ok, train_cmd

    served = tmp_path / "served"
    shutil.copytree(demo_assets["data.shards"], served / "shards")
    run = tmp_path / "run"
    with s3_server() as env, http_server(served) as url:
        upload(env, served / "shards", "s3://demo/shards")
        assets = {**demo_assets, "data.shards": "s3://demo/shards", "data.eval_shards": f"{url}/shards"}
        out = run_ok(train_cmd(assets, run, free_port(), "demo=false", "train.max_steps=4"),
                     env={**launch_env(), **env})
        assert "world size 2" in out
        config = (run / "config.yaml").read_text()
        assert "shards: s3://demo/shards" in config and f"eval_shards: {url}/shards" in config
        results = json.loads((run / "results.json").read_text())
        assert results["test"]["captions"] == 144 and "incomplete" not in results["test"]
        proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(run)], cwd=tmp_path,
                              env={**launch_env(), **env}, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        single = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert single["R1"] == pytest.approx(results["test"]["R1"], abs=1e-6)
