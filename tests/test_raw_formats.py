"""Tests of the raw-layout readers and of the synthetic dataset generators."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.records import RawFormatError, RawRecord
from dsmoe.demo.people import (
    COLOURS,
    make_identities,
    make_synthetic_icfg,
    make_synthetic_pedes,
    make_synthetic_rstpreid,
)

TINY = {"train": 6, "val": 2, "test": 2}
SIZE = (48, 24)


def _pedes(root: Path, **kwargs) -> Path:
    return make_synthetic_pedes(root, num_ids=TINY, image_size=SIZE, **kwargs)


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- readers


def test_cuhk_layout_is_read_in_annotation_order(tmp_path: Path) -> None:
    root = _pedes(tmp_path / "cuhk")
    raw = json.loads((root / "reid_raw.json").read_text())
    records = read_person_layout("cuhk-pedes", root)
    assert len(records) == sum(TINY.values()) * 3
    assert [r.source for r in records] == [item["file_path"] for item in raw]
    assert [r.split for r in records] == [item["split"] for item in raw]
    first = records[0]
    assert isinstance(first, RawRecord)
    assert first.source == "synth/0001_01.jpg"
    assert first.image_path.is_absolute()
    assert first.image_path == (root / "imgs" / "synth" / "0001_01.jpg").absolute()
    assert first.image_path.is_file()
    assert first.captions == raw[0]["captions"] and len(first.captions) == 2
    assert first.pid == 1
    assert {r.split for r in records} == {"train", "val", "test"}


@pytest.mark.parametrize("name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_layout_accepts_both_file_names(tmp_path: Path, name: str) -> None:
    root = make_synthetic_icfg(tmp_path / "icfg", num_ids={"train": 4, "test": 2}, image_size=SIZE)
    if name != "ICFG-PEDES.json":
        (root / "ICFG-PEDES.json").rename(root / name)
    records = read_person_layout("icfg-pedes", root)
    assert len(records) == 6 * 3
    assert {r.split for r in records} == {"train", "test"}
    assert all(len(r.captions) == 1 for r in records)
    assert all(r.image_path.is_file() for r in records)


def test_rstpreid_layout_uses_img_path(tmp_path: Path) -> None:
    root = make_synthetic_rstpreid(tmp_path / "rstp", num_ids=TINY, image_size=SIZE)
    raw = json.loads((root / "data_captions.json").read_text())
    assert set(raw[0]) == {"id", "img_path", "captions", "split"}
    records = read_person_layout("rstpreid", root)
    assert [r.source for r in records] == [item["img_path"] for item in raw]
    assert all(len(r.captions) == 2 for r in records)
    assert all(r.image_path == (root / "imgs" / r.source).absolute() for r in records)


def test_record_faults_are_passed_through_not_dropped(tmp_path: Path) -> None:
    root = _pedes(tmp_path / "faulty", faults=True)
    records = read_person_layout("cuhk-pedes", root)
    assert len(records) == sum(TINY.values()) * 3 + 3
    assert sum(not r.image_path.exists() for r in records) == 1
    assert sum(r.captions == [""] for r in records) == 1
    sources = [(r.split, r.source) for r in records]
    assert len(sources) - len(set(sources)) == 1


def test_missing_annotation_names_the_files_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RawFormatError, match=r"ICFG-PEDES\.json or ICFG_PEDES\.json"):
        read_person_layout("icfg-pedes", tmp_path / "empty")
    with pytest.raises(RawFormatError, match="does not exist"):
        read_person_layout("cuhk-pedes", tmp_path / "nowhere")


def test_missing_annotation_points_at_another_datasets_file(tmp_path: Path) -> None:
    root = make_synthetic_rstpreid(tmp_path / "rstp", num_ids={"train": 1, "test": 1}, image_size=SIZE)
    with pytest.raises(RawFormatError, match=r"reid_raw\.json.*data_captions\.json \(rstpreid\)"):
        read_person_layout("cuhk-pedes", root)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "reid_raw.json").write_text('[{"split": "train", ', encoding="utf-8")
    with pytest.raises(RawFormatError, match=r"reid_raw\.json: malformed JSON at line 1"):
        read_person_layout("cuhk-pedes", tmp_path)


def test_another_datasets_records_give_expected_and_found_keys(tmp_path: Path) -> None:
    _dump(tmp_path / "reid_raw.json", [{"id": 1, "img_path": "a.jpg", "captions": ["x"], "split": "train"}])
    with pytest.raises(RawFormatError) as info:
        read_person_layout("cuhk-pedes", tmp_path)
    message = str(info.value)
    assert "reid_raw.json" in message and "record 0" in message
    assert "expected keys ['captions', 'file_path', 'id', 'split']" in message
    assert "found ['captions', 'id', 'img_path', 'split']" in message
    assert "rstpreid" in message


def test_record_missing_a_key_gives_its_index(tmp_path: Path) -> None:
    good = {"split": "train", "captions": ["a man"], "file_path": "a.jpg", "processed_tokens": [], "id": 1}
    bad = {key: value for key, value in good.items() if key != "id"}
    _dump(tmp_path / "reid_raw.json", [good, good, bad])
    with pytest.raises(RawFormatError, match=r"record 2 lacks key\(s\) \['id'\]"):
        read_person_layout("cuhk-pedes", tmp_path)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"captions": "a man"}, r"record 0: 'captions' must be a list of strings"),
        ({"id": "7"}, r"record 0: 'id' must be an integer"),
        ({"split": 1}, r"record 0: 'split' must be a string"),
        ({"file_path": "/etc/passwd"}, r"record 0: 'file_path' must be a path relative"),
        ({"file_path": "../x.jpg"}, r"record 0: 'file_path' must be a path relative"),
    ],
)
def test_wrongly_typed_fields_are_rejected(tmp_path: Path, change: dict, pattern: str) -> None:
    record = {"split": "train", "captions": ["a man"], "file_path": "a.jpg", "processed_tokens": [], "id": 1}
    _dump(tmp_path / "reid_raw.json", [{**record, **change}])
    with pytest.raises(RawFormatError, match=pattern):
        read_person_layout("cuhk-pedes", tmp_path)


def test_top_level_must_be_a_non_empty_list(tmp_path: Path) -> None:
    _dump(tmp_path / "data_captions.json", {"annotations": []})
    with pytest.raises(RawFormatError, match="expected a JSON list of rstpreid records"):
        read_person_layout("rstpreid", tmp_path)
    _dump(tmp_path / "data_captions.json", [])
    with pytest.raises(RawFormatError, match="no records"):
        read_person_layout("rstpreid", tmp_path)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(RawFormatError, match="unknown dataset 'market1501'"):
        read_person_layout("market1501", tmp_path)
    assert issubclass(RawFormatError, ValueError)


# ------------------------------------------------------------------------------------------------ generators


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_pedes_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _tree_bytes(_pedes(tmp_path / "a", seed=3))
    b = _tree_bytes(_pedes(tmp_path / "b", seed=3))
    c = _tree_bytes(_pedes(tmp_path / "c", seed=4))
    assert a == b
    assert a["reid_raw.json"] != c["reid_raw.json"]
    assert a["imgs/synth/0001_01.jpg"] != c["imgs/synth/0001_01.jpg"]


def test_synthetic_pedes_is_cached_by_its_arguments(tmp_path: Path) -> None:
    root = _pedes(tmp_path / "d")
    annotation = root / "reid_raw.json"
    before = annotation.stat().st_mtime_ns
    annotation_inode = annotation.stat().st_ino
    assert _pedes(tmp_path / "d") == root
    assert annotation.stat().st_ino == annotation_inode and annotation.stat().st_mtime_ns == before
    _pedes(tmp_path / "d", faults=True)  # other arguments: rebuilt
    assert annotation.stat().st_ino != annotation_inode
    assert len(json.loads(annotation.read_text())) == sum(TINY.values()) * 3 + 3


def test_synthetic_generation_says_how_far_it_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_synthetic_icfg(tmp_path / "d", num_ids={"train": 4, "test": 2}, images_per_id=2, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("generating a synthetic icfg-pedes dataset in " + str(tmp_path / "d") + ": 12 images")
    assert re.search(r": done, 12 images in \d+ s$", lines[-1])
    make_synthetic_icfg(tmp_path / "d", num_ids={"train": 4, "test": 2}, images_per_id=2, progress=True)
    assert capsys.readouterr().out == "", "a cached dataset is not generated again"


def test_synthetic_pedes_has_exactly_the_cuhk_keys(tmp_path: Path) -> None:
    root = _pedes(tmp_path / "e")
    raw = json.loads((root / "reid_raw.json").read_text())
    assert all(set(item) == {"split", "captions", "file_path", "processed_tokens", "id"} for item in raw)
    assert all(re.fullmatch(r"synth/\d{4}_\d{2}\.jpg", item["file_path"]) for item in raw)
    ids_by_split = {split: {item["id"] for item in raw if item["split"] == split} for split in TINY}
    assert sorted(set().union(*ids_by_split.values())) == list(range(1, sum(TINY.values()) + 1))
    assert all(len(ids_by_split[split]) == count for split, count in TINY.items())
    for item in raw:
        words = re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", item["captions"][0].lower())
        assert item["processed_tokens"] == words
    with Image.open(root / "imgs" / raw[0]["file_path"]) as image:
        assert image.format == "JPEG" and image.size == (SIZE[1], SIZE[0]) and image.mode == "RGB"


def test_synthetic_identities_are_distinct_and_captions_name_them(tmp_path: Path) -> None:
    identities = make_identities(144, seed=0)
    for a, b in combinations(identities, 2):
        assert sum(x != y for x, y in zip(a.visual_key(), b.visual_key(), strict=True)) >= 2
    root = _pedes(tmp_path / "f")
    raw = json.loads((root / "reid_raw.json").read_text())
    by_pid = {identity.pid: identity for identity in make_identities(sum(TINY.values()), seed=0)}
    for pid, identity in by_pid.items():
        captions = [c for item in raw if item["id"] == pid for c in item["captions"]]
        assert len(set(captions)) == len(captions) == 6  # 3 images x 2 captions, all different
        for caption in captions:
            text = caption.lower()
            assert identity.upper_colour in text and identity.lower_colour in text
            assert identity.head_colour in text
            if identity.bag != "none":
                assert identity.bag_colour in text
    assert len(COLOURS) == 8


def test_synthetic_images_of_one_identity_vary(tmp_path: Path) -> None:
    root = _pedes(tmp_path / "g")
    files = [root / "imgs" / "synth" / f"0001_{k:02d}.jpg" for k in (1, 2, 3)]
    pixels = [Image.open(f).convert("RGB").tobytes() for f in files]
    assert len(set(pixels)) == 3


def test_synthetic_icfg_and_rstpreid_fault_injection(tmp_path: Path) -> None:
    icfg = make_synthetic_icfg(tmp_path / "icfg", num_ids={"train": 2, "test": 2}, image_size=SIZE, faults=True)
    raw = json.loads((icfg / "ICFG-PEDES.json").read_text())
    assert {item["split"] for item in raw} == {"train", "test"}
    assert len(raw) == 4 * 3 + 3
    assert sum(item["captions"] == [""] for item in raw) == 1
    rstp = make_synthetic_rstpreid(tmp_path / "rstp", num_ids=TINY, image_size=SIZE, faults=True)
    raw = json.loads((rstp / "data_captions.json").read_text())
    assert sum(not any(c.strip() for c in item["captions"]) for item in raw) == 1
    assert sum(not (rstp / "imgs" / item["img_path"]).exists() for item in raw) == 1
    with pytest.raises(ValueError, match="unknown split"):
        make_synthetic_icfg(tmp_path / "bad", num_ids={"train": 2, "val": 1})
