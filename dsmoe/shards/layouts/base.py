"""What a layout reader returns, and helpers shared by the readers so that every layout names the file and what it
expected when the input is not what it should be."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dsmoe.shards.records import RawFormatError, RawRecord

# Keys of the person layouts' records (CUHK-PEDES and ICFG-PEDES share theirs)
CUHK_PEDES_KEYS = frozenset({"split", "captions", "file_path", "id"})
RSTPREID_KEYS = frozenset({"id", "img_path", "captions", "split"})


@dataclass
class LayoutResult:
    """Records of one dataset, the files they were read from, notes for the manifest, and the reports of caption
    files merged by the layout itself (STAIR, COCO-CN, MSR-VTT-CN)."""

    records: list[RawRecord] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    caption_reports: list[dict[str, Any]] = field(default_factory=list)
    image_dir: str | None = None


def find_dir(given: Path | None, root: Path, names: Sequence[str], what: str) -> Path:
    """``given`` (must exist) or the first of ``root/name`` that is a directory; else a RawFormatError."""
    if given is not None:
        given = Path(given).expanduser().absolute()
        if not given.is_dir():
            raise RawFormatError(f"{given}: no such directory ({what})")
        return given
    for name in names:
        candidate = (root / name).resolve()
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(root / name) for name in names)
    raise RawFormatError(f"cannot find {what}: looked for {looked}; give the directory explicitly")


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
            if RSTPREID_KEYS <= keys:
                guess = " (looks like RSTPReid's data_captions.json)"
            elif CUHK_PEDES_KEYS <= keys:
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
