"""Bad input stops make_shards with a message naming the file and what was expected (exit 2, no traceback); an
interrupted run leaves no partial shard under a final name; caption files are parsed in every format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dsmoe.shards import workers as shard_workers
import synthetic_crosslingual as synth
from dsmoe.shards import cli as shards_cli
from dsmoe.shards.layouts.captions import parse_caption_file
from dsmoe.shards.layouts.multi30k import read_multi30k
from dsmoe.shards.layouts.base import read_lines
from dsmoe.shards.records import RawFormatError
from dsmoe.shards.verify import verify_shards
from dsmoe.shards.writer import write_shards


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, synth.SyntheticLayout]:
    base = tmp_path_factory.mktemp("raw")
    return {"multi30k": synth.make_multi30k(base / "m30k", faults=False),
            "coco": synth.make_coco(base / "coco", faults=False),
            "jsonl": synth.make_jsonl(base / "jsonl", faults=False)}


def _fails(capsys: pytest.CaptureFixture, *argv: object) -> str:
    code = shards_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_wrong_paths_name_what_was_looked_for(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert "'/no/such/dir' does not exist" in _fails(capsys, "--dataset", "multi30k", "--root", "/no/such/dir",
                                                     "--out", out)
    err = _fails(capsys, "--dataset", "multi30k", "--root", raw["coco"].root, "--out", out)
    assert "not a Multi30K checkout: expected data/task1/image_splits/" in err and "dataset_coco.json (coco" in err
    err = _fails(capsys, "--dataset", "msrvtt", "--root", raw["coco"].root, "--out", out)
    assert "no MSR-VTT annotation" in err and "MSRVTT_data.json" in err and "found dataset_coco.json" in err
    err = _fails(capsys, "--dataset", "multi30k", "--root", raw["multi30k"].root, "--images", tmp_path / "nope",
                 "--out", out)
    assert "nope: no such directory (the Flickr30K images" in err
    err = _fails(capsys, "--dataset", "coco", "--root", raw["coco"].root, "--stair", tmp_path / "stair.json",
                 "--out", out)
    assert "stair.json: no such STAIR Captions file or directory" in err
    err = _fails(capsys, "--dataset", "jsonl", "--annotations", tmp_path / "a.jsonl", "--out", out)
    assert "a.jsonl: no such file" in err
    (tmp_path / "not-a-dataset").mkdir()  # an existing directory: load_dataset looks at it, not at the Hub
    err = _fails(capsys, "--dataset", "hf", "--hf", tmp_path / "not-a-dataset", "--out", out)
    assert "not-a-dataset: cannot be loaded with datasets.load_dataset" in err


def test_another_datasets_file_is_recognised(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    msrvtt_like = tmp_path / "MSRVTT_data.json"
    msrvtt_like.write_text(json.dumps({"info": {}, "videos": [], "sentences": []}))
    err = _fails(capsys, "--dataset", "coco", "--root", raw["coco"].root, "--annotations", msrvtt_like,
                 "--out", tmp_path / "out")
    assert "MSRVTT_data.json: expected Karpathy's dataset_coco.json" in err and "looks like MSR-VTT" in err
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"images": [{"filename": "1.jpg"}], "dataset": "flickr30k"}))
    err = _fails(capsys, "--dataset", "coco", "--root", raw["coco"].root, "--annotations", flickr,
                 "--out", tmp_path / "out")
    assert "this is Karpathy's 'flickr30k' file, expected dataset_coco.json" in err
    err = _fails(capsys, "--dataset", "coco", "--root", raw["coco"].root, "--stair",
                 raw["coco"].root / "dataset_coco.json", "--out", tmp_path / "out")
    assert "dataset_coco.json" in err and "expected" in err
    err = _fails(capsys, "--dataset", "msrvtt", "--root", tmp_path, "--annotations",
                 raw["coco"].root / "dataset_coco.json", "--out", tmp_path / "out")
    assert "expected MSRVTT_data.json" in err and "looks like Karpathy's dataset_coco.json" in err


def test_malformed_annotations_name_file_and_place(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "dataset_coco.json"
    bad.write_text('{"images": [{"filepath": "val2014", ')
    err = _fails(capsys, "--dataset", "coco", "--root", tmp_path, "--out", tmp_path / "out")
    assert "dataset_coco.json: malformed JSON at line 1" in err
    bad.write_text(json.dumps({"images": [{"filepath": "a", "filename": "b.jpg", "split": "train", "cocoid": 1}]}))
    err = _fails(capsys, "--dataset", "coco", "--root", tmp_path, "--out", tmp_path / "out")
    assert "images[0] lacks ['sentences']" in err
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"image": "a.jpg", "captions": ["x"]}\n{"image": "b.jpg", "captions": [1]}\n')
    err = _fails(capsys, "--dataset", "jsonl", "--annotations", lines, "--out", tmp_path / "out")
    assert "bad.jsonl: line 2: 'captions' must be" in err
    lines.write_text('{"image": "a.jpg", "captions": ["x"]}\nnot json\n')
    assert "bad.jsonl: line 2: malformed JSON" in _fails(capsys, "--dataset", "jsonl", "--annotations", lines,
                                                         "--out", tmp_path / "out")
    csv = tmp_path / "list.csv"
    csv.write_text("key,video\nret0,video0\n")
    vtt = tmp_path / "vtt"
    vtt.mkdir()
    (vtt / "MSRVTT_data.json").write_text(json.dumps({"videos": [{"video_id": "video0", "split": "test"}],
                                                      "sentences": [{"video_id": "video0", "caption": "a"}]}))
    (vtt / "video0.mp4").write_bytes(b"x")
    err = _fails(capsys, "--dataset", "msrvtt", "--root", vtt, "--test-list", csv, "--out", tmp_path / "out")
    assert "list.csv: expected a CSV file with the columns ['video_id', 'sentence']" in err


def test_misaligned_multi30k_files_are_an_error(tmp_path: Path) -> None:
    layout = synth.make_multi30k(tmp_path / "m", faults=False)
    de = layout.root / "data/task1/raw/val.de.gz"
    de.write_bytes(gzip.compress(b"only one line\n"))
    with pytest.raises(RawFormatError, match=r"val\.de\[\.gz\]: 1 caption lines, but .*val\.txt lists 2 images"):
        read_multi30k(layout.root)
    with pytest.raises(RawFormatError, match=r"missing, but --languages asks for 'ja'"):
        read_multi30k(layout.root, languages=["en", "ja"])
    (layout.root / "data/task1/raw/val.cs.gz").unlink()
    de.write_bytes(gzip.compress(b"eins\nzwei\n"))
    result = read_multi30k(layout.root)  # without --languages a missing language is noted, not fatal
    assert any("val: no cs captions" in note for note in result.notes)
    assert all("cs" not in r.captions for r in result.records if r.split == "val")
    (layout.root / "data/task1/raw/test_2016_flickr.en.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(RawFormatError, match=r"test_2016_flickr\.en\.gz"):
        read_multi30k(layout.root)


def test_bad_options_and_translation_files(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = raw["multi30k"].root
    out = tmp_path / "out"
    err = _fails(capsys, "--dataset", "multi30k", "--root", root, "--stair", root, "--out", out)
    assert "--stair does not apply to --dataset multi30k" in err
    assert "--translations expects LANG=PATH" in _fails(capsys, "--dataset", "multi30k", "--root", root, "--out",
                                                        out, "--translations", "dee.json")
    assert "is not a usable language tag" in _fails(capsys, "--dataset", "multi30k", "--root", root, "--out", out,
                                                    "--translations", "d.e=x.json")
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2, 3]")
    err = _fails(capsys, "--dataset", "multi30k", "--root", root, "--out", out, "--translations", f"de={numbers}")
    assert "numbers.json: found a list of 3 int; expected one of: a JSON object {image: [captions]}" in err
    plain = tmp_path / "plain.txt"
    plain.write_text("just some text without ids\n")
    err = _fails(capsys, "--dataset", "multi30k", "--root", root, "--out", out, "--translations", f"de={plain}")
    assert "plain.txt: line 1 starts with 'just', which is no cap_id" in err
    assert "--dataset jsonl needs --annotations" in _fails(capsys, "--dataset", "jsonl", "--out", out)
    assert "no such caption file" in _fails(capsys, "--dataset", "multi30k", "--root", root, "--out", out,
                                            "--translations", f"de={tmp_path / 'absent.json'}")


def test_caption_file_formats_are_detected(tmp_path: Path) -> None:
    entries = [("a/1.jpg", ["eins", "one"]), ("2.jpg", ["zwei"])]
    for fmt in ("json-dict", "cap-id-lines", "json-records"):
        parsed = parse_caption_file(synth.write_translations(tmp_path / fmt, fmt, entries), "de")
        assert parsed.format == fmt
        flat = [(ref, cap) for ref, caps in parsed.entries for cap in caps]
        assert [cap for _, cap in flat] == ["eins", "one", "zwei"]
    coco = tmp_path / "stair.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "猫"}]}), encoding="utf-8")
    assert parse_caption_file(coco, "ja").entries == [("5", ["猫"])]
    tabbed = tmp_path / "cn.txt"
    tabbed.write_bytes("\ufeffCOCO_val2014_000000000042#0\t一只猫\r\n\r\nCOCO_val2014_000000000042#1\t\n".encode())
    assert parse_caption_file(tabbed, "zh").entries == [("COCO_val2014_000000000042", ["一只猫"]),
                                                         ("COCO_val2014_000000000042", [""])]
    assert read_lines(tabbed, "x")[0] == "COCO_val2014_000000000042#0\t一只猫"


def test_interrupted_build_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = synth.make_multi30k(tmp_path / "m", per_split=(6, 1, 1), faults=False)
    records = read_multi30k(layout.root).records
    out = tmp_path / "out"
    real = shard_workers.image_members
    calls = {"n": 0}

    def crash_on_fourth(sample, spill):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of train-000001
        return real(sample, spill)

    monkeypatch.setattr(shard_workers, "image_members", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        write_shards(records, out, dataset="multi30k", samples_per_shard=3)
    assert sorted(p.name for p in out.iterdir()) == [".make_shards.journal.jsonl", "train-000000.tar"]
    monkeypatch.setattr(shard_workers, "image_members", real)
    before = (out / "train-000000.tar").stat().st_ino
    reports = write_shards(records, out, dataset="multi30k", samples_per_shard=3)
    assert (out / "train-000000.tar").stat().st_ino == before  # resumed from the journal
    assert reports["train"].written == 6 and verify_shards(out) == []


def test_verify_checks_frames_and_languages(tmp_path: Path) -> None:
    layout = synth.make_jsonl(tmp_path / "j", faults=False)
    from dsmoe.shards.layouts.generic import read_jsonl

    out = tmp_path / "out"
    write_shards(read_jsonl(layout.files["annotations"]).records, out, dataset="jsonl")
    assert verify_shards(out) == []
    manifest = json.loads((out / "val.manifest.json").read_text())
    manifest["captions"]["de"] = 5
    (out / "val.manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(out) == ["val.manifest.json: shards hold 1 de captions, manifest says 5"]
