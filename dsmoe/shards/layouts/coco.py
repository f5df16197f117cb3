"""MSCOCO with Karpathy's split, Japanese STAIR Captions and Chinese COCO-CN.

* Karpathy split: ``dataset_coco.json`` (from ``caption_datasets.zip``), an object
  ``{"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
  "split": "train|restval|val|test", "sentences": [{"raw": ..., "tokens": [...]}], "cocoid": 391895, ...}]}``.
  Looked for as ``--annotations``, else ``root/dataset_coco.json``, ``root/caption_datasets/dataset_coco.json`` or
  ``root/annotations/dataset_coco.json``. Images are ``<images>/<filepath>/<filename>`` (``--images``, default
  ``root``). ``restval`` is merged into ``train`` (the usual 113,287-image training set); ``val`` and ``test``
  keep 5,000 images each. The image id is the COCO id (``cocoid``); English captions are ``sentences[].raw``.
* STAIR Captions (``--stair``: the files or their directory): ``stair_captions_v1.2_train.json`` and
  ``stair_captions_v1.2_val.json`` (v1.1 names accepted; ``*_tokenized.json`` ignored), COCO caption format
  ``{"images": [...], "annotations": [{"image_id", "caption", ...}]}``; merged as ``ja`` by COCO id.
* COCO-CN (``--coco-cn``: the ``coco-cn-version1805v1.1`` directory or its parent): ``coco-cn_train.txt``,
  ``coco-cn_val.txt``, ``coco-cn_test.txt`` (one image id per line, ``COCO_train2014_000000296735``) and the
  caption files ``imageid.human-written-caption.txt`` (merged as ``zh``) and
  ``imageid.manually-translated-caption.txt`` (merged as ``zh_translated``; present for the test images), lines
  ``<image_id>#<n><TAB><sentence>``. With ``split_source="coco-cn"`` the samples are the COCO-CN images with
  COCO-CN's own train/val/test split (the protocol of COCO-CN retrieval) instead of Karpathy's split.

Assumptions: COCO-CN ids end with the zero-padded COCO id after the last ``_``; an id not in dataset_coco.json
(none is expected) gets the image ``<images>/<train2014|val2014>/<id>.jpg`` and no English caption.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from dsmoe.shards.layouts.base import (LayoutResult, describe_json, find_dir, load_json, other_files_hint, read_lines,
                                       relative_source)
from dsmoe.shards.layouts.captions import CaptionFile, merge_caption_files, parse_caption_file
from dsmoe.shards.records import RawFormatError, RawRecord

__all__ = ["read_coco"]

ANNOTATION_NAMES = ("dataset_coco.json", "caption_datasets/dataset_coco.json", "annotations/dataset_coco.json")
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
COCO_CN_DIR = "coco-cn-version1805v1.1"
COCO_CN_LISTS = {"train": "coco-cn_train.txt", "val": "coco-cn_val.txt", "test": "coco-cn_test.txt"}
COCO_CN_CAPTIONS = {"zh": "imageid.human-written-caption.txt", "zh_translated": "imageid.manually-translated-caption.txt"}


def _karpathy_path(root: Path, annotations: Path | None) -> Path:
    if annotations is not None:
        return Path(annotations).expanduser().absolute()
    for name in ANNOTATION_NAMES:
        if (root / name).is_file():
            return root / name
    raise RawFormatError(f"no Karpathy-split annotation in {str(root)!r}: looked for {' or '.join(ANNOTATION_NAMES)}"
                         + other_files_hint(root, exclude="coco"))


def _image(path: Path, index: int, item: Any) -> tuple[str, str, str, list[str]]:
    """(split, source, cocoid, captions) of one dataset_coco.json image, validated."""
    if not isinstance(item, dict):
        raise RawFormatError(f"{path}: images[{index}] is a JSON {type(item).__name__}, expected an object")
    missing = [k for k in ("filepath", "filename", "split", "sentences", "cocoid") if k not in item]
    if missing:
        raise RawFormatError(f"{path}: images[{index}] lacks {missing} (expected the Karpathy COCO fields filepath, "
                             f"filename, split, sentences, cocoid; found {sorted(item)[:10]})")
    split, sentences, cocoid = item["split"], item["sentences"], item["cocoid"]
    if not isinstance(split, str):
        raise RawFormatError(f"{path}: images[{index}]: 'split' must be a string, found {split!r}")
    if isinstance(cocoid, bool) or not isinstance(cocoid, (int, str)):
        raise RawFormatError(f"{path}: images[{index}]: 'cocoid' must be an integer, found {cocoid!r}")
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                  for s in sentences):
        raise RawFormatError(f"{path}: images[{index}]: 'sentences' must be a list of objects with a 'raw' string")
    source = relative_source(path, f"images[{index}]", f"{item['filepath']}/{item['filename']}")
    return split, source, str(cocoid), [s["raw"] for s in sentences]


def _stair_files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        given = Path(given).expanduser().absolute()
        if given.is_dir():
            matches = sorted(p for p in given.glob("stair_captions_v1.*_*.json") if "tokenized" not in p.name)
            if not matches:
                raise RawFormatError(f"{given}: no stair_captions_v1.2_train.json / stair_captions_v1.2_val.json")
            found += matches
        elif given.is_file():
            found.append(given)
        else:
            raise RawFormatError(f"{given}: no such STAIR Captions file or directory (--stair)")
    return found


def _coco_cn_dir(given: Path) -> Path:
    given = Path(given).expanduser().absolute()
    for candidate in (given, given / COCO_CN_DIR):
        if (candidate / COCO_CN_LISTS["train"]).is_file():
            return candidate
    raise RawFormatError(f"{given}: not a COCO-CN directory: expected {COCO_CN_LISTS['train']} (in it or in "
                         f"{COCO_CN_DIR}/)")


def _cocoid_of(cn_id: str) -> str:
    tail = cn_id.rsplit("_", 1)[-1]
    return str(int(tail)) if tail.isdigit() else cn_id


def read_coco(root: Path, *, annotations: Path | None = None, images_dir: Path | None = None,
              stair: list[Path] | None = None, coco_cn: Path | None = None,
              split_source: str = "karpathy") -> LayoutResult:
    """Read MSCOCO (Karpathy split) plus optional STAIR (ja) and COCO-CN (zh) captions."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise RawFormatError(f"dataset root {str(root)!r} does not exist or is not a directory")
    if split_source not in ("karpathy", "coco-cn"):
        raise RawFormatError(f"--split-source must be karpathy or coco-cn, got {split_source!r}")
    if split_source == "coco-cn" and coco_cn is None:
        raise RawFormatError("--split-source coco-cn needs --coco-cn DIR")
    path = _karpathy_path(root, annotations)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RawFormatError(f"{path}: expected Karpathy's dataset_coco.json, an object with an 'images' list; "
                             f"found {describe_json(data)}")
    if data.get("dataset", "coco") != "coco":
        raise RawFormatError(f"{path}: this is Karpathy's {data.get('dataset')!r} file, expected dataset_coco.json "
                             f"(\"dataset\": \"coco\")")
    if not data["images"]:
        raise RawFormatError(f"{path}: the annotation contains no images")
    images = find_dir(images_dir, root, (".",), "the COCO images (--images)")
    result = LayoutResult(files_read=[str(path)], image_dir=str(images))
    restval = 0
    for index, item in enumerate(data["images"]):
        split, source, cocoid, captions = _image(path, index, item)
        restval += split == "restval"
        result.records.append(RawRecord(split=SPLITS.get(split, split), image_path=images / source, source=source,
                                        captions={"en": captions}, image_id=cocoid))
    if restval:
        result.notes.append(f"{restval} 'restval' images merged into train (Karpathy's 113k training set)")

    caption_files: list[CaptionFile] = []
    for stair_path in _stair_files(list(stair or [])):
        parsed = parse_caption_file(stair_path, "ja", kind="dataset")
        if parsed.format != "coco-annotations":
            raise RawFormatError(f"{stair_path}: expected STAIR Captions in COCO caption format "
                                 f"({{images, annotations[{{image_id, caption}}]}}), found the {parsed.format} format")
        caption_files.append(parsed)
        result.files_read.append(str(stair_path))
    if coco_cn is not None:
        cn_dir = _coco_cn_dir(coco_cn)
        for lang, name in COCO_CN_CAPTIONS.items():
            if (cn_dir / name).is_file():
                parsed = parse_caption_file(cn_dir / name, lang, kind="dataset")
                if parsed.format != "cap-id-lines":
                    raise RawFormatError(f"{cn_dir / name}: expected '<image_id>#<n><TAB><sentence>' lines")
                caption_files.append(parsed)
                result.files_read.append(str(cn_dir / name))
            elif lang == "zh":
                raise RawFormatError(f"{cn_dir / name}: missing (COCO-CN's human-written Chinese captions)")
        if split_source == "coco-cn":
            result.records = _coco_cn_records(cn_dir, result, images)
    result.records, result.caption_reports = merge_caption_files(result.records, caption_files)
    return result


