"""Faults never hang a job: unusable samples skipped and counted, a failing rank ends every rank, checkpoints load
without running code, full disks named, nothing left in /dev/shm."""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import faulty_shards as fs
from dsmoe.config import ConfigError, load_config
from launch import DASD_DEMO, REPO_ROOT
from dsmoe.data.bad_samples import FaultLog, SampleFault, bad_sample_limit, summarize
from dsmoe.data.pipeline import CaptionPairs, EvalImages, TrainStream, TrainStreamConfig, train_loader
from dsmoe.data.slot_stream import SlotStream
from dsmoe.data.format import read_split
from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.writer import write_shards
from dsmoe.demo.people import make_synthetic_pedes
from dsmoe.data.text import CaptionEncoder
from dsmoe.demo.models import train_tokenizer
from launch import free_port, launch_env

IMAGE_SIZE = (32, 16)


# ---------------------------------------------------------------- unusable samples in the readers


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    """train: 4 shards of 4 samples (8 people x 2 images, 2 captions each); test: 6 samples in 2 shards."""
    raw = make_synthetic_pedes(tmp_path_factory.mktemp("raw"), num_ids={"train": 8, "val": 1, "test": 3},
                               images_per_id=2, image_size=IMAGE_SIZE)
    out = tmp_path_factory.mktemp("intact")
    write_shards(read_person_layout("cuhk-pedes", raw), out, dataset="cuhk-pedes", samples_per_shard=4)
    return out


@pytest.fixture(scope="module")
def encoder(intact) -> CaptionEncoder:
    captions = [c for s in _all_json(intact, "train") for c in s["captions"]["en"]]
    return CaptionEncoder(train_tokenizer(captions, intact.parent / "tok"), 48)


def _all_json(shard_dir: Path, split: str) -> list[dict]:
    return [json.loads(d) for p in read_split(shard_dir, split).shards for n, d in fs.read_members(p)
            if n.endswith(".json")]


@pytest.fixture(scope="module")
def faulty(intact, tmp_path_factory) -> tuple[Path, dict[str, str], set[str]]:
    """The same shards, damaged: (directory, identity of every unusable train sample -> its expected reason, the
    keys of the 4 usable train samples)."""
    out = fs.copy_shards(intact, tmp_path_factory.mktemp("faulty") / "shards")
    shard = [out / f"train-{i:06d}.tar" for i in range(4)]
    intact_keys = [fs.keys(intact / f"train-{i:06d}.tar") for i in range(4)]
    usable = {intact_keys[0][0], intact_keys[0][2], intact_keys[2][0], intact_keys[2][1]}
    expected = {
        fs.edit_sample(shard[0], 1, fs.corrupt_image): "image does not decode",
        fs.edit_sample(shard[0], 3, fs.truncate_image): "image does not decode",
        fs.edit_sample(shard[1], 0, fs.bad_json): "its .json does not parse",
        fs.edit_sample(shard[1], 1, fs.drop(".jpg")): "no .jpg member",
        fs.edit_sample(shard[1], 3, fs.no_captions): "its .json has no captions",
    }
    fs.edit_sample(shard[1], 2, fs.drop(".json"))  # a sample without .json: its jpg alone forms a sample
    expected[intact_keys[1][2]] = "no .json member"
    fs.garbage_inside(shard[2], 2)  # the reader stops at the garbage: positions 2 and 3 are lost
    expected.update({f"train-000002.tar#{p}": "unreadable" for p in (2, 3)})
    fs.zero_bytes(shard[3])
    expected.update({f"train-000003.tar#{p}": "unreadable" for p in range(4)})
    fs.restate_manifests(out)  # damaged at the source: the readers meet each damage sample by sample
    return out, expected, usable


def _stream(shard_dir: Path, *, batches: int, micro: int = 2, world: int = 1, rank: int = 0) -> TrainStreamConfig:
    return TrainStreamConfig(shard_dir=str(shard_dir), split="train", image_size=IMAGE_SIZE, micro_batch=micro,
                             batches_per_epoch=batches, rank=rank, world_size=world, seed=3, shuffle_buffer=4)


