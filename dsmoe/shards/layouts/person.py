"""Readers for the raw annotation layouts of the text-based person-retrieval datasets.

Supported layouts:

* ``cuhk-pedes``: ``root/reid_raw.json``, a list of
  ``{"split", "captions", "file_path", "processed_tokens", "id"}``; images under ``root/imgs/``.
* ``icfg-pedes``: ``root/ICFG-PEDES.json`` or ``root/ICFG_PEDES.json``, same keys; images under ``root/imgs/``.
* ``rstpreid``: ``root/data_captions.json``, a list of ``{"id", "img_path", "captions", "split"}``;
  images under ``root/imgs/``.

The readers only check the *structure* of the annotation (keys and their types). Faults of individual records
that a shard writer can report and skip (missing image, empty caption, unknown split, duplicates) are passed
through unchanged, so that nothing is dropped silently here.
"""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dsmoe.shards.layouts.base import (CUHK_PEDES_KEYS, RSTPREID_KEYS, LayoutResult, describe_json, load_json,
                                       other_files_hint)
from dsmoe.shards.records import RawFormatError, RawRecord


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
        required_keys=CUHK_PEDES_KEYS,
    ),
    "icfg-pedes": LayoutSpec(
        annotation_names=("ICFG-PEDES.json", "ICFG_PEDES.json"),
        path_key="file_path",
        required_keys=CUHK_PEDES_KEYS,
    ),
    "rstpreid": LayoutSpec(
        annotation_names=("data_captions.json",),
        path_key="img_path",
        required_keys=RSTPREID_KEYS,
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
    data = load_json(path)
    if not isinstance(data, list):
        raise RawFormatError(f"{path}: expected a JSON list of {dataset} records, found {describe_json(data)}")
    if not data:
        raise RawFormatError(f"{path}: the annotation contains no records")
    image_dir = root / spec.image_dir
    return [
        _record(path, index, _check_keys(path, index, item, dataset, spec), spec, image_dir)
        for index, item in enumerate(data)
    ]


def read_from_args(args: Namespace) -> LayoutResult:
    return LayoutResult(records=read_person_layout(args.dataset, args.root))
