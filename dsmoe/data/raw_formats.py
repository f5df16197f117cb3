"""Readers for the raw annotation layouts of the text-based person-retrieval datasets.

Supported layouts (see DESIGN.md section 5):

* ``cuhk-pedes``: ``root/reid_raw.json``, a list of
  ``{"split", "captions", "file_path", "processed_tokens", "id"}``; images under ``root/imgs/``.
* ``icfg-pedes``: ``root/ICFG-PEDES.json`` or ``root/ICFG_PEDES.json``, same keys; images under ``root/imgs/``.
* ``rstpreid``: ``root/data_captions.json``, a list of ``{"id", "img_path", "captions", "split"}``;
  images under ``root/imgs/``.

The readers only check the *structure* of the annotation (keys and their types). Faults of individual records
that a shard writer can report and skip (missing image, empty caption, unknown split, duplicates) are passed
through unchanged, so that nothing is dropped silently here.

:class:`RawRecord` is also the record type of the image-text and video layouts (``dsmoe.data.layouts``): their
captions are a mapping ``language -> [caption]``, they carry an ``image_id`` instead of a ``pid``, videos set
``video=True``, and images held inside a Hugging Face dataset are named by a :class:`BlobRef` instead of a file.
The helpers below (:func:`load_json`, :func:`read_lines`, :func:`describe_json`) are shared by those readers, so
that every layout names the file and what it expected when the input is not what it should be.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "DATASETS",
    "KNOWN_FILES",
    "BlobRef",
    "LayoutSpec",
    "RawFormatError",
    "RawRecord",
    "caption_map",
    "describe_json",
    "find_annotation",
    "load_json",
    "read_lines",
    "read_person_layout",
    "relative_source",
    "valid_language",
]


class RawFormatError(ValueError):
    """The raw dataset directory or its annotation file is not in the expected layout."""


@dataclass(frozen=True)
class BlobRef:
    """An image stored inside a Hugging Face ``datasets`` dataset: enough for a worker process to fetch it.

    ``location`` is a ``save_to_disk`` directory (``from_disk=True``) or a name for ``datasets.load_dataset``;
    ``split`` names the split of a DatasetDict (``None`` for a plain Dataset); ``row`` indexes that split.
    """

    location: str
    from_disk: bool
    config: str | None
    split: str | None
    column: str
    row: int


@dataclass(frozen=True)
class RawRecord:
    """One annotated image (or video) of a raw dataset.

    ``source`` is the image path exactly as written in the annotation (for the person datasets: relative to
    ``root/imgs/``); ``image_path`` is the absolute path of that file (``None`` when ``blob`` names the image).
    ``captions`` is a list of English captions (person datasets) or a mapping ``language -> [caption]``.
    Person datasets set ``pid``; image-text datasets set ``image_id`` (the dataset's own image/video id).
    """

    split: str
    image_path: pathlib.Path | None
    source: str
    captions: Sequence[str] | Mapping[str, Sequence[str]]
    pid: int | None = None
    image_id: str | None = None
    video: bool = False
    blob: BlobRef | None = None


_LANGUAGE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def valid_language(tag: str) -> bool:
    """Whether ``tag`` can key captions (letters, digits, ``_`` and ``-``; never a dot)."""
    return isinstance(tag, str) and bool(_LANGUAGE.match(tag))


def caption_map(record: RawRecord) -> dict[str, list[str]]:
    """The captions of ``record`` as ``language -> [caption]`` (a plain list means English)."""
    if isinstance(record.captions, Mapping):
        return {str(lang): list(caps) for lang, caps in record.captions.items()}
    return {"en": list(record.captions)}


# Annotation files of the public releases, named in error messages when another dataset's file is found.
KNOWN_FILES: dict[str, str] = {
    "reid_raw.json": "cuhk-pedes",
    "ICFG-PEDES.json": "icfg-pedes",
    "ICFG_PEDES.json": "icfg-pedes",
    "data_captions.json": "rstpreid",
    "dataset_coco.json": "coco (Karpathy split)",
    "dataset_flickr30k.json": "Karpathy's Flickr30K split (not supported: use multi30k)",
    "MSRVTT_data.json": "msrvtt",
    "data/task1/image_splits/train.txt": "multi30k",
    "task1/image_splits/train.txt": "multi30k",
    "stair_captions_v1.2_train.json": "STAIR Captions (coco --stair)",
    "coco-cn_train.txt": "COCO-CN (coco --coco-cn)",
}


def other_files_hint(root: Path, exclude: str) -> str:
    """``"; found X (dataset) instead: is --dataset right?"`` for annotation files of other datasets in ``root``."""
    found = [f"{name} ({owner})" for name, owner in KNOWN_FILES.items()
             if not owner.startswith(exclude) and (root / name).is_file()]
    return f"; found {', '.join(found)} instead: is --dataset right?" if found else ""


def describe_json(data: Any) -> str:
    """A short description of a parsed JSON document, naming the known format it looks like."""
    if isinstance(data, dict):
        keys = set(data)
        guess = ""
        if {"videos", "sentences"} <= keys:
            guess = " (looks like MSR-VTT's MSRVTT_data.json)"
        elif "images" in keys and "annotations" in keys:
            guess = " (looks like a COCO-format annotation file, e.g. STAIR Captions)"
        elif "images" in keys and data.get("dataset") in ("coco", "flickr30k", "flickr8k"):
            guess = f" (looks like Karpathy's dataset_{data.get('dataset')}.json)"
        shown = sorted(str(k) for k in keys)[:8]
        return f"an object with keys {shown}{'...' if len(keys) > 8 else ''}{guess}"
    if isinstance(data, list):
        if data and isinstance(data[0], dict):
            keys = set(data[0])
            guess = ""
            if DATASETS["rstpreid"].required_keys <= keys:
                guess = " (looks like RSTPReid's data_captions.json)"
            elif DATASETS["cuhk-pedes"].required_keys <= keys:
                guess = " (looks like CUHK-PEDES/ICFG-PEDES records)"
            elif "image" in keys and ("caption" in keys or "captions" in keys):
                guess = " (looks like CCLM-style {image, caption} records)"
            return f"a list of {len(data)} objects with keys {sorted(keys)[:8]}{guess}"
        return f"a list of {len(data)} {type(data[0]).__name__ if data else 'items'}"
    return f"a JSON {type(data).__name__}"


def relative_source(path: Path, where: str, value: Any) -> str:
    """Validate an image path of an annotation: a non-empty relative path that stays inside its directory."""
    if not isinstance(value, str) or not value.strip():
        raise RawFormatError(f"{path}: {where}: the image path must be a non-empty string, found {value!r}")
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise RawFormatError(f"{path}: {where}: the image path must be relative to the image directory, "
                             f"found {value!r}")
    return value


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (``.gz`` compressed or not), without line ends.

    ``path`` may be given without its ``.gz`` suffix when only the compressed file exists.
    """
    path = Path(path)
    candidates = [path] if path.suffix == ".gz" else [path, path.with_name(path.name + ".gz")]
    existing = next((p for p in candidates if p.is_file()), None)
    if existing is None:
        raise RawFormatError(f"{what}: {path} does not exist" + (" (nor its .gz)" if len(candidates) > 1 else ""))
    try:
        raw = gzip.decompress(existing.read_bytes()) if existing.suffix == ".gz" else existing.read_bytes()
    except OSError as exc:
        raise RawFormatError(f"{existing}: cannot be read as {what} ({getattr(exc, 'strerror', None) or exc})") \
            from None
    except EOFError as exc:
        raise RawFormatError(f"{existing}: truncated gzip file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RawFormatError(f"{existing}: {what} must be UTF-8 text ({exc})") from None
    if "\x00" in text:
        raise RawFormatError(f"{existing}: {what} must be text, found binary data")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass(frozen=True)
class LayoutSpec:
    """How one dataset stores its annotation."""

    annotation_names: tuple[str, ...]
    path_key: str
    required_keys: frozenset[str]
    image_dir: str = "imgs"


DATASETS: dict[str, LayoutSpec] = {
    "cuhk-pedes": LayoutSpec(
        annotation_names=("reid_raw.json",),
        path_key="file_path",
        required_keys=frozenset({"split", "captions", "file_path", "id"}),
    ),
    "icfg-pedes": LayoutSpec(
        annotation_names=("ICFG-PEDES.json", "ICFG_PEDES.json"),
        path_key="file_path",
        required_keys=frozenset({"split", "captions", "file_path", "id"}),
    ),
    "rstpreid": LayoutSpec(
        annotation_names=("data_captions.json",),
        path_key="img_path",
        required_keys=frozenset({"id", "img_path", "captions", "split"}),
    ),
}


def _spec(dataset: str) -> LayoutSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise RawFormatError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}") from None


def find_annotation(dataset: str, root: Path) -> Path:
    """Return the annotation file of ``dataset`` under ``root`` or raise :class:`RawFormatError`."""
    spec = _spec(dataset)
    root = Path(root)
    if not root.is_dir():
        raise RawFormatError(f"dataset root {str(root)!r} does not exist or is not a directory")
    for name in spec.annotation_names:
        candidate = root / name
        if candidate.is_file():
            return candidate
    looked_for = " or ".join(spec.annotation_names)
    message = f"no {dataset} annotation file in {str(root)!r}: looked for {looked_for}"
    raise RawFormatError(message + other_files_hint(root, exclude=dataset))


def load_json(path: Path) -> Any:
    """Parse a UTF-8 JSON file; any failure is a :class:`RawFormatError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RawFormatError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RawFormatError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise RawFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RawFormatError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


_load_json = load_json


def _guess_dataset(keys: set[str]) -> str | None:
    """Name the layout whose required keys a record has (a hint for error messages)."""
    if DATASETS["rstpreid"].required_keys <= keys:
        return "rstpreid"
    if DATASETS["cuhk-pedes"].required_keys <= keys:
        return "cuhk-pedes or icfg-pedes"
    return None


def _check_keys(path: Path, index: int, item: Any, dataset: str, spec: LayoutSpec) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise RawFormatError(
            f"{path}: record {index} is a JSON {type(item).__name__}, expected an object with keys "
            f"{sorted(spec.required_keys)}"
        )
    found = set(item)
    missing = spec.required_keys - found
    if missing:
        message = (
            f"{path}: record {index} lacks key(s) {sorted(missing)} of the {dataset} layout "
            f"(expected keys {sorted(spec.required_keys)}, found {sorted(found)})"
        )
        guess = _guess_dataset(found)
        if guess is not None:
            message += f"; these look like {guess} records"
        raise RawFormatError(message)
    return item


def _source_path(path: Path, index: int, key: str, value: Any) -> str:
    """Validate the image path of a record: a non-empty relative path that stays inside the image dir."""
    if not isinstance(value, str) or not value.strip():
        raise RawFormatError(f"{path}: record {index}: {key!r} must be a non-empty string, found {value!r}")
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise RawFormatError(
            f"{path}: record {index}: {key!r} must be a path relative to the image directory, found {value!r}"
        )
    return value


def _record(path: Path, index: int, item: dict[str, Any], spec: LayoutSpec, image_dir: Path) -> RawRecord:
    split = item["split"]
    if not isinstance(split, str):
        raise RawFormatError(f"{path}: record {index}: 'split' must be a string, found {split!r}")
    captions = item["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise RawFormatError(
            f"{path}: record {index}: 'captions' must be a list of strings, found {type(captions).__name__}"
            f" {str(captions)[:80]!r}"
        )
    pid = item["id"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise RawFormatError(f"{path}: record {index}: 'id' must be an integer, found {pid!r}")
    source = _source_path(path, index, spec.path_key, item[spec.path_key])
    return RawRecord(
        split=split,
        image_path=image_dir / source,
        source=source,
        captions=list(captions),
        pid=pid,
    )


def read_person_layout(dataset: str, root: Path) -> list[RawRecord]:
    """Read the annotation of a person-retrieval dataset into records, in annotation order.

    Raises :class:`RawFormatError` when the directory, the file or a record does not follow the layout.
    """
    spec = _spec(dataset)
    root = Path(root).expanduser().absolute()
    path = find_annotation(dataset, root)
    data = _load_json(path)
    if not isinstance(data, list):
        raise RawFormatError(f"{path}: expected a JSON list of {dataset} records, found {describe_json(data)}")
    if not data:
        raise RawFormatError(f"{path}: the annotation contains no records")
    image_dir = root / spec.image_dir
    return [
        _record(path, index, _check_keys(path, index, item, dataset, spec), spec, image_dir)
        for index, item in enumerate(data)
    ]