def _pairs(batches: list[dict]) -> list[tuple]:
    return [(int(pid), tuple(ids.tolist())) for b in batches for pid, ids in zip(b["pid"], b["text"])]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_skips_and_reports_every_kind_of_unusable_sample(intact, faulty, encoder, workers):
    shard_dir, expected, usable = faulty
    batches = list(train_loader(_stream(shard_dir, batches=12), CaptionPairs(encoder), 0, 0, workers))
    assert len(batches) == 12 and all(len(b["pid"]) == 2 and b["image"].shape[0] == 2 for b in batches)
    found = {f.identity: f.reason for b in batches for f in b["faults"]}
    assert set(found) == set(expected)
    for identity, reason in expected.items():
        assert found[identity].startswith(reason), (identity, found[identity])
    # what remains: the 4 usable samples' 8 caption pairs, cycled; nothing from an unusable sample
    good = {(s["pid"], tuple(encoder.encode([c]).ids[0].tolist())) for s in _all_json(intact, "train")
            if s["key"] in usable for c in s["captions"]["en"]}
    taken = Counter(_pairs(batches))
    assert set(taken) == good and len(good) == 8
    if workers == 0:  # one reader: three passes over its 8 pairs
        assert set(taken.values()) == {3}


def test_a_shard_lost_part_way_is_reported_even_after_batches_left_the_worker(intact, encoder, tmp_path):
    """The samples after the garbage are only known lost when the reader reaches it, several batches after the
    shard was opened: their faults still reach the loop (from a loader worker, through the queue)."""
    shard_dir = fs.copy_shards(intact, tmp_path / "shards")
    fs.garbage_inside(shard_dir / "train-000000.tar", 3)
    fs.restate_manifests(shard_dir)
    cfg = TrainStreamConfig(shard_dir=str(shard_dir), split="train", image_size=IMAGE_SIZE, micro_batch=1,
                            batches_per_epoch=40, rank=0, world_size=1, seed=3, shuffle_buffer=1)
    batches = list(train_loader(cfg, CaptionPairs(encoder), 0, 0, workers=1))  # 30 pairs a cycle: read twice
    faults = [(f.identity, i) for i, b in enumerate(batches) for f in b["faults"]]
    assert {identity for identity, _ in faults} == {"train-000000.tar#3"} and faults[0][1] > 0, faults


def test_a_resumed_stream_replays_the_batches_around_undecodable_images(faulty, encoder):
    shard_dir, _, _ = faulty
    cfg = _stream(shard_dir, batches=10)
    straight = list(train_loader(cfg, CaptionPairs(encoder), 0, 0, 0))
    for start in (3, 6):
        known = frozenset(f.identity for b in straight[:start] for f in b["faults"])
        resumed = list(train_loader(cfg, CaptionPairs(encoder), 0, start, 0, known_bad=known))
        assert _pairs(resumed) == _pairs(straight[start:])
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, straight[start:]))


def test_lost_samples_of_a_shard_are_split_between_readers_that_share_it(faulty, encoder):
    """Fewer shards than readers: each reader keeps every n-th sample, and reports its own share of a lost tail."""
    shard_dir, expected, _ = faulty
    found = []
    for slot in range(8):  # 8 readers, 4 shards
        stream = TrainStream(_stream(shard_dir, batches=1, micro=1, world=8), CaptionPairs(encoder), epoch=0)
        reader = SlotStream(stream, stream._plan(), slot, 8)
        while reader._read() is not None:  # the first cycle's samples, in shard order
            pass
        found += [f.identity for f in reader.faults]
    # every sample that is unusable before decoding reported once, by one reader (images decode later)
    assert sorted(found) == sorted(i for i, reason in expected.items() if reason != "image does not decode")


def test_eval_reader_yields_usable_samples_once_and_a_fault_for_each_other(faulty):
    shard_dir, expected, _ = faulty
    items = [i for rank in range(2) for i in EvalImages(str(shard_dir), "train", IMAGE_SIZE, rank, 2)]
    faults = [i for i in items if isinstance(i, SampleFault)]
    images = [i for i in items if not isinstance(i, SampleFault)]
    assert sorted(f.identity for f in faults) == sorted(expected)
    assert len(images) == 16 - len(expected) and len({s.key for s in images}) == len(images)


