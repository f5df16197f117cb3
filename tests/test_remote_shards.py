"""Shards read from where users keep them: an HTTP server and an S3-compatible object store on loopback (real
servers, see ``tools/benchmarks/servers.py``) and webdataset's ``pipe:`` form, in process against the same shards
read locally; and a 2-rank training run with its evaluation reading only from the servers."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from dsmoe.data.bad_samples import SampleFault
from dsmoe.data.pipeline import CaptionPairs, EvalImages, TrainStream, TrainStreamConfig
from dsmoe.data.shard_reader import shard_samples
from dsmoe.demo.people import make_synthetic_pedes
from dsmoe.data import location
from dsmoe.launcher import free_port
from dsmoe.data.format import ManifestError, read_split
from dsmoe.data.location import RemoteReads
from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.writer import write_shards
from launch import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
from benchmarks.servers import ServerFaults, http_server, s3_server, upload  # noqa: E402


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
    fresh = list(TrainStream(_stream(local), CaptionPairs(encoder), epoch=1))
    streamed = list(TrainStream(_stream(remote), CaptionPairs(encoder), epoch=1))
    for near, far in zip(fresh, streamed, strict=True):
        for key in ("pid", "text", "image", "erase"):
            assert torch.equal(near[key], far[key])
    assert [b["cursor"].state is None for b in streamed] == [location.is_pipe(remote)] * 7
    # a resumed stream continues on the same batches: from its cursor, whose samples are read again by ranged
    # reads (a pipe: source has no cursors), or by replaying the epoch, seeking through the remote shards
    saved = fresh[4]["cursor"]  # saved reading local shards: it names shards, not where they are
    remote_cursors = {saved.slot: None if location.is_pipe(remote) else saved.state}
    for cursors in (remote_cursors, {}):
        resumed = TrainStream(_stream(remote), CaptionPairs(encoder), epoch=1, start_batch=5, cursors=cursors)
        for before, far in zip(fresh[5:], resumed, strict=True):
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


FAST = RemoteReads(retries=2, retry_wait=0.01, stall_s=0.5, min_bytes_per_s=2000, window_s=0.5, connect_s=1)


def _read(shard, reads: RemoteReads = FAST) -> tuple[list[int], list[SampleFault]]:
    faults: list[SampleFault] = []
    return [position for position, _ in shard_samples(shard, faults, reads=reads)], faults


def test_a_dropped_connection_is_read_on_from_the_byte_where_it_stopped(shards):
    """A server that cuts the connection mid-file (an IncompleteRead under urllib3, not an OSError) is asked again
    for the rest only, streamed and in ranged reads; nothing is lost and nothing counted."""
    faults = ServerFaults({"train-000000.tar": [("drop", 3000), ("drop", 2000)], "train.manifest.json": [("drop", 99)],
                           "train-000001.tar": [None, ("drop", 700)]})  # the size probe, then a range
    with http_server(shards.parent, faults) as url:
        info = read_split(f"{url}/shards", "train", reads=FAST)
        positions, lost = _read(info.entries[0])
        assert positions == [0, 1, 2, 3] and not lost
        ranged = location.open_random(f"{url}/shards/train-000001.tar", FAST)
        ranged.seek(1000)
        assert ranged.read(5000) == (shards / "train-000001.tar").read_bytes()[1000:6000]
    asked = {name: [r for n, r in faults.requests if n == name] for name, _ in faults.requests}
    assert asked["train.manifest.json"] == ["", "bytes=99-"]
    assert asked["train-000000.tar"] == ["", "bytes=3000-", "bytes=5000-"]
    last = (shards / "train-000001.tar").stat().st_size - 1  # a buffered read asks for up to 64 KiB
    assert asked["train-000001.tar"] == ["bytes=0-0", f"bytes=1000-{last}", f"bytes=1700-{last}"]


@pytest.mark.parametrize("fault, why", [(("stall", 60), "no byte received for 0.5 s"),
                                        (("drip", 0.05), "under data.remote.min_bytes_per_s 2000"),
                                        (("status", 503), "HTTP 503")])
def test_a_shard_whose_server_stalls_drips_or_fails_ends_in_bounded_time_with_its_samples_counted(
        shards, fault, why):
    """Each attempt is given up at its deadline (a 60 s stall, a byte every 50 ms) or error, retried twice, then
    the shard's samples are faults that name its URL; the reading goes on with the next shard."""
    faults = ServerFaults({"train-000001.tar": [fault] * 9})
    with http_server(shards.parent, faults) as url:
        info = read_split(f"{url}/shards", "train", reads=FAST)
        began = time.monotonic()
        positions, lost = _read(info.entries[1])
        took = time.monotonic() - began
        assert _read(info.entries[2]) == ([0, 1, 2, 3], [])
    assert positions == [] and [f.position for f in lost] == [0, 1, 2, 3]
    assert f"could not read {url}/shards/train-000001.tar" in lost[0].reason and "after 3 attempts" in lost[0].reason
    assert why in lost[0].reason, lost[0].reason
    assert [n for n, _ in faults.requests].count("train-000001.tar") == 3
    assert took < 15, took  # a single unbounded stall would take 60 s


