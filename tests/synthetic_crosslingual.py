"""Tiny synthetic datasets in the real raw layouts of the cross-lingual benchmarks, with deliberate faults.

For tests of ``tools/make_shards.py`` (and as executable documentation of the layouts): every generator writes
the file names and field names of the public release (see ``dsmoe/shards/layouts/``), a handful of small JPEGs
(or 32x32 videos encoded with PyAV), and, with ``faults=True``, a few defects that the converter must report:
a record whose image (video) file is missing, a record without any non-empty caption, a duplicate record, and
per layout one more (an unreadable image or video, an unknown split, a caption entry for an image that is not in
the dataset). Each generator returns a :class:`SyntheticLayout` that says what the converter should find.

Images are coloured shapes on a coloured background; captions name the shape and colours in English and, with
fixed word lists, in German, French, Czech, Japanese and Chinese, so that a language's captions are
recognisably that language's.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "SyntheticLayout",
    "caption",
    "make_coco",
    "make_hf_dataset",
    "make_jsonl",
    "make_msrvtt",
    "make_multi30k",
    "make_video",
    "tiny_jpeg",
    "write_translations",
]

COLOURS = {"red": (210, 30, 30), "blue": (30, 70, 210), "green": (30, 150, 50), "yellow": (240, 210, 30),
           "black": (20, 20, 20), "white": (240, 240, 240)}
SHAPES = ("square", "circle", "triangle")
WORDS = {
    "en": {"red": "red", "blue": "blue", "green": "green", "yellow": "yellow", "black": "black", "white": "white",
           "square": "square", "circle": "circle", "triangle": "triangle", "on": "on a", "bg": "background",
           "a": "a"},
    "de": {"red": "rotes", "blue": "blaues", "green": "grünes", "yellow": "gelbes", "black": "schwarzes",
           "white": "weißes", "square": "Quadrat", "circle": "Kreis", "triangle": "Dreieck", "on": "auf",
           "bg": "Hintergrund", "a": "ein"},
    "fr": {"red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune", "black": "noir", "white": "blanc",
           "square": "carré", "circle": "cercle", "triangle": "triangle", "on": "sur un fond", "bg": "", "a": "un"},
    "cs": {"red": "červený", "blue": "modrý", "green": "zelený", "yellow": "žlutý", "black": "černý",
           "white": "bílý", "square": "čtverec", "circle": "kruh", "triangle": "trojúhelník", "on": "na",
           "bg": "pozadí", "a": ""},
    "ja": {"red": "赤い", "blue": "青い", "green": "緑の", "yellow": "黄色い", "black": "黒い", "white": "白い",
           "square": "四角", "circle": "円", "triangle": "三角", "on": "背景に", "bg": "", "a": ""},
    "zh": {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "black": "黑色", "white": "白色",
           "square": "方块", "circle": "圆", "triangle": "三角形", "on": "在背景上", "bg": "", "a": "一个"},
}


@dataclass
class SyntheticLayout:
    """A generated dataset and what converting it should give."""

    root: Path
    inputs: dict[str, int] = field(default_factory=dict)  # records per split (faulty ones included)
    written: dict[str, int] = field(default_factory=dict)  # samples per split
    reasons: dict[str, list[str]] = field(default_factory=dict)  # skip-reason prefixes per split
    files: dict[str, Path] = field(default_factory=dict)  # named paths the tests need
    unmatched: int = 0  # caption entries that match no sample
    expected: dict[str, Any] = field(default_factory=dict)  # layout-specific expectations


def _attributes(seed: int) -> tuple[str, str, str]:
    rng = random.Random(f"dsmoe-xl-{seed}")
    fg, bg = rng.sample(list(COLOURS), 2)
    return fg, rng.choice(SHAPES), bg


def caption(seed: int, lang: str = "en", variant: int = 0) -> str:
    """A caption of image ``seed`` in ``lang`` (``variant`` changes the wording, not the content)."""
    fg, shape, bg = _attributes(seed)
    w = WORDS[lang]
    text = " ".join(p for p in (w["a"], w[fg], w[shape], w["on"], w[bg], w["bg"]) if p)
    return text if variant == 0 else f"{text} ({variant})"


def tiny_jpeg(seed: int, size: tuple[int, int] = (24, 32), fmt: str = "JPEG") -> bytes:
    """A small picture of image ``seed`` (``size`` = (H, W)) encoded as ``fmt``."""
    height, width = size
    fg, shape, bg = _attributes(seed)
    image = Image.new("RGB", (width, height), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    box = [width * 0.2, height * 0.2, width * 0.8, height * 0.8]
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    else:
        draw.polygon([(width / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLOURS[fg])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _lines(path: Path, lines: Sequence[str], gz: bool) -> Path:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        return _write(path.with_name(path.name + ".gz"), gzip.compress(text, mtime=0))
    return _write(path, text)


# ---------------------------------------------------------------------------------------------------- Multi30K


def make_multi30k(root: Path, *, task: int = 1, per_split: Sequence[int] = (4, 2, 2), faults: bool = True,
                  gz: bool = True) -> SyntheticLayout:
    """``root/data/task{task}/...`` plus ``root/flickr30k-images``; task 1 in en/de/fr/cs, task 2 in en/de.

    Faults (in train): an image listed but absent, a duplicate listing; (in val): an image whose captions are
    blank in every language.
    """
    root = Path(root)
    langs = ("en", "de", "fr", "cs") if task == 1 else ("en", "de")
    splits = ("train", "val", "test_2016_flickr") if task == 1 else ("train", "val", "test_2016")
    out = SyntheticLayout(root=root)
    task_dir = root / "data" / f"task{task}"
    seed = 1000
    for split, count, out_split in zip(splits, per_split, ("train", "val", "test"), strict=True):
        entries: list[tuple[str, int, bool]] = []  # (file name, seed, captions blank)
        for _ in range(count):
            seed += 1
            name = f"{seed * 7919 % 10_000_000}.jpg"
            _write(root / "flickr30k-images" / name, tiny_jpeg(seed))
            entries.append((name, seed, False))
        reasons: list[str] = []
        if faults and out_split == "train":
            entries.insert(1, ("999999999.jpg", 1, False))  # listed, no file
            entries.append(entries[0])  # the same image listed twice
            reasons += ["image missing", "duplicate"]
        if faults and out_split == "val":
            seed += 1
            name = f"{seed * 7919 % 10_000_000}.jpg"
            _write(root / "flickr30k-images" / name, tiny_jpeg(seed))
            entries.append((name, seed, True))
            reasons.append("no non-empty caption")
        list_name = f"{split}.txt" if task == 1 else f"{split}_images.txt"
        _write(task_dir / "image_splits" / list_name, "".join(name + "\n" for name, _, _ in entries))
        for lang in langs:
            if task == 1:
                _lines(task_dir / "raw" / f"{split}.{lang}",
                       ["" if blank else caption(s, lang) for _, s, blank in entries], gz)
            else:
                for i in range(1, 6):
                    _lines(task_dir / "raw" / f"{split}.{i}.{lang}",
                           ["" if blank else caption(s, lang, i) for _, s, blank in entries], gz)
        out.inputs[out_split] = len(entries)
        out.written[out_split] = len(entries) - len(reasons)
        out.reasons[out_split] = reasons
    out.files["images"] = root / "flickr30k-images"
    return out


# -------------------------------------------------------------------------------------------------------- COCO


def make_coco(root: Path, *, faults: bool = True) -> SyntheticLayout:
    """``dataset_coco.json`` + ``train2014/``, ``val2014/``; STAIR files under ``root/STAIR-captions``; COCO-CN under
    ``root/coco-cn-version1805v1.1``.

    Karpathy splits: 3 train, 2 restval, 2 val, 2 test images. Faults: a missing image (train), an image with
    only blank sentences (val), the same cocoid listed twice (test), a STAIR caption and a COCO-CN caption for
    images that are not in the dataset.
    """
    root = Path(root)
    out = SyntheticLayout(root=root)
    plan = [("train", 3), ("restval", 2), ("val", 2), ("test", 2)]
    images: list[dict[str, Any]] = []
    cocoid = 100
    for split, count in plan:
        for _ in range(count):
            cocoid += 7
            folder = "val2014" if split in ("val", "test", "restval") else "train2014"
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            _write(root / folder / filename, tiny_jpeg(cocoid))
            images.append({"filepath": folder, "sentids": [], "filename": filename, "imgid": len(images),
                           "split": split, "cocoid": cocoid,
                           "sentences": [{"tokens": caption(cocoid, "en", k).split(), "raw": caption(cocoid, "en", k),
                                          "imgid": len(images), "sentid": cocoid * 10 + k} for k in range(5)]})
    inputs = {"train": 5, "val": 2, "test": 2}
    reasons: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    if faults:
        images.insert(1, {**images[0], "filename": "COCO_train2014_000000999999.jpg", "cocoid": 999999})
        reasons["train"].append("image missing")
        blank_id = cocoid + 7
        _write(root / "val2014" / f"COCO_val2014_{blank_id:012d}.jpg", tiny_jpeg(blank_id))
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{blank_id:012d}.jpg", "split": "val",
                       "cocoid": blank_id, "sentences": [{"raw": " ", "tokens": []}], "imgid": -1, "sentids": []})
        reasons["val"].append("no non-empty caption")
        test_first = next(item for item in images if item["split"] == "test")
        images.append(dict(test_first))
        reasons["test"].append("duplicate")
        inputs = {"train": 6, "val": 3, "test": 3}
    _write(root / "dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))
    out.inputs = inputs
    out.written = {split: inputs[split] - len(reasons[split]) for split in inputs}
    out.reasons = reasons
    # Images that exist and have English captions, once each (caption files only describe those).
    known = list({item["cocoid"]: item for item in images
                  if item["cocoid"] != 999999 and item["sentences"][0]["raw"].strip()}.values())

    # STAIR Captions: COCO caption format, train and val files (by the COCO 2014 folder).
    for part, folder in (("train", "train2014"), ("val", "val2014")):
        members = [item for item in known if item["filepath"] == folder]
        anns = [{"id": item["cocoid"] * 10 + k, "image_id": item["cocoid"], "caption": caption(item["cocoid"], "ja", k)}
                for item in members for k in range(2)]
        if faults and part == "val":
            anns.append({"id": 1, "image_id": 555555, "caption": "存在しない画像"})
            out.unmatched += 1
        coco = {"info": {"description": "synthetic STAIR"}, "licenses": [],
                "images": [{"id": item["cocoid"], "file_name": item["filename"]} for item in members],
                "annotations": anns}
        out.files[f"stair_{part}"] = _write(root / "STAIR-captions" / f"stair_captions_v1.2_{part}.json",
                                            json.dumps(coco, ensure_ascii=False))
    # COCO-CN: its own split over (some of) the same images; human-written and manually-translated captions.
    cn_dir = root / "coco-cn-version1805v1.1"
    cn_ids = [f"COCO_{item['filepath']}_{item['cocoid']:012d}" for item in known]
    cn_split = {"train": cn_ids[:5], "val": cn_ids[5:6], "test": cn_ids[6:8]}
    for split, ids in cn_split.items():
        _write(cn_dir / f"coco-cn_{split}.txt", "".join(i + "\n" for i in ids))
    human = [f"{i}#{k}\t{caption(int(i.rsplit('_', 1)[1]), 'zh', k)}" for i in cn_ids[:8] for k in range(1 + (i[-1] in "02468"))]
    if faults:
        human.append("COCO_train2014_000000777777#0\t不存在的图片")
        out.unmatched += 1
    _write(cn_dir / "imageid.human-written-caption.txt", "".join(line + "\n" for line in human))
    translated = [f"{i}#0\t{caption(int(i.rsplit('_', 1)[1]), 'zh', 9)}" for i in cn_split["test"]]
    _write(cn_dir / "imageid.manually-translated-caption.txt", "".join(line + "\n" for line in translated))
    out.files.update(stair=root / "STAIR-captions", coco_cn=cn_dir)
    out.expected["coco_cn_split"] = {split: len(ids) for split, ids in cn_split.items()}
    out.expected["stair_captions"] = 2 * len(known)
    return out


# ------------------------------------------------------------------------------------------------------ MSR-VTT


def make_video(path: Path, seed: int, *, frames: int = 16, size: int = 32, codec: str = "mpeg4") -> Path:
    """A short synthetic video (a bar moving over a coloured background) encoded with PyAV."""
    import av
    import numpy as np

    fg, _, bg = _attributes(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.empty((size, size, 3), dtype=np.uint8)
            array[:] = COLOURS[bg]
            left = (i * size) // frames
            array[:, left:left + max(2, size // 6)] = COLOURS[fg]
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_msrvtt(root: Path, *, faults: bool = True) -> SyntheticLayout:
    """``MSRVTT_data.json``, ``videos/all/video*.mp4``, ``MSRVTT_JSFUSION_test.csv``, ``MSRVTT_train.9k.csv`` and an
    MSR-VTT-CN style Chinese caption file ``msrvtt10kcn_zh.caption.txt``.

    Videos: video0, video1 (train), video2 (validate), video3 (test) decodable. Faults: video4 (test) is a corrupt
    file, video5 (train) has no file, video6 (train) has only blank captions, and the Chinese file has a line
    for a video that does not exist.
    """
    root = Path(root)
    out = SyntheticLayout(root=root)
    plan = [("video0", "train"), ("video1", "train"), ("video2", "validate"), ("video3", "test")]
    if faults:
        plan += [("video4", "test"), ("video5", "train"), ("video6", "train")]
    for number, (video_id, _) in enumerate(plan):
        if video_id == "video4":
            _write(root / "videos" / "all" / f"{video_id}.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
        elif video_id != "video5":
            make_video(root / "videos" / "all" / f"{video_id}.mp4", 500 + number, codec="mpeg4" if number % 2 else
                       "libx264" if _has_encoder("libx264") else "mpeg4")
    videos = [{"category": 0, "url": f"https://example.invalid/{v}", "video_id": v, "start time": 0.0,
               "end time": 2.0, "split": split, "id": number} for number, (v, split) in enumerate(plan)]
    sentences = []
    for number, (video_id, _) in enumerate(plan):
        for k in range(3):
            text = "  " if video_id == "video6" else caption(500 + number, "en", k)
            sentences.append({"caption": text, "video_id": video_id, "sen_id": len(sentences)})
    _write(root / "MSRVTT_data.json", json.dumps({"info": {"year": 2016}, "videos": videos, "sentences": sentences}))
    # The 1k-A lists: the test videos (one sentence each) and the training videos.
    test_ids = [v for v, split in plan if split == "test"]
    with open(_write(root / "MSRVTT_JSFUSION_test.csv", ""), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["", "key", "vid_key", "video_id", "sentence"])
        for index, video_id in enumerate(test_ids):
            writer.writerow([index, f"ret{index}", f"msr{video_id[5:]}", video_id,
                             f"the test query of {video_id}"])
    with open(_write(root / "MSRVTT_train.9k.csv", ""), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id"])
        for video_id, split in plan:
            if split != "test":
                writer.writerow([video_id])
    zh = [f"{v}#zh#{k} {caption(500 + n, 'zh', k)}" for n, (v, _) in enumerate(plan) for k in range(2)
          if v != "video6"]
    if faults:
        zh.append("video9999#zh#0 不存在的视频")
        out.unmatched = 1
    out.files["zh"] = _write(root / "msrvtt10kcn_zh.caption.txt", "".join(line + "\n" for line in zh))
    out.files["test_list"] = root / "MSRVTT_JSFUSION_test.csv"
    out.files["train_list"] = root / "MSRVTT_train.9k.csv"
    splits = {"train": "train", "validate": "val", "test": "test"}
    for video_id, split in plan:
        out.inputs[splits[split]] = out.inputs.get(splits[split], 0) + 1
    out.written = {"train": 2, "val": 1, "test": 1}
    out.reasons = {"train": ["video missing", "no non-empty caption"] if faults else [], "val": [],
                   "test": ["video unreadable"] if faults else []}
    return out


def _has_encoder(name: str) -> bool:
    import av

    return name in av.codecs_available


# ------------------------------------------------------------------------------------------ JSONL and datasets


def make_jsonl(root: Path, *, faults: bool = True) -> SyntheticLayout:
    """``root/annotations.jsonl`` with images under ``root/images``; captions as a string, a list and a
    per-language object. Faults: a missing image, blank captions, a repeated id, an unknown split ``dev``."""
    root = Path(root)
    out = SyntheticLayout(root=root)
    rows: list[dict[str, Any]] = []
    for n in range(6):
        seed = 3000 + n
        name = f"images/{'a' if n % 2 else 'b'}/img_{n}.jpg"
        _write(root / name, tiny_jpeg(seed))
        split = ("train", "train", "train", "val", "test", "test")[n]
        value: Any = (caption(seed) if n == 0 else [caption(seed), caption(seed, "en", 1)] if n < 3
                      else {"en": [caption(seed)], "de": caption(seed, "de")})
        rows.append({"image": name, "captions": value, "id": f"img{n}", "split": split})
    rows[5].pop("split")  # no split: goes to the default split (train)
    out.inputs = {"train": 4, "val": 1, "test": 1}
    out.reasons = {"train": [], "val": [], "test": []}
    if faults:
        rows.insert(2, {"image": "images/missing.jpg", "captions": ["a missing picture"], "id": "gone",
                        "split": "train"})
        rows.append({"image": "images/b/img_0.jpg", "captions": {"en": ["  "], "de": [""]}, "id": "blank",
                     "split": "val"})
        rows.append({"image": "images/a/img_1.jpg", "captions": "again", "id": "img1", "split": "train"})
        rows.append({"image": "images/a/img_1.jpg", "captions": "held out", "id": "dev1", "split": "dev"})
        out.inputs = {"train": 6, "val": 2, "test": 1, "dev": 1}
        out.reasons = {"train": ["image missing", "duplicate"], "val": ["no non-empty caption"], "test": [],
                       "dev": ["unknown split"]}
    out.written = {split: out.inputs[split] - len(out.reasons[split]) for split in out.inputs}
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines.insert(3, "")  # blank lines are ignored
    out.files["annotations"] = _write(root / "annotations.jsonl", "\n".join(lines) + "\n")
    return out


def make_hf_dataset(root: Path, *, faults: bool = True) -> SyntheticLayout:
    """A DatasetDict (train/validation/test) saved with ``save_to_disk`` under ``root/hf``: an ``Image`` column
    (JPEG and one PNG), ``caption`` (English string), ``caption_de`` (German list) and ``image_id``. Faults: an
    undecodable image, blank captions, a repeated id."""
    import datasets

    root = Path(root)
    out = SyntheticLayout(root=root)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "caption_de": datasets.Sequence(datasets.Value("string")),
                                  "image_id": datasets.Value("string")})
    parts: dict[str, dict[str, list[Any]]] = {}
    reasons: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        columns: dict[str, list[Any]] = {"image": [], "caption": [], "caption_de": [], "image_id": []}
        for n in range(count):
            seed = 4000 + len(parts) * 10 + n
            fmt = "PNG" if (split, n) == ("train", 1) else "JPEG"
            columns["image"].append({"bytes": tiny_jpeg(seed, fmt=fmt), "path": f"{split}_{n}.{fmt.lower()}"})
            columns["caption"].append(caption(seed))
            columns["caption_de"].append([caption(seed, "de"), caption(seed, "de", 1)])
            columns["image_id"].append(f"{split}-{n}")
        parts[split] = columns
    if faults:
        train = parts["train"]
        train["image"].append({"bytes": b"\xff\xd8 not a jpeg at all", "path": "broken.jpg"})
        train["caption"].append("a broken picture")
        train["caption_de"].append(["ein kaputtes Bild"])
        train["image_id"].append("broken")
        train["image"].append(dict(train["image"][0]))
        train["caption"].append("the first picture again")
        train["caption_de"].append([])
        train["image_id"].append("train-0")
        val = parts["validation"]
        val["image"].append({"bytes": tiny_jpeg(4999), "path": "blank.jpg"})
        val["caption"].append(" ")
        val["caption_de"].append([""])
        val["image_id"].append("blank")
        reasons = {"train": ["image unreadable", "duplicate"], "val": ["no non-empty caption"], "test": []}
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_dict(columns, features=features)
                                    for split, columns in parts.items()})
    path = root / "hf"
    dataset.save_to_disk(str(path))
    out.files["hf"] = path
    out.inputs = {"train": len(parts["train"]["image"]), "val": len(parts["validation"]["image"]),
                  "test": len(parts["test"]["image"])}
    out.reasons = reasons
    out.written = {split: out.inputs[split] - len(reasons[split]) for split in out.inputs}
    return out


# ------------------------------------------------------------------------------------------------ translations


def write_translations(path: Path, fmt: str, entries: Sequence[tuple[str, list[str]]],
                       image_ids: Sequence[str] | None = None) -> Path:
    """Write ``(image reference, captions)`` entries in one of the formats in circulation.

    ``json-dict`` (MLA/DASD ``{image: [captions]}``), ``cap-id-lines`` (NRCCR ``<id>#enc#<n> caption``; the
    reference's extension is dropped, as in NRCCR's files) or ``json-records`` (CCLM ``[{image, caption,
    image_id}]``, one record per caption).
    """
    if fmt == "json-dict":
        return _write(path, json.dumps({ref: caps for ref, caps in entries}, ensure_ascii=False, indent=1))
    if fmt == "cap-id-lines":
        lines = [f"{ref.rsplit('/', 1)[-1].rsplit('.', 1)[0]}#enc#{k} {text}" for ref, caps in entries
                 for k, text in enumerate(caps)]
        return _write(path, "".join(line + "\n" for line in lines))
    if fmt == "json-records":
        records = [{"image": ref, "caption": text, "image_id": (image_ids[i] if image_ids else ref)}
                   for i, (ref, caps) in enumerate(entries) for text in caps]
        return _write(path, json.dumps(records, ensure_ascii=False))
    raise ValueError(f"unknown translation format {fmt!r}")