def test_empty_tar_and_extra_samples_disagree_with_the_manifest(intact, tmp_path, encoder):
    shard_dir = fs.copy_shards(intact, tmp_path / "shards")
    fs.empty_tar(shard_dir / "test-000000.tar")
    fs.restate_manifests(shard_dir)
    items = list(EvalImages(str(shard_dir), "test", IMAGE_SIZE, 0, 1))
    lost = [i for i in items if isinstance(i, SampleFault)]
    assert [f.identity for f in lost] == [f"test-000000.tar#{p}" for p in range(4)]
    assert all(f.reason.startswith("unreadable") or "ends early" in f.reason for f in lost)
    # a shard holding more samples than its manifest says is reported too (its samples are used)
    members = fs.read_members(shard_dir / "test-000001.tar")
    fs.write_members(shard_dir / "test-000001.tar", members + [("test_9999999.jpg", members[0][1]),
                                                                ("test_9999999.json", members[1][1])])
    fs.restate_manifests(shard_dir)
    extra = [i for i in EvalImages(str(shard_dir), "test", IMAGE_SIZE, 0, 1) if isinstance(i, SampleFault)]
    assert any("its manifest 2" in f.reason for f in extra)


def test_shards_that_are_not_what_their_manifest_says_are_faults_naming_them(intact, tmp_path, encoder):
    """Damage after the manifest was written: a shard of another size is not read at all; one of the right size
    with other content (a byte flipped in an image, or another shard's bytes) is read, then each of its samples is
    a fault naming it, in the training stream and the evaluation reader alike."""
    shard_dir = fs.copy_shards(intact, tmp_path / "shards")
    fs.truncate_file(shard_dir / "train-000003.tar", keep=0.9)
    flipped = bytearray((shard_dir / "train-000001.tar").read_bytes())
    flipped[600] ^= 0xFF  # inside the first image's data
    (shard_dir / "train-000001.tar").write_bytes(bytes(flipped))
    (shard_dir / "train-000000.tar").write_bytes((shard_dir / "train-000002.tar").read_bytes())
    assert len({(shard_dir / f"train-00000{i}.tar").stat().st_size for i in range(3)}) == 1
    size_reason = "the shard has {} bytes, its manifest {}"
    items = list(EvalImages(str(shard_dir), "train", IMAGE_SIZE, 0, 1))
    faults = {f.identity: f.reason for f in items if isinstance(f, SampleFault)}
    read = [i.key for i in items if not isinstance(i, SampleFault)]
    cut_size = (shard_dir / "train-000003.tar").stat().st_size
    full_size = (shard_dir / "train-000002.tar").stat().st_size
    assert set(faults) == {f"train-00000{s}.tar#{p}" for s in (0, 1, 3) for p in range(4)}
    assert all(faults[f"train-000003.tar#{p}"].startswith(size_reason.format(cut_size, full_size)) for p in range(4))
    assert all(faults[f"train-00000{s}.tar#{p}"].startswith("the shard's sha256 differs from its manifest's")
               for s in (0, 1) for p in range(4))
    assert "not the shard the manifest describes" in faults["train-000000.tar#0"]
    assert len(read) == 12 and not set(fs.keys(intact / "train-000003.tar")) & set(read)  # the cut one: unread
    streamed = list(train_loader(_stream(shard_dir, batches=16), CaptionPairs(encoder), 0, 0, 0))  # a cycle on
    assert {f.identity for b in streamed for f in b["faults"]} == set(faults)


# ---------------------------------------------------------------- counting and the limit


def test_fault_log_counts_distinct_samples_across_ranks_and_resumes():
    log = FaultLog("train", samples=1000, limit=bad_sample_limit(0.01, None, 1000))
    assert log.limit == 10 and bad_sample_limit(0.5, 3, 1000) == 3 and bad_sample_limit(0.0, None, 50) == 0
    a, b = SampleFault("s0.tar", 1, "image does not decode", "train_1"), SampleFault("s1.tar", 4, "unreadable")
    log.add([a, a, b])
    assert set(log.found) == {"train_1", "s1.tar#4"} and log.known_bad() == {"train_1", "s1.tar#4"}
    other_rank = {"train_7": SampleFault("s2.tar", 0, "no .json member", "train_7")}
    new = log.merge([log.found, other_rank])
    assert len(new) == 3 and not log.found and len(log.known) == 3
    log.add([a])  # found again in a later epoch: not new
    assert not log.found
    restored = FaultLog("train", 1000, 10)
    restored.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert restored.known == log.known
    assert not log.over_limit(10) and log.over_limit(11)
    message = log.limit_message(11)
    assert "s0.tar" in message and "s2.tar" in message and "limit of 10" in message


