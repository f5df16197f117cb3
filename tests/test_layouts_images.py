"""make_shards on the image-text layouts: Multi30K, MSCOCO (Karpathy + STAIR + COCO-CN), JSON lines, Hugging Face
datasets, and machine translations in the three formats in circulation; read back through the training pipeline.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import synthetic_crosslingual as synth
from dsmoe.shards import cli as shards_cli
from dsmoe.shards.verify import verify_shards

IMAGE_SCHEMA = {"key", "image_id", "captions", "source", "split", "dataset"}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = shards_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _manifest(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}.manifest.json").read_text(encoding="utf-8"))


def _samples(out: Path, split: str) -> list[tuple[str, dict[str, bytes], dict]]:
    """(key, members by extension, parsed json) of every sample of a split, in order."""
    result: list[tuple[str, dict[str, bytes], dict]] = []
    for entry in _manifest(out, split)["shards"]:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        result += [(key, parts, json.loads(parts["json"])) for key, parts in groups.items()]
    return result


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _check_accounting(printed: str, layout: synth.SyntheticLayout, out: Path) -> None:
    for split, inputs in layout.inputs.items():
        written = layout.written[split]
        assert f"{split}: {inputs} inputs = {written} written + {inputs - written} skipped" in printed
        if split not in ("train", "val", "test"):
            continue
        manifest = _manifest(out, split)
        assert manifest["inputs"] == inputs and manifest["samples"] == written
        reasons = [skip["reason"] for skip in manifest["skipped"]]
        assert len(reasons) == len(layout.reasons[split])
        for expected in layout.reasons[split]:
            assert any(r.startswith(expected) for r in reasons), (expected, reasons)


# ---------------------------------------------------------------------------------------------------- Multi30K


@pytest.fixture(scope="module")
def m30k(tmp_path_factory: pytest.TempPathFactory) -> synth.SyntheticLayout:
    return synth.make_multi30k(tmp_path_factory.mktemp("m30k"))


@pytest.fixture(scope="module")
def m30k_shards(m30k: synth.SyntheticLayout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m30k-shards")
    assert shards_cli.main(["--dataset", "multi30k", "--root", str(m30k.root), "--out", str(out)]) == 0
    return out


def test_multi30k_task1_accounting_manifest_and_members(m30k: synth.SyntheticLayout, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "multi30k", "--root", m30k.root, "--out", out,
                            "--samples-per-shard", "3", "--verify")
    assert code == 0, printed
    _check_accounting(printed, m30k, out)
    assert "verify: ok" in printed
    train = _manifest(out, "train")
    assert train["captions"] == {"cs": 4, "de": 4, "en": 4, "fr": 4} and train["languages"] == ["cs", "de", "en", "fr"]
    assert train["images"] == 4 and "identities" not in train and train["kind"] == "image"
    assert [s["samples"] for s in train["shards"]] == [3, 1]
    assert any(f.endswith("train.de.gz") for f in train["tool_args"]["files_read"])
    for key, parts, meta in _samples(out, "train"):
        assert set(parts) == {"jpg", "json"} and "." not in key and set(meta) == IMAGE_SCHEMA
        assert meta["image_id"] == meta["source"][:-4]
        assert parts["jpg"] == (m30k.files["images"] / meta["source"]).read_bytes()  # JPEG passed through
        assert meta["captions"]["en"] == [synth.caption(int(_seed(m30k, meta["source"])), "en")]
        assert meta["captions"]["de"] == [synth.caption(int(_seed(m30k, meta["source"])), "de")]
    assert _manifest(out, "val")["skipped"] == [{"source": _val_blank(m30k), "reason": "no non-empty caption"}]


def _seed(layout: synth.SyntheticLayout, source: str) -> int:
    """The generator's seed of a Multi30K image (its file name is seed * 7919 mod 1e7)."""
    number = int(source[:-4])
    return next(s for s in range(1000, 1100) if s * 7919 % 10_000_000 == number)


def _val_blank(layout: synth.SyntheticLayout) -> str:
    names = (layout.root / "data/task1/image_splits/val.txt").read_text().split()
    return names[-1]


def test_multi30k_task2_five_captions_plain_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = synth.make_multi30k(tmp_path / "raw", task=2, gz=False)
    assert (layout.root / "data/task2/raw/train.3.de").is_file()
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "multi30k", "--task", "2", "--root", layout.root / "data",
                            "--out", out, "--verify")
    assert code == 0 and "verify: ok" in printed
    _check_accounting(printed, layout, out)
    assert _manifest(out, "test")["captions"] == {"de": 10, "en": 10}
    meta = _samples(out, "test")[0][2]
    assert len(meta["captions"]["en"]) == 5 and meta["captions"]["en"][2].endswith("(3)")


