"""make_shards on MSR-VTT (videos decoded with PyAV): frame sampling, the official split and the 1k-A protocol,
Chinese captions, determinism across worker counts, and reading the video shards back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import synthetic_crosslingual as synth
from dsmoe.shards import cli as shards_cli
from dsmoe.shards.verify import verify_shards
from dsmoe.shards.video import VideoDecodeError, frame_indices, sample_frames


def _manifest(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}.manifest.json").read_text(encoding="utf-8"))


def _groups(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    groups: dict[str, dict[str, bytes]] = {}
    names: list[str] = []
    for entry in _manifest(out, split)["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar.getmembers():
                names.append(member.name)
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return groups


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def vtt(tmp_path_factory: pytest.TempPathFactory) -> synth.SyntheticLayout:
    return synth.make_msrvtt(tmp_path_factory.mktemp("msrvtt"))


@pytest.fixture(scope="module")
def vtt_shards(vtt: synth.SyntheticLayout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vtt-shards")
    argv = ["--dataset", "msrvtt", "--root", str(vtt.root), "--zh-captions", str(vtt.files["zh"]), "--frames", "5",
            "--out", str(out)]
    assert shards_cli.main(argv) == 0
    return out


# ----------------------------------------------------------------------------------------------- frame sampling


def test_frame_indices_are_uniform_segment_midpoints() -> None:
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    assert frame_indices(12, 12) == list(range(12))
    assert frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than asked: frames repeat
    with pytest.raises(ValueError):
        frame_indices(0, 3)


def test_sample_frames_from_a_synthetic_video(tmp_path: Path) -> None:
    data = synth.make_video(tmp_path / "v.mp4", 7, frames=16, size=32).read_bytes()
    frames = sample_frames(data, 4)
    assert len(frames) == 4 and all(f.size == (32, 32) and f.mode == "RGB" for f in frames)
    # The moving bar: its left edge advances with the frame index (2, 6, 10, 14 of 16).
    columns = [max(range(32), key=lambda x, f=f: sum(abs(a - b) for a, b in zip(
        f.getpixel((x, 16)), f.getpixel((0, 16))))) for f in frames]
    assert columns == sorted(columns) and columns[0] < columns[-1]
    assert [f.tobytes() for f in sample_frames(data, 4)] == [f.tobytes() for f in frames]
    assert len(sample_frames(data, 40)) == 40
    for bad in (b"not a video at all", data[:200], b""):
        with pytest.raises(VideoDecodeError):
            sample_frames(bad, 4)


# ----------------------------------------------------------------------------------------------------- MSR-VTT


def test_msrvtt_official_split_frames_and_chinese_captions(vtt: synth.SyntheticLayout, vtt_shards: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert verify_shards(vtt_shards) == []
    for split, inputs in vtt.inputs.items():
        manifest = _manifest(vtt_shards, split)
        assert (manifest["inputs"], manifest["samples"]) == (inputs, vtt.written[split])
        reasons = [s["reason"] for s in manifest["skipped"]]
        assert len(reasons) == len(vtt.reasons[split])
        assert all(any(r.startswith(e) for r in reasons) for e in vtt.reasons[split])
        assert manifest["kind"] == "video" and manifest["frames"] == 5
    train = _manifest(vtt_shards, "train")
    assert train["captions"] == {"en": 6, "zh": 4}
    report = train["caption_files"][0]
    assert report["format"] == "cap-id-lines" and report["unmatched"] == [
        {"image": "video9999", "reason": "no sample has this image"}]
    groups = _groups(vtt_shards, "train")
    assert list(groups) == ["train_0000000", "train_0000001"]
    for key, parts in groups.items():
        assert sorted(parts) == ["frame00.jpg", "frame01.jpg", "frame02.jpg", "frame03.jpg", "frame04.jpg", "jpg",
                                 "json"]
        assert parts["jpg"] == parts["frame00.jpg"]
        meta = json.loads(parts["json"])
        assert meta["frames"] == 5 and meta["image_id"] in ("video0", "video1") and meta["key"] == key
        assert len(meta["captions"]["zh"]) == 2 and len(meta["captions"]["en"]) == 3
        with Image.open(io.BytesIO(parts["frame03.jpg"])) as frame:
            assert frame.format == "JPEG" and frame.size == (32, 32)
        assert parts["frame00.jpg"] != parts["frame04.jpg"]  # the bar moved


def test_msrvtt_two_workers_rerun_and_resize(vtt: synth.SyntheticLayout, vtt_shards: Path, tmp_path: Path) -> None:
    argv = ["--dataset", "msrvtt", "--root", str(vtt.root), "--zh-captions", str(vtt.files["zh"]), "--frames", "5"]
    assert shards_cli.main(argv + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert _files(tmp_path / "two") == _files(vtt_shards)
    assert shards_cli.main(argv + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert _files(tmp_path / "two") == _files(vtt_shards)
    assert shards_cli.main(argv + ["--out", str(tmp_path / "small"), "--resize", "16x24", "--verify"]) == 0
    frame = _groups(tmp_path / "small", "val")["val_0000000"]["frame02.jpg"]
    with Image.open(io.BytesIO(frame)) as image:
        assert image.size == (24, 16)


def test_msrvtt_1k_a_protocol(vtt: synth.SyntheticLayout, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = shards_cli.main(["--dataset", "msrvtt", "--root", str(vtt.root), "--videos", str(vtt.root / "videos"),
                     "--test-list", str(vtt.files["test_list"]), "--frames", "3", "--out", str(out), "--verify"])
    printed = capsys.readouterr().out
    assert code == 0 and "verify: ok" in printed
    assert "1k-A protocol: 2 test videos" in printed
    assert "train: 5 inputs = 3 written + 2 skipped" in printed  # the validate video trains in 1k-A
    assert "test: 2 inputs = 1 written + 1 skipped" in printed and not (out / "val.manifest.json").exists()
    meta = json.loads(_groups(out, "test")["test_0000000"]["json"])
    assert meta["captions"] == {"en": ["the test query of video3"]} and meta["frames"] == 3
    out7k = tmp_path / "seven"
    (vtt.root / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo2\n", encoding="utf-8")
    assert shards_cli.main(["--dataset", "msrvtt", "--root", str(vtt.root), "--test-list", str(vtt.files["test_list"]),
                     "--train-list", str(vtt.root / "MSRVTT_train.7k.csv"), "--out", str(out7k)]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 inputs = 2 written + 0 skipped" in printed and "3 videos in neither list" in printed


def test_video_shards_read_back_through_the_pipeline(vtt_shards: Path, tmp_path: Path) -> None:
    from dsmoe.data.pipeline import CaptionPairs, EvalImages, TrainStreamConfig, train_loader
    from dsmoe.data.text import CaptionEncoder
    from dsmoe.demo.models import train_tokenizer

    groups = _groups(vtt_shards, "train")
    chinese = [c for parts in groups.values() for c in json.loads(parts["json"])["captions"]["zh"]]
    tokenizer = train_tokenizer(chinese, tmp_path / "tok")
    cfg = TrainStreamConfig(shard_dir=str(vtt_shards), split="train", image_size=(16, 16), micro_batch=2,
                            batches_per_epoch=3, rank=0, world_size=1, seed=1, shuffle_buffer=2)
    batches = list(train_loader(cfg, CaptionPairs(CaptionEncoder(tokenizer, 16), "zh"), 0, 0, 0))
    # The training reader stacks a video's frames (json "frames": 5, members frame00.jpg ... frame04.jpg).
    assert len(batches) == 3 and all(b["image"].shape == (2, 5, 3, 16, 16) for b in batches)
    decoded = {t.replace(" ", "") for b in batches for t in tokenizer.batch_decode(b["text"], skip_special_tokens=True)}
    assert decoded <= {c.replace(" ", "") for c in chinese}
    items = list(EvalImages(str(vtt_shards), "test", (16, 16), rank=0, world_size=1))
    assert len(items) == 1 and items[0].key == "test_0000000" and len(items[0].captions["zh"]) == 2
    assert tuple(items[0].image.shape) in ((5, 3, 16, 16), (3, 16, 16))  # frames, or the first frame only


def test_jsonl_video_entries(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synth.make_video(tmp_path / "clips" / "a.mp4", 1, frames=6)
    (tmp_path / "clips" / "b.jpg").write_bytes(synth.tiny_jpeg(2))
    (tmp_path / "ann.jsonl").write_text(
        json.dumps({"image": "clips/a.mp4", "captions": {"en": ["a clip"], "zh": ["片段"]}}) + "\n"
        + json.dumps({"image": "clips/b.jpg", "captions": "a still"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert shards_cli.main(["--dataset", "jsonl", "--annotations", str(tmp_path / "ann.jsonl"), "--frames", "3",
                     "--out", str(out), "--verify"]) == 0
    groups = _groups(out, "train")
    assert sorted(groups["train_0000000"]) == ["frame00.jpg", "frame01.jpg", "frame02.jpg", "jpg", "json"]
    assert sorted(groups["train_0000001"]) == ["jpg", "json"]
    assert json.loads(groups["train_0000000"]["json"])["frames"] == 3
    assert "frames" not in json.loads(groups["train_0000001"]["json"])