def test_summary_groups_by_shard_and_reason():
    faults = [SampleFault("a.tar", p, "unreadable") for p in range(5)] + [SampleFault("b.tar", 0, "bad", "k")]
    assert summarize(faults) == ["a.tar: 5 samples: unreadable", "b.tar: 1 sample: bad"]
    many = [SampleFault(f"{i}.tar", 0, "x") for i in range(15)]
    assert summarize(many, lines=10)[-1] == "... and 5 more in 5 other shard/reason groups"




@pytest.mark.parametrize("recipe,override,message", [
    (None, "optim.lr=-1", "optim.lr: -1.0 is out of range: must be > 0"),
    (None, "optim.betas=[0.9, 1.0]", "must be in [0, 1)"),
    (None, "dm_adapter.lb_weight=-0.5", "dm_adapter.lb_weight"),
    (None, "data.max_bad_share=1.5", "data.max_bad_share"),
    (None, "data.max_bad_count=-1", "data.max_bad_count"),
    (None, "adapter.capacity_factor=0", "adapter.capacity_factor"),
    (None, "train.eval_batch_size=0", "train.eval_batch_size"),
    (None, "train.collective_timeout=0", "train.collective_timeout"),
    (DASD_DEMO, "dasd.cla={epochs: 1, lr: 0}", "dasd.cla.lr"),
])
def test_numeric_ranges_are_checked_with_the_config(recipe, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(recipe, [override])


# ---------------------------------------------------------------- a failing rank ends every rank


def _shm_buffers(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _launch_probe(port: int, marks: Path, *args: str) -> tuple[int, str, dict[str, str]]:
    """Run the probe; (exit code, output, {rank: exit code} of the ranks the fault watch ended)."""
    marks.mkdir()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(REPO_ROOT / "tests" / "scripts" / "fault_probe.py"), "--marks", str(marks), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, {p.name: p.read_text() for p in marks.iterdir()}


@pytest.mark.integration
def test_a_failing_rank_ends_a_busy_peer_within_seconds_and_leaves_no_shared_memory(tmp_path):
    """Rank 1 fails while rank 0 is in a long step of its own (no collective to notice) and ignores SIGTERM, as a
    training rank does: only the fault watch can end it before the launcher's SIGKILL, 30 s later."""
    port = free_port()
    code, out, ended = _launch_probe(port, tmp_path / "marks", "--fail-rank", "1", "--other", "busy")
    assert code != 0 and ended == {"rank0": "1", "rank1": "1"}, out[-3000:]  # both left through the watch
    assert out.count("[dsmoe] rank 1 failed: ValueError: injected failure") == 1 and out.count("Traceback") == 1
    assert "rank 0: stopping because rank 1 failed: ValueError: injected failure" in out
    assert _shm_buffers(port) == []


@pytest.mark.integration
def test_rank_zero_failing_ends_a_peer_blocked_in_a_collective_and_success_cleans_up(tmp_path):
    port = free_port()
    code, out, ended = _launch_probe(port, tmp_path / "failing", "--fail-rank", "0", "--other", "collective")
    assert code != 0 and ended == {"rank0": "1", "rank1": "1"}, out[-3000:]
    assert out.count("[dsmoe] rank 0 failed: ValueError: injected failure") == 1
    assert "rank 1: stopping" in out
    assert _shm_buffers(port) == []
    port = free_port()
    code, out, ended = _launch_probe(port, tmp_path / "succeeding")
    assert code == 0 and not ended and "rank 0 finished" in out and "rank 1 finished" in out, out[-3000:]
    assert _shm_buffers(port) == []


# ---------------------------------------------------------------- checkpoints: never run code, name a full disk


class _Plant:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    from dsmoe.failures import RunError
    from dsmoe.checkpoint.safe_io import load_safely

    marker = tmp_path / "pwned"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Plant(marker)}, planted)
    with pytest.raises(RunError, match=r"refusing to load .*mp_rank_00_model_states.pt.*run arbitrary code"):
        load_safely(planted)
    assert not marker.exists()
    safe = tmp_path / "plain.pt"
    torch.save({"module": {"w": torch.ones(2)}, "shapes": [torch.Size([2])], "step": 3}, safe)
    assert load_safely(safe)["step"] == 3


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` at ``where`` (a disk that fills up), where the machine lets tests mount one."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected-OSError tests cover this")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def test_a_full_disk_during_a_checkpoint_write_names_the_file(small_tmpfs):
    from dsmoe.checkpoint.folder import CheckpointWriteError
    from dsmoe.checkpoint.safe_io import SafeCheckpointEngine

    target = small_tmpfs / "step1" / "mp_rank_00_model_states.pt"
    target.parent.mkdir()
    with pytest.raises(CheckpointWriteError, match=rf"could not write {target}: no space left on the device"):
        SafeCheckpointEngine().save({"w": torch.zeros(1_000_000)}, str(target))


def test_an_injected_write_error_names_the_file(tmp_path, monkeypatch):
    import errno

    from dsmoe.checkpoint import safe_io
    from dsmoe.checkpoint.folder import CheckpointWriteError

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(safe_io, "open", FullDisk, raising=False)
    target = tmp_path / "x.pt"
    with pytest.raises(CheckpointWriteError, match=rf"could not write {target}: no space left on the device"):
        safe_io.SafeCheckpointEngine().save({"w": torch.zeros(10)}, str(target))


def test_publish_names_a_complete_checkpoint_and_staging_leftovers_are_removed(tmp_path):
    from dsmoe.checkpoint.folder import STAGING_PREFIX, complete_tag, publish, read_marker, remove_staging

    root = tmp_path / "checkpoints"
    (root / f"{STAGING_PREFIX}step00000002").mkdir(parents=True)
    (root / f"{STAGING_PREFIX}step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    publish(root, f"{STAGING_PREFIX}step00000002", "step00000002", json.dumps({"global_step": 2}))
    assert complete_tag(root) == "step00000002" and read_marker(root, "step00000002") == {"global_step": 2}
    (root / f"{STAGING_PREFIX}step00000004").mkdir()  # a save that died half-way
    remove_staging(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000002"]


def test_make_shards_on_a_full_disk_names_the_file_and_a_rerun_resumes(small_tmpfs, intact, tmp_path):
    raw = make_synthetic_pedes(tmp_path / "raw", num_ids={"train": 80, "val": 1, "test": 2}, images_per_id=2,
                               image_size=(384, 128))  # about 1.4 MB of JPEGs
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "make_shards.py"), "--dataset", "cuhk-pedes", "--root", str(raw),
           "--out", str(small_tmpfs / "shards"), "--samples-per-shard", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: could not write {small_tmpfs / 'shards'}" in proc.stderr and "No space left" in proc.stderr
    assert not list((small_tmpfs / "shards").glob("*.tmp-*"))  # no partial shard
    written = sorted(p.name for p in (small_tmpfs / "shards").glob("*.tar"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    proc = subprocess.run(cmd + ["--verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "verify: ok" in proc.stdout, proc.stderr[-2000:]
    assert written and set(written) <= {p.name for p in (small_tmpfs / "shards").glob("*.tar")}


def test_make_shards_interrupted_says_how_to_continue_without_tracebacks(tmp_path):
    import signal

    raw = make_synthetic_pedes(tmp_path / "raw", num_ids={"train": 40, "val": 1, "test": 2}, images_per_id=3,
                               image_size=(384, 128))
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "make_shards.py"), "--dataset", "cuhk-pedes", "--root", str(raw),
           "--out", str(tmp_path / "shards"), "--samples-per-shard", "4", "--workers", "2", "--resize", "384x128"]
    semaphores = set(Path("/dev/shm").glob("sem.mp-*"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    spill = tmp_path / "shards" / ".make_shards.spill"
    deadline = time.monotonic() + 60
    while not (spill.is_dir() and any(spill.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the workers have prepared a first chunk of images
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "run the same command again to continue" in err
    assert set(Path("/dev/shm").glob("sem.mp-*")) <= semaphores  # the pool's semaphores went with it


# ---------------------------------------------------------------- two training ranks on damaged data, a full disk


@pytest.fixture(scope="module")
def damaged_demo(demo_assets, tmp_path_factory) -> dict[str, str]:
    """The demo's shards with a corrupt image, a broken JSON and a truncated tail in train, a corrupt test image."""
    out = fs.copy_shards(Path(demo_assets["data.shards"]), tmp_path_factory.mktemp("damaged") / "shards")
    fs.edit_sample(out / "train-000001.tar", 3, fs.corrupt_image)
    fs.edit_sample(out / "train-000001.tar", 9, fs.bad_json)
    fs.truncate_file(out / "train-000004.tar", keep=0.5)  # 32 samples: about half of them lost
    fs.edit_sample(out / "test-000001.tar", 2, fs.corrupt_image)
    fs.restate_manifests(out)  # damaged at the source: each damage is met sample by sample
    return {**demo_assets, "data.shards": str(out)}  # the demo's recipe on other shards


@pytest.mark.integration
def test_training_on_damaged_shards_skips_counts_and_reports(damaged_demo, tmp_path):
    from launch import logged_records, run_ok, train_cmd

    run = tmp_path / "run"
    run_ok(train_cmd(damaged_demo, run, free_port(), "train.max_steps=3", "data.max_bad_share=0.2"))
    events = [r for r in logged_records(run) if r.get("event") == "bad_samples"]
    assert events and events[0]["split"] == "train" and events[0]["limit"] == 57  # 20% of 288
    reasons = " ".join(events[0]["reasons"])
    assert "train-000004.tar" in reasons and "unreadable" in reasons and "train-000001.tar" in reasons
    steps = [r for r in logged_records(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[-1]["bad_samples"] >= 17
    test = json.loads((run / "results.json").read_text())["test"]
    assert test["images"] == 71 and test["incomplete"]["missing_samples"] == 1
    assert "test-000001.tar: 1 sample: image does not decode" in test["incomplete"]["reasons"][0]


@pytest.mark.integration
def test_too_many_unusable_samples_stop_both_ranks_with_the_shards_named(damaged_demo, tmp_path):
    from launch import train_cmd

    port = free_port()
    proc = subprocess.run(train_cmd(damaged_demo, tmp_path / "run", port, "train.max_steps=20"), cwd=REPO_ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=180)  # no collective timeout
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert len(re.findall(r"rank \d error: 17 unusable samples in split 'train' \(5.90% of 288\), more than the "
                          r"limit of 2 \(data.max_bad_share / data.max_bad_count\)", out)) == 1, out[-4000:]
    assert "Traceback" not in out
    assert "train-000004.tar" in out and "stopping because rank" in out
    assert _shm_buffers(port) == []


@pytest.fixture
def disk_for_one_checkpoint(tmp_path):
    """Room for one demo checkpoint (3.1 MB, 1.3 of them its layout-free optimiser state) and the run's files, not
    for two."""
    with mounted_tmpfs(tmp_path / "disk", "5m") as mount:
        yield mount


@pytest.mark.integration
def test_a_full_disk_during_a_save_names_the_file_and_keeps_latest(demo_assets, disk_for_one_checkpoint):
    from launch import latest_tag, train_cmd

    run = disk_for_one_checkpoint / "run"
    proc = subprocess.run(train_cmd(demo_assets, run, free_port(), "train.max_steps=6", "train.checkpoint_every=2"),
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert re.search(rf"error: could not write {run}/checkpoints/\.partial-step00000004/\S+: no space left on the "
                     rf"device", out), out[-4000:]
    assert "Traceback" not in out
    ckpt = run / "checkpoints"
    assert latest_tag(run) == "step00000002" and (ckpt / "step00000002" / "COMPLETE").is_file()
    assert not list(ckpt.glob(".partial-*"))


@pytest.mark.integration
def test_evaluating_a_checkpoint_with_a_planted_pickle_refuses_it(demo_assets, tmp_path):
    marker = tmp_path / "pwned"
    tag = tmp_path / "run" / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("{}")
    (tag.parent / "latest").write_text(tag.name)
    torch.save({"module": {}, "payload": _Plant(marker)}, tag / "mp_rank_00_model_states.pt")
    sets = [a for k, v in demo_assets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(tmp_path / "run"), *sets],
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not marker.exists(), proc.stderr[-3000:]
    assert "error: refusing to load" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr


def test_a_checkpoint_of_another_shape_is_explained_by_the_config_keys(tmp_path):
    from dsmoe.checkpoint.folder import mismatch_message

    root = tmp_path / "checkpoints"
    (root / "step1").mkdir(parents=True)
    saved = {"model": {"clip": "c"}, "adapter": {"num_experts": 6, "ep_size": 2}, "dasd": {"stage": "cla"}}
    (root / "step1" / "COMPLETE").write_text(json.dumps({"config": saved}))
    model = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(torch.nn.Linear(4, 6).state_dict(), strict=False)
    current = {"model": {"clip": "c"}, "adapter": {"num_experts": 4, "ep_size": 1}, "dasd": {"stage": "cma"}}
    message = mismatch_message(root, "step1", current, error.value)
    assert message.startswith(f"the checkpoint {root / 'step1'} does not fit the model of this config (weight: "
                              f"[6, 4] saved, [4, 4] here")
    assert "adapter.num_experts: 6 in the checkpoint, 4 here" in message
    assert "ep_size" not in message and "stage" not in message  # layout and stage do not shape tensors
    missing = FileNotFoundError(2, "No such file", str(root / "step1" / "layer_0_expert_7_mp_rank_00_model_states.pt"))
    assert "an expert file is missing (layer_0_expert_7_mp_rank_00_model_states.pt)" in \
        mismatch_message(root, "step1", current, missing)
    assert mismatch_message(root, "step1", current, RuntimeError("something else")) is None


# ---------------------------------------------------------------- a run owns its folder; stop signals


HOLD_LOCK = ("import sys, time\nfrom dsmoe.run_lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
             "print('held', flush=True)\ntime.sleep(600)\n")


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_it(demo_assets, dist_env, signals, tmp_path):
    """The lock is the operating system's: held while its process lives, dropped the moment it dies however it
    dies, and then taken over with a note of whose it was."""
    import socket

    from dsmoe.ds_config import DeviceSupport, compose_ds_config, load_ds_config
    from dsmoe.run_lock import RunFolderBusy, RunLock
    from dsmoe.train import run

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = load_config(None, [f"{k}={v}" for k, v in demo_assets.items()] +
                          ["demo=false", "adapter.ep_size=1", f"train.output_dir={folder}", "data.workers=0"])
        ds = compose_ds_config(load_ds_config("zero2.json"), cfg, 1, DeviceSupport.detect())
        with pytest.raises(RunFolderBusy, match=rf"{folder} is in use by another run \(host "
                                                rf"{re.escape(socket.gethostname())} pid {holder.pid}, started "):
            run([(cfg, ds)], "auto", 0, 1, 0)
        assert [p.name for p in folder.iterdir()] == ["run.lock"], "nothing written before the refusal"
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(folder)
    assert f"took over {folder / 'run.lock'} from a run that ended without releasing it (host" in lock.acquire()
    lock.release()
    assert RunLock(folder).acquire() is None  # released cleanly: nothing to take over


@pytest.mark.integration
def test_sigterm_while_the_ranks_start_ends_the_launcher_with_143(demo_assets, tmp_path):
    """Before the training loop watches for it, a stop signal ends each rank with 143 (a rank dying of the
    signal would make the deepspeed launcher exit 241)."""
    import psutil

    from launch import train_cmd

    proc = subprocess.Popen(train_cmd(demo_assets, tmp_path / "run", free_port()), cwd=REPO_ROOT,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, ranks = time.monotonic() + 60, []
    while len(ranks) < 2 and time.monotonic() < deadline:
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank" in " ".join(p.cmdline()) and p.parent().pid != proc.pid]
        time.sleep(0.1)
    assert len(ranks) == 2
    time.sleep(1.5)  # the ranks are importing torch and DeepSpeed
    for rank in ranks:
        rank.terminate()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert out.count("stopped by SIGTERM before training started") == 2