def test_multi30k_rerun_and_two_workers_are_byte_identical(m30k: synth.SyntheticLayout, m30k_shards: Path,
                                                           tmp_path: Path) -> None:
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in m30k_shards.glob("*.tar")}
    first = _files(m30k_shards)
    assert shards_cli.main(["--dataset", "multi30k", "--root", str(m30k.root), "--out", str(m30k_shards)]) == 0
    assert _files(m30k_shards) == first
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in m30k_shards.glob("*.tar")} == before  # kept
    other = tmp_path / "two"
    assert shards_cli.main(["--dataset", "multi30k", "--root", str(m30k.root), "--out", str(other), "--workers", "2"]) == 0
    assert _files(other) == first
    assert not list(other.glob(".make_shards*")) and not list(other.glob("*.tmp-*"))


@pytest.mark.parametrize("fmt", ["json-dict", "cap-id-lines", "json-records"])
def test_translations_in_each_format_are_merged_and_unmatched_reported(
        fmt: str, m30k: synth.SyntheticLayout, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = (m30k.root / "data/task1/image_splits/train.txt").read_text().split()
    present = [n for n in dict.fromkeys(names) if (m30k.files["images"] / n).is_file()]
    entries = [(f"flickr30k-images/{n}" if fmt == "json-records" else n,
                [synth.caption(_seed(m30k, n), "ja"), synth.caption(_seed(m30k, n), "ja", 1)]) for n in present]
    entries.append(("123.jpg", ["どこにもない画像"]))
    path = synth.write_translations(tmp_path / f"train.ja.{fmt}", fmt, entries,
                                    image_ids=[n[:-4] for n, _ in entries] if fmt == "json-records" else None)
    out = tmp_path / "out"
    argv = ["--dataset", "multi30k", "--root", m30k.root, "--out", out, "--translations", f"ja={path}"]
    code, printed, _ = _run(capsys, *argv)
    assert code == 0
    assert f"translations ja: {path}: detected format {fmt}" in printed
    assert "1 unmatched" in printed and "unmatched '123" in printed
    train = _manifest(out, "train")
    assert train["captions"]["ja"] == 2 * len(present)
    report = next(r for r in train["caption_files"] if r["language"] == "ja")
    assert report["format"] == fmt and report["kind"] == "translation"
    assert [u["image"] for u in report["unmatched"]] == ["123.jpg" if fmt != "cap-id-lines" else "123"]
    for _, _, meta in _samples(out, "train"):
        assert meta["captions"]["ja"] == [synth.caption(_seed(m30k, meta["source"]), "ja", k) for k in (0, 1)]
    assert _manifest(out, "test")["captions"].get("ja") is None
    code, _, err = _run(capsys, *argv, "--strict")
    assert code == 2 and "caption entr(ies) unmatched" in err and "123" in err


def test_multi30k_shards_read_back_through_the_pipeline(m30k_shards: Path, tmp_path: Path) -> None:
    from dsmoe.data.pipeline import CaptionPairs, EvalImages, TrainStreamConfig, train_loader
    from dsmoe.data.format import sample_label
    from dsmoe.data.text import CaptionEncoder
    from dsmoe.demo.models import train_tokenizer

    metas = {key: meta for key, _, meta in _samples(m30k_shards, "train")}
    german = [c for meta in metas.values() for c in meta["captions"]["de"]]
    english = [c for meta in metas.values() for c in meta["captions"]["en"]]
    tokenizer = train_tokenizer(german + english, tmp_path / "tok")
    encoder = CaptionEncoder(tokenizer, 24)
    cfg = TrainStreamConfig(shard_dir=str(m30k_shards), split="train", image_size=(24, 32), micro_batch=2,
                            batches_per_epoch=4, rank=0, world_size=1, seed=3, shuffle_buffer=4, augment=True)
    norm = lambda text: re.sub(r"[^\w]", "", text.lower())  # noqa: E731
    labels = {sample_label(meta) for meta in metas.values()}
    for workers in (0, 2):
        batches = list(train_loader(cfg, CaptionPairs(encoder, "de"), 0, 0, workers))
        assert len(batches) == 4
        for batch in batches:
            assert batch["image"].shape == (2, 3, 24, 32)
            decoded = tokenizer.batch_decode(batch["text"], skip_special_tokens=True)
            assert all(norm(text) in {norm(c) for c in german} for text in decoded)
            assert set(batch["pid"].tolist()) <= labels
    items = list(EvalImages(str(m30k_shards), "test", (24, 32), rank=0, world_size=1))
    tests = _samples(m30k_shards, "test")
    assert [s.key for s in items] == [key for key, _, _ in tests]
    assert [s.captions["fr"] for s in items] == [meta["captions"]["fr"] for _, _, meta in tests]
    assert [s.label for s in items] == [sample_label(meta) for _, _, meta in tests]


# -------------------------------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> synth.SyntheticLayout:
    return synth.make_coco(tmp_path_factory.mktemp("coco"))


def test_coco_karpathy_with_stair_and_coco_cn(coco: synth.SyntheticLayout, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "coco", "--root", coco.root, "--stair", coco.files["stair"],
                            "--coco-cn", coco.root, "--out", out, "--verify")
    assert code == 0 and "verify: ok" in printed
    _check_accounting(printed, coco, out)
    assert "2 'restval' images merged into train" in printed
    assert printed.count("1 unmatched") == coco.unmatched == 2
    assert "unmatched '555555'" in printed and "unmatched 'COCO_train2014_000000777777'" in printed
    manifests = {split: _manifest(out, split) for split in ("train", "val", "test")}
    assert sum(m["captions"]["ja"] for m in manifests.values()) == coco.expected["stair_captions"]
    assert manifests["train"]["captions"]["en"] == 25 and all("zh" in m["captions"] for m in manifests.values())
    raw = json.loads((coco.root / "dataset_coco.json").read_text())
    by_id = {str(item["cocoid"]): item for item in raw["images"]}
    for split in ("train", "val", "test"):
        for _, parts, meta in _samples(out, split):
            item = by_id[meta["image_id"]]
            assert meta["source"] == f"{item['filepath']}/{item['filename']}"
            assert meta["captions"]["en"] == [s["raw"] for s in item["sentences"]]
            assert meta["captions"]["ja"] == [synth.caption(int(meta["image_id"]), "ja", k) for k in (0, 1)]
            assert item["split"] == split or (item["split"], split) == ("restval", "train")


def test_coco_cn_split_source(coco: synth.SyntheticLayout, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "coco", "--root", coco.root, "--coco-cn", coco.root,
                            "--split-source", "coco-cn", "--out", out, "--verify")
    assert code == 0 and "verify: ok" in printed
    for split, count in coco.expected["coco_cn_split"].items():
        assert f"{split}: {count} inputs = {count} written + 0 skipped" in printed
    test = _manifest(out, "test")
    assert test["captions"]["zh_translated"] == 2 and "ja" not in test["captions"]
    listed = (coco.files["coco_cn"] / "coco-cn_test.txt").read_text().split()
    assert [meta["image_id"] for _, _, meta in _samples(out, "test")] == [str(int(i[-12:])) for i in listed]


# ------------------------------------------------------------------------------------------ JSON lines and HF


def test_jsonl_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = synth.make_jsonl(tmp_path / "raw")
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "jsonl", "--annotations", layout.files["annotations"],
                            "--out", out, "--verify")
    assert code == 0 and "verify: ok" in printed
    _check_accounting(printed, layout, out)
    assert "skipped dev images/a/img_1.jpg: unknown split 'dev'" in printed
    train = {meta["image_id"]: meta for _, _, meta in _samples(out, "train")}
    assert list(train) == ["img0", "img1", "img2", "img5"]  # img5 names no split: the default split
    assert train["img0"]["captions"] == {"en": [synth.caption(3000)]}
    assert train["img5"]["captions"] == {"en": [synth.caption(3005)], "de": [synth.caption(3005, "de")]}
    assert not (out / "dev.manifest.json").exists()
    code, _, err = _run(capsys, "--dataset", "jsonl", "--annotations", layout.files["annotations"], "--out", out,
                        "--strict")
    assert code == 2 and err.startswith("error: 4 record(s) skipped under --strict")