def test_a_hung_pipe_command_is_killed_and_its_samples_counted(shards):
    template = f"pipe:case {{name}} in *.tar) sleep 61.5;; esac; cat '{shards}/{{name}}'"
    info = read_split(template, "train", reads=FAST)  # the manifest comes out at once
    began = time.monotonic()
    positions, lost = _read(info.entries[0])
    assert positions == [] and len(lost) == 4 and "no byte received for 0.5 s" in lost[0].reason
    assert "sleep 61.5;; esac; cat" in lost[0].reason and time.monotonic() - began < 15
    sleepers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"61.5" in _cmdline(p)]
    assert not sleepers, "the hung command (and what it started) is killed"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_ranged_reads_retry_a_refused_connection_and_name_it(shards):
    """On the resume path a refused connection is an error to retry (not a missing file) and a missing file is
    one at once."""
    port = free_port()  # nobody listens there
    began = time.monotonic()
    with pytest.raises(location.ShardSourceError, match=rf"could not read http://127.0.0.1:{port}/x.tar .*after 3 "
                                                        r"attempts: ConnectionError"):
        location.open_random(f"http://127.0.0.1:{port}/x.tar", FAST)
    assert time.monotonic() - began < 10
    with http_server(shards.parent) as url, pytest.raises(FileNotFoundError, match="HTTP 404"):
        location.open_random(f"{url}/shards/nothing.tar", FAST)