def _coco_cn_records(cn_dir: Path, result: LayoutResult, images: Path) -> list[RawRecord]:
    """The COCO-CN images with COCO-CN's split, English captions taken from the Karpathy records."""
    by_cocoid = {record.image_id: record for record in result.records}
    records: list[RawRecord] = []
    listed: set[str] = set()
    for split, name in COCO_CN_LISTS.items():
        list_path = cn_dir / name
        result.files_read.append(str(list_path))
        for number, line in enumerate(read_lines(list_path, f"the COCO-CN {split} image list"), start=1):
            cn_id = line.strip()
            if not cn_id:
                continue
            if "#" in cn_id or " " in cn_id:
                raise RawFormatError(f"{list_path}: line {number} is {cn_id[:60]!r}, expected one image id "
                                     f"such as COCO_train2014_000000296735")
            cocoid = _cocoid_of(cn_id)
            listed.add(cocoid)
            known = by_cocoid.get(cocoid)
            if known is not None:
                records.append(RawRecord(split=split, image_path=known.image_path, source=known.source,
                                         captions=known.captions, image_id=cocoid))
            else:
                folder = "val2014" if "val2014" in cn_id else "train2014"
                source = f"{folder}/{cn_id}.jpg"
                records.append(RawRecord(split=split, image_path=images / source, source=source, captions={},
                                         image_id=cocoid))
    left_out = sum(1 for cocoid in by_cocoid if cocoid not in listed)
    result.notes.append(f"--split-source coco-cn: {len(records)} COCO-CN images with COCO-CN's split; {left_out} "
                        f"Karpathy images that COCO-CN does not list are not part of this benchmark")
    return records


def read_from_args(args: Namespace) -> LayoutResult:
    return read_coco(args.root, annotations=args.annotations, images_dir=args.images, stair=args.stair,
                     coco_cn=args.coco_cn, split_source=args.split_source or "karpathy")