def test_hf_saved_dataset_with_two_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = synth.make_hf_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    argv = ["--dataset", "hf", "--hf", layout.files["hf"], "--caption-columns", "caption,de=caption_de",
            "--id-column", "image_id", "--out", out, "--verify"]
    code, printed, _ = _run(capsys, *argv, "--workers", "2")
    assert code == 0 and "verify: ok" in printed, printed
    _check_accounting(printed, layout, out)
    assert _manifest(out, "val")["captions"] == {"de": 4, "en": 2}
    import datasets

    stored = datasets.load_from_disk(str(layout.files["hf"]))["train"].cast_column(
        "image", datasets.Image(decode=False))
    for index, (key, parts, meta) in enumerate(_samples(out, "train")):
        assert meta["image_id"] == f"train-{index}" and set(meta) == IMAGE_SCHEMA
        original = stored[index]["image"]["bytes"]
        if meta["source"].endswith(".png"):  # PNG is re-encoded to JPEG, the JPEGs are stored as they are
            assert parts["jpg"][:2] == b"\xff\xd8"
            with Image.open(io.BytesIO(parts["jpg"])) as image:
                assert image.format == "JPEG" and image.size == (32, 24)
        else:
            assert parts["jpg"] == original
    assert _files(out) == _files(_rerun(argv, tmp_path / "one"))