HOSTILE = ["x.tar; touch PWNED #", "$(touch PWNED).tar", "`touch PWNED`.tar", "';touch PWNED;'.tar",
           '";touch PWNED;".tar', "../outside.tar", "/etc/passwd", "-rf.tar", "a\x00b.tar", "sub/x.tar", ".hidden"]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_manifest_naming_anything_but_a_plain_file_is_refused_naming_it(shards, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    served = tmp_path / "served"
    shutil.copytree(shards, served / "shards")
    manifest = json.loads((served / "shards" / "train.manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (served / "shards" / "train.manifest.json").write_text(json.dumps(manifest))
    with http_server(served) as url:
        for where in (str(served / "shards"), f"pipe:cat '{served}/shards/{{name}}'", f"{url}/shards"):
            with pytest.raises(ManifestError, match=r"train\.manifest\.json'? lists a shard name that is not a "
                                                    r"plain file name"):
                read_split(where, "train", reads=FAST)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("template", ["pipe:cat {dir}/{name}", "pipe:cat '{dir}/{name}'", 'pipe:cat "{dir}/{name}"',
                                      "pipe:cat '{dir}/'{name}", "pipe:cat `echo '{dir}/{name}'`",
                                      'pipe:cat $(printf %s "{dir}/{name}")', "pipe:cat {dir}/{name} | cat"])
def test_no_name_reaches_a_shell_as_code_whatever_quotes_the_pipe_template_has(shards, tmp_path, monkeypatch,
                                                                               template):
    """Past the manifest's check too: the name is the shell's argument ``$1``, never text of its script."""
    monkeypatch.chdir(tmp_path)
    template = template.replace("{dir}", str(shards))
    once = RemoteReads(retries=0, stall_s=5)
    for name in HOSTILE:
        try:
            data = location.read_bytes(location.PipeAddress(template, name), once)
        except OSError:  # cat names the file it does not find
            data = b""
        assert data == b"", name
    assert not (tmp_path / "PWNED").exists()
    address = location.child(template, "train-000000.tar")
    assert str(address) == template.replace("{name}", "train-000000.tar")
    assert location.read_bytes(address, once) == (shards / "train-000000.tar").read_bytes()
    with pytest.raises(ValueError, match="unclosed ' quote"):
        location.child("pipe:cat '{name}", "train-000000.tar")


def test_a_missing_bucket_and_a_pipe_without_a_name_are_clear_errors(shards, aws_env):
    with pytest.raises(FileNotFoundError, match="no manifest for split 'train' in s3://nobucket/shards"):
        read_split("s3://nobucket/shards", "train", reads=FAST)
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        read_split(f"pipe:cat {shards}/train.manifest.json", "train")
    with http_server(shards.parent) as url:
        with pytest.raises(FileNotFoundError, match=f"no manifest for split 'val' in {url}/shards"):
            read_split(f"{url}/shards", "val", reads=FAST)


def test_remote_locations_are_kept_as_given_in_run_files(tmp_path):
    from dsmoe.config import load_config

    cfg = load_config(None, ["demo=false", "data.shards=s3://data/cuhk/shards",
                             "data.eval_shards=pipe:curl -sf http://host/shards/{name}"])
    cfg.make_paths_absolute()
    assert cfg.data.shards == "s3://data/cuhk/shards"
    assert cfg.data.eval_shards == "pipe:curl -sf http://host/shards/{name}"


@pytest.mark.integration
def test_two_ranks_train_over_a_flaky_http_server_and_evaluate_from_s3(demo_assets, tmp_path):
    """The deepspeed launcher's 2 ranks read training shards from an HTTP server that cuts every connection
    mid-shard once (read on from the byte where it stopped: nothing lost, nothing counted) and answers one shard
    never (given up at its deadline: its samples counted and named), and evaluation shards from the object store,
    from copies that exist only behind the servers; then a separate evaluation reads them there too."""
    import subprocess

    from launch import LAUNCH_TIMEOUT, free_port, launch_env, logged_records, run_ok, train_cmd

    served = tmp_path / "served"
    shutil.copytree(demo_assets["data.shards"], served / "shards")
    names = [s["name"] for s in json.loads((served / "shards" / "train.manifest.json").read_text())["shards"]]
    dropped, stalled = names[:-1], names[-1]
    faults = ServerFaults({**{name: [("drop", 5000)] for name in dropped}, stalled: [("stall", 600)] * 99,
                           "train.manifest.json": [("drop", 200)]})
    run = tmp_path / "run"
    with s3_server() as env, http_server(served, faults) as url:
        upload(env, served / "shards", "s3://demo/shards")
        assets = {**demo_assets, "data.shards": f"{url}/shards", "data.eval_shards": "s3://demo/shards"}
        out = run_ok(train_cmd(assets, run, free_port(), "train.max_steps=4", "data.max_bad_share=0.5",
                               "data.remote.stall_s=1", "data.remote.retries=1", "data.remote.retry_wait=0.1"),
                     env={**launch_env(), **env})
        assert "world size 2" in out
        config = (run / "config.yaml").read_text()
        assert f"shards: {url}/shards" in config and "eval_shards: s3://demo/shards" in config
        results = json.loads((run / "results.json").read_text())
        assert results["test"]["captions"] == 144 and "incomplete" not in results["test"]
        proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(run)], cwd=tmp_path,
                              env={**launch_env(), **env}, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        single = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert single["R1"] == pytest.approx(results["test"]["R1"], abs=1e-6)
    for name in dropped:  # each cut once, then asked for the rest only
        asked = [r for n, r in faults.requests if n == name]
        assert asked[:2] == ["", "bytes=5000-"], (name, asked)
    counted = [r for r in logged_records(run) if r.get("event") == "bad_samples"]
    stalled_samples = json.loads((served / "shards" / "train.manifest.json").read_text())["shards"][-1]["samples"]
    assert counted and counted[-1]["total"] == stalled_samples, counted
    assert all(stalled in reason and "no byte received for 1 s" in reason for reason in counted[-1]["reasons"])
