"""Tests of the shard writer, the shard verifier and the make_shards shards_cli."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.records import RawRecord
from dsmoe.shards import cli as shards_cli
from dsmoe.shards.plan import JOURNAL_NAME, REASON_DUPLICATE, REASON_EMPTY_CAPTIONS, REASON_UNKNOWN_SPLIT
from dsmoe.data.format import read_split
from dsmoe.shards.records import ShardWriteError
from dsmoe.shards.verify import verify_shards
from dsmoe.shards.workers import REASON_IMAGE_MISSING, REASON_IMAGE_UNREADABLE
from dsmoe.shards.writer import format_accounting, write_shards
from dsmoe.demo.people import make_synthetic_icfg, make_synthetic_pedes, make_synthetic_rstpreid

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": 6, "val": 2, "test": 2}
SIZE = (48, 24)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_pedes(tmp_path_factory.mktemp("clean"), num_ids=TINY, image_size=SIZE)


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_pedes(tmp_path_factory.mktemp("faulty"), num_ids=TINY, image_size=SIZE, faults=True)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _samples(path: Path) -> list[tuple[str, bytes, dict]]:
    """(key, jpg bytes, json) per sample of one shard, in order."""
    out = []
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for jpg, meta in zip(members[::2], members[1::2], strict=True):
            assert jpg.name.endswith(".jpg") and meta.name == jpg.name[:-4] + ".json"
            out.append((jpg.name[:-4], tar.extractfile(jpg).read(), json.loads(tar.extractfile(meta).read())))
    return out


def _manifest(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}.manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ accounting


def test_faults_are_reported_with_their_reasons(faulty_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", faulty_root)
    reports = write_shards(records, tmp_path / "out", dataset="cuhk-pedes")
    assert format_accounting(reports).splitlines() == [
        "train: 20 inputs = 18 written + 2 skipped",
        "val: 6 inputs = 6 written + 0 skipped",
        "test: 7 inputs = 6 written + 1 skipped",
    ]
    train = [(s["source"], s["reason"]) for s in reports["train"].skips]
    assert train[0][0] == "synth/0001_99.jpg" and train[0][1].startswith(REASON_IMAGE_MISSING)
    assert train[1] == ("synth/0001_01.jpg", REASON_DUPLICATE)
    assert reports["test"].skips == [{"source": "synth/0010_98.jpg", "reason": REASON_EMPTY_CAPTIONS}]
    assert _manifest(tmp_path / "out", "train")["skipped"] == reports["train"].skips
    # Keys stay contiguous after the skipped record in the middle of the split.
    keys = [key for key, _, _ in _samples(tmp_path / "out" / "train-000000.tar")]
    assert keys == [f"train_{n:07d}" for n in range(18)]
    assert verify_shards(tmp_path / "out") == []


def test_strict_failure_leaves_no_manifest_and_a_rerun_reuses_the_shards(faulty_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", faulty_root)
    out = tmp_path / "out"
    write_shards(records, out, dataset="cuhk-pedes")
    with pytest.raises(ShardWriteError, match=r"3 record\(s\) skipped.*image missing.*No manifest was written"):
        write_shards(records, out, dataset="cuhk-pedes", strict=True)
    assert not list(out.glob("*.manifest.json")), "not even the earlier run's: they would look complete"
    with pytest.raises(FileNotFoundError):
        read_split(out, "train")
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert written
    write_shards(records, out, dataset="cuhk-pedes")  # without --strict: the shards are reused, not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == written
    assert verify_shards(out) == []
    clean = [r for r in records if r.image_path.exists() and any(c.strip() for c in r.captions)]
    clean = [r for i, r in enumerate(clean) if (r.split, r.source) not in {(c.split, c.source) for c in clean[:i]}]
    reports = write_shards(clean, tmp_path / "out2", dataset="cuhk-pedes", strict=True)
    assert sum(r.skipped for r in reports.values()) == 0


@pytest.mark.parametrize("layout", ["cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_each_layout_converts(layout: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    if layout == "cuhk-pedes":
        make_synthetic_pedes(raw, num_ids=TINY, image_size=SIZE)
        expected = {"train": (18, 36), "val": (6, 12), "test": (6, 12)}
    elif layout == "icfg-pedes":
        make_synthetic_icfg(raw, num_ids={"train": 4, "test": 2}, image_size=SIZE)
        expected = {"train": (12, 12), "test": (6, 6)}
    else:
        make_synthetic_rstpreid(raw, num_ids=TINY, image_size=SIZE)
        expected = {"train": (18, 36), "val": (6, 12), "test": (6, 12)}
    reports = write_shards(read_person_layout(layout, raw), tmp_path / "out", dataset=layout, samples_per_shard=5)
    assert list(reports) == list(expected)
    for split, (images, captions) in expected.items():
        assert (reports[split].inputs, reports[split].written, reports[split].skipped) == (images, images, 0)
        manifest = _manifest(tmp_path / "out", split)
        assert manifest["samples"] == images and manifest["captions"] == {"en": captions}
        assert manifest["dataset"] == layout and manifest["split"] == split
        assert [s["samples"] for s in manifest["shards"]] == [5] * (images // 5) + ([images % 5] if images % 5 else [])
    assert not (tmp_path / "out" / "val.manifest.json").exists() or "val" in expected
    assert verify_shards(tmp_path / "out") == []


def test_unreadable_image_unknown_split_and_blank_captions(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(records[1].image_path.read_bytes()[:200])
    records[0] = dataclasses.replace(records[0], image_path=broken, source="broken.jpg")
    records[1] = dataclasses.replace(records[1], image_path=truncated, source="truncated.jpg")
    records[2] = dataclasses.replace(records[2], split="dev")
    records[3] = dataclasses.replace(records[3], captions=["  ", "\n", " A man in red. "])
    reports = write_shards(records, tmp_path / "out", dataset="cuhk-pedes")
    assert [s["reason"].split(":")[0] for s in reports["train"].skips] == [REASON_IMAGE_UNREADABLE] * 2
    assert reports["dev"].inputs == reports["dev"].skipped == 1
    assert reports["dev"].skips[0]["reason"] == f"{REASON_UNKNOWN_SPLIT} 'dev'"
    assert all(r.balanced for r in reports.values())
    assert "dev: 1 inputs = 0 written + 1 skipped" in format_accounting(reports)
    first = _samples(tmp_path / "out" / "train-000000.tar")[0][2]
    assert first["source"] == records[3].source and first["captions"] == {"en": ["A man in red."]}


# -------------------------------------------------------------------------------------------- shard contents


def test_manifest_counts_and_checksums(clean_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(read_person_layout("cuhk-pedes", clean_root), out, dataset="cuhk-pedes", samples_per_shard=4,
                 tool_args={"note": "test"})
    manifest = _manifest(out, "train")
    assert manifest["samples"] == 18 and manifest["inputs"] == 18 and manifest["skipped"] == []
    assert manifest["captions"] == {"en": 36} and manifest["identities"] == 6
    assert manifest["tool_args"] == {"note": "test"}
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 4, 2]
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"train-{i:06d}.tar" for i in range(5)] + ["val-000000.tar", "val-000001.tar", "test-000000.tar",
                                                     "test-000001.tar"]
        + [f"{s}.manifest.json" for s in ("train", "val", "test")]
    )


def test_members_keys_and_headers(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    out = tmp_path / "out"
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=4)
    by_source = {r.source: r for r in records}
    for shard in sorted(out.glob("*.tar")):
        for info in _members(shard):
            assert info.name.count(".") == 1 and info.name.rsplit(".", 1)[1] in ("jpg", "json")
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
            assert info.isreg()
        for key, jpg, meta in _samples(shard):
            assert "." not in key and meta["key"] == key and key.startswith(meta["split"] + "_")
            assert set(meta) == {"key", "pid", "captions", "source", "split", "dataset"}
            record = by_source[meta["source"]]
            assert meta["pid"] == record.pid and meta["captions"]["en"] == record.captions
            assert jpg == record.image_path.read_bytes()  # JPEG passed through unchanged
    val_keys = [k for shard in sorted(out.glob("val-*.tar")) for k, _, _ in _samples(shard)]
    assert val_keys == [f"val_{n:07d}" for n in range(6)]


def test_resize_and_png_are_reencoded(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    png = tmp_path / "first.png"
    Image.open(records[0].image_path).convert("RGBA").save(png)
    records[0] = dataclasses.replace(records[0], image_path=png, source="first.png")
    write_shards(records, tmp_path / "plain", dataset="cuhk-pedes")
    samples = _samples(tmp_path / "plain" / "train-000000.tar")
    with Image.open(io.BytesIO(samples[0][1])) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE[1], SIZE[0])
    assert samples[1][1] == records[1].image_path.read_bytes()
    write_shards(records, tmp_path / "resized", dataset="cuhk-pedes", resize=(32, 16))
    for _, jpg, _ in _samples(tmp_path / "resized" / "train-000000.tar"):
        with Image.open(io.BytesIO(jpg)) as image:
            assert image.format == "JPEG" and image.size == (16, 32)
    assert verify_shards(tmp_path / "resized") == []


def test_max_shard_bytes_cuts_by_real_size(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    limit = 30 * 1024
    write_shards(records, tmp_path / "one", dataset="cuhk-pedes", max_shard_bytes=limit)
    write_shards(records, tmp_path / "two", dataset="cuhk-pedes", max_shard_bytes=limit, workers=2)
    shards = sorted((tmp_path / "one").glob("train-*.tar"))
    assert len(shards) > 1
    assert all(p.stat().st_size <= limit for p in shards)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sum(s["samples"] for s in _manifest(tmp_path / "one", "train")["shards"]) == 18


def test_webdataset_reads_the_shards(clean_root: Path, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    write_shards(read_person_layout("cuhk-pedes", clean_root), tmp_path / "out", dataset="cuhk-pedes",
                 samples_per_shard=7)
    urls = [str(p) for p in sorted((tmp_path / "out").glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"train_{n:07d}" for n in range(18)]
    assert all(set(s) >= {"jpg", "json"} and not (set(s) - {"jpg", "json", "__key__", "__url__", "__local_path__"})
               for s in samples)


# ------------------------------------------------------------------------------- determinism and resuming


def test_byte_identical_across_runs_and_worker_counts(faulty_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", faulty_root)
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        write_shards(records, tmp_path / name, dataset="cuhk-pedes", samples_per_shard=5, workers=workers)
    first = _files(tmp_path / "a")
    assert len([n for n in first if n.endswith(".tar")]) == 4 + 2 + 2
    assert first == _files(tmp_path / "b") == _files(tmp_path / "c")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_rerun_keeps_good_shards_rebuilds_bad_and_removes_tmp(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    out = tmp_path / "out"
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    good = _stat(out / "train-000000.tar")
    original = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").write_bytes(original[:-2048] + b"\x01" * 2048)
    (out / "train-000002.tar.tmp-4242").write_bytes(b"half a shard")
    (out / "val.manifest.json.tmp-4242").write_text("{")
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    assert not list(out.glob("*.tmp-*"))
    assert _stat(out / "train-000000.tar") == good
    assert (out / "train-000001.tar").read_bytes() == original
    assert not (out / JOURNAL_NAME).exists()
    assert verify_shards(out) == []


def test_interrupted_run_resumes_from_the_journal(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    out = tmp_path / "out"
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    # Simulate a run killed before its manifests: the journal lists the shards built so far.
    lines = [json.dumps({"name": s["name"], "plan": s["plan"], "sha256": s["sha256"]})
             for s in _manifest(out, "train")["shards"][:2]]
    (out / JOURNAL_NAME).write_text("\n".join(lines) + "\n{\"name\": \"train-0000")
    for manifest in out.glob("*.manifest.json"):
        manifest.unlink()
    before = {p.name: _stat(p) for p in out.glob("*.tar")}
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    after = {p.name: _stat(p) for p in out.glob("*.tar")}
    assert [n for n in sorted(before) if before[n] == after[n]] == ["train-000000.tar", "train-000001.tar"]
    assert verify_shards(out) == []


def test_changed_inputs_rebuild_only_affected_shards(clean_root: Path, tmp_path: Path) -> None:
    records = read_person_layout("cuhk-pedes", clean_root)
    out = tmp_path / "out"
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    before = {p.name: _stat(p) for p in out.glob("*.tar")}
    records[7] = dataclasses.replace(records[7], captions=["A different description."])
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=5)
    changed = sorted(p.name for p in out.glob("*.tar") if _stat(p) != before[p.name])
    assert changed == ["train-000001.tar"]
    assert _samples(out / "train-000001.tar")[2][2]["captions"]["en"] == ["A different description."]
    # Fewer, larger shards: the old extra shard files go away.
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert verify_shards(out) == []


# ------------------------------------------------------------------------------------------------ verification


def test_verify_catches_damage(clean_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(read_person_layout("cuhk-pedes", clean_root), out, dataset="cuhk-pedes", samples_per_shard=5)
    assert verify_shards(out) == []
    shard = out / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "val-000001.tar").unlink()
    (out / "test-000009.tar").write_bytes(b"")
    problems = verify_shards(out)
    assert any(p.startswith("train-000002.tar: sha256 does not match") for p in problems)
    assert any(p.startswith("val-000001.tar: listed") and "missing" in p for p in problems)
    assert any(p.startswith("test-000009.tar: shard file not listed") for p in problems)
    assert verify_shards(tmp_path / "nothing") != []


def test_verify_checks_contents_not_only_checksums(clean_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(read_person_layout("cuhk-pedes", clean_root), out, dataset="cuhk-pedes")
    # A shard rewritten with a wrong split in one json, and the manifest checksum updated to match.
    shard = out / "val-000000.tar"
    rebuilt = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name == "val_0000001.json":
                data = data.replace(b'"split":"val"', b'"split":"test"')
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    shard.write_bytes(rebuilt.getvalue())
    manifest = _manifest(out, "val")
    manifest["shards"][0]["sha256"] = hashlib.sha256(rebuilt.getvalue()).hexdigest()
    manifest["shards"][0]["bytes"] = len(rebuilt.getvalue())
    manifest["samples"] = 7
    (out / "val.manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(out)
    assert any("val_0000001.json has split='test'" in p for p in problems)
    assert any("shards hold 6 samples, manifest says 7" in p for p in problems)


def test_bad_options_are_user_errors(clean_root: Path, tmp_path: Path) -> None:
    records: list[RawRecord] = read_person_layout("cuhk-pedes", clean_root)[:2]
    with pytest.raises(ShardWriteError, match="samples_per_shard"):
        write_shards(records, tmp_path / "o", dataset="cuhk-pedes", samples_per_shard=0)
    with pytest.raises(ShardWriteError, match="resize"):
        write_shards(records, tmp_path / "o", dataset="cuhk-pedes", resize=(0, 5))
    with pytest.raises(ShardWriteError, match="no records"):
        write_shards([], tmp_path / "o", dataset="cuhk-pedes")
    assert issubclass(ShardWriteError, ValueError)


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_with_verify(faulty_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["--dataset", "cuhk-pedes", "--root", str(faulty_root), "--out", str(out), "--samples-per-shard", "8",
            "--resize", "32x16", "--verify"]
    assert shards_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 20 inputs = 18 written + 2 skipped" in printed
    assert "test: 7 inputs = 6 written + 1 skipped" in printed
    assert "verify: ok" in printed
    assert _manifest(out, "train")["tool_args"]["resize"] == [32, 16]
    assert shards_cli.main(argv + ["--strict"]) == 2
    assert capsys.readouterr().err.startswith("error: 3 record(s) skipped")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--root", "/definitely/not/here"], "error: dataset root '/definitely/not/here' does not exist"),
        (["--resize", "384by128"], "error: --resize expects HxW"),
        (["--dataset", "rstpreid"], "error: no rstpreid annotation file"),
    ],
)
def test_cli_user_errors_exit_2(clean_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                extra: list[str], message: str) -> None:
    argv = ["--dataset", "cuhk-pedes", "--root", str(clean_root), "--out", str(tmp_path / "out")] + extra
    assert shards_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_cli_verify_failure_exits_1(clean_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_cli, "verify_shards", lambda out: ["train-000000.tar: broken"])
    argv = ["--dataset", "cuhk-pedes", "--root", str(clean_root), "--out", str(tmp_path / "out"), "--verify"]
    assert shards_cli.main(argv) == 1
    assert "problem: train-000000.tar: broken" in capsys.readouterr().err


def test_cli_runs_as_a_script_with_workers(clean_root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "tools/make_shards.py", "--dataset", "cuhk-pedes", "--root", str(clean_root),
               "--out", str(tmp_path / "out"), "--workers", "2", "--samples-per-shard", "5", "--verify"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 18 inputs = 18 written + 0 skipped" in done.stdout
    bad = subprocess.run(command[:5] + ["/nonexistent"] + command[6:], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_verify_command_checks_existing_shards_one_line_per_damaged_shard(clean_root: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    write_shards(read_person_layout("cuhk-pedes", clean_root), out, dataset="cuhk-pedes", samples_per_shard=5)
    assert shards_cli.main(["verify", str(out)]) == 0 and "verify: ok" in capsys.readouterr().out
    manifest = _manifest(out, "train")  # every key of a shard renumbered: dozens of follow-on problems
    shard = out / manifest["shards"][1]["name"]
    rebuilt = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            info.name = info.name.replace("train_", "train_9")
            dst.addfile(info, io.BytesIO(data))
    shard.write_bytes(rebuilt.getvalue())
    manifest["shards"][1]["sha256"] = hashlib.sha256(rebuilt.getvalue()).hexdigest()
    manifest["shards"][1]["bytes"] = len(rebuilt.getvalue())
    (out / "train.manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert shards_cli.main(["verify", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"problem: {shard.name}")]
    assert len(lines) == 2 and "key 'train_9" in lines[0] and lines[1].endswith("more problems after the first")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "verify writes nothing"