def _rerun(argv: list, out: Path) -> Path:
    argv = list(argv)
    argv[argv.index("--out") + 1] = out
    assert shards_cli.main([str(a) for a in argv]) == 0
    return out


def test_hf_single_dataset_with_split_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import datasets

    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                  "part": datasets.Value("string")})
    rows = {"img": [{"bytes": synth.tiny_jpeg(n), "path": None} for n in range(4)],
            "text": [synth.caption(n) for n in range(4)], "part": ["train", "train", "validation", "test"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "hf", "--hf", tmp_path / "ds", "--image-column", "img",
                            "--caption-columns", "text", "--split-column", "part", "--out", out, "--verify")
    assert code == 0 and "verify: ok" in printed
    assert "train: 2 inputs = 2 written + 0 skipped" in printed and "val: 1 inputs = 1 written" in printed
    assert [meta["image_id"] for _, _, meta in _samples(out, "train")] == ["data-0", "data-1"]
    assert verify_shards(out) == []


def test_person_dataset_with_translations_keeps_pid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsmoe.demo.people import make_synthetic_pedes

    root = make_synthetic_pedes(tmp_path / "cuhk", num_ids={"train": 2, "test": 1}, images_per_id=2,
                                image_size=(32, 16))
    raw = json.loads((root / "reid_raw.json").read_text())
    entries = [(item["file_path"], [f"译文 {n}"]) for n, item in enumerate(raw)]
    path = synth.write_translations(tmp_path / "zh.json", "json-dict", entries)
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "cuhk-pedes", "--root", root, "--out", out,
                            "--translations", f"zh={path}", "--verify")
    assert code == 0 and "verify: ok" in printed and "0 unmatched" in printed
    manifest = _manifest(out, "train")
    assert manifest["captions"] == {"en": 8, "zh": 4} and manifest["identities"] == 2
    for _, _, meta in _samples(out, "train"):
        assert set(meta) == {"key", "pid", "captions", "source", "split", "dataset"}
        assert meta["captions"]["zh"][0].startswith("译文")


def test_hf_path_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import datasets

    images = tmp_path / "pics"
    for n in range(3):
        (images / "sub").mkdir(parents=True, exist_ok=True)
        (images / "sub" / f"{n}.jpg").write_bytes(synth.tiny_jpeg(n))
    datasets.Dataset.from_dict({"file": [f"sub/{n}.jpg" for n in range(3)] + ["sub/9.jpg"],
                                "caption": [[synth.caption(n)] for n in range(4)]}).save_to_disk(str(tmp_path / "d"))
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "hf", "--hf", tmp_path / "d", "--image-column", "file",
                            "--images", images, "--out", out, "--verify")
    assert code == 0 and "train: 4 inputs = 3 written + 1 skipped" in printed and "image missing" in printed
    assert [p[1]["jpg"] for p in _samples(out, "train")] == [(images / "sub" / f"{n}.jpg").read_bytes()
                                                             for n in range(3)]


def test_hf_loadable_directory_via_load_dataset(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for n in range(3):
        (folder / f"{n}.jpg").write_bytes(synth.tiny_jpeg(n))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.jpg", "caption": synth.caption(n)})
                                                   + "\n" for n in range(3)))
    out = tmp_path / "out"
    code, printed, _ = _run(capsys, "--dataset", "hf", "--hf", tmp_path / "imagefolder", "--out", out, "--verify")
    assert code == 0 and "train: 3 inputs = 3 written + 0 skipped" in printed
    assert sorted(p[1]["jpg"] for p in _samples(out, "train")) == sorted(synth.tiny_jpeg(n) for n in range(3))
    assert (tmp_path / "cache").is_dir()
