"""What the converter reads (``RawRecord``: one annotated image or video of any layout) and the errors it raises.

A person dataset's record carries English captions and a ``pid``; an image-text record carries captions per
language and the dataset's own ``image_id``; videos set ``video``; images held inside a Hugging Face dataset are
named by a ``BlobRef`` instead of a file.
"""
from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsmoe.data.format import SOURCE_LANGUAGE


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
    return {SOURCE_LANGUAGE: list(record.captions)}


class ShardWriteError(ValueError):
    """The shards could not be written as asked (bad options, skipped records under ``strict``, a failed write)."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (a full disk, say) into an error that names the file."""
    try:
        yield
    except OSError as exc:
        raise ShardWriteError(f"could not write {path}: {exc.strerror or exc}") from None
