"""Extra caption files (machine translations, and the per-language caption files of some datasets) merged into
the samples of a layout.

Formats, detected from the content (the detected name is reported):

* ``json-dict`` (MLA/DASD style): a JSON object ``{image_name: [caption, ...]}`` (a single string is accepted
  for one caption), one file per language and split.
* ``cap-id-lines`` (NRCCR style, also COCO-CN's caption files): text lines ``<cap_id><whitespace><caption>``
  where ``cap_id`` is ``<image_or_video_id>#...`` (e.g. ``video7010#enc2zh#0``, ``COCO_val2014_000000000042#0``);
  the image is the part before the first ``#``. Lines are split at the first run of spaces or tabs.
* ``json-records`` (CCLM style): a JSON list of objects with ``image`` and ``caption`` (a string) or
  ``captions`` (a list), and optionally ``image_id``; several records may name the same image.
* ``coco-annotations`` (STAIR Captions, or any translated COCO caption file): a JSON object with ``images`` and
  ``annotations``, each annotation ``{image_id, caption}``; the image is the COCO id.

An entry names its image by a path, a file name, a file name without extension, or an id. It is matched to the
samples whose source path, file name, file stem or image id equals it (tried in that order). Entries that match
no sample, or several different images, are *reported* (never silently dropped) with the file they came from.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dsmoe.shards.layouts.base import describe_json, load_json, read_lines
from dsmoe.shards.records import RawFormatError, RawRecord, caption_map, valid_language

__all__ = ["CaptionFile", "describe_caption_report", "merge_caption_files", "parse_caption_file",
           "parse_translation_option"]

FORMATS = ("json-dict", "cap-id-lines", "json-records", "coco-annotations")
_CAP_LINE = re.compile(r"^(\S+)[ \t]+(.*)$")
MAX_UNMATCHED_PRINTED = 5


@dataclass
class CaptionFile:
    """The parsed content of one caption file: ``(image reference, [captions])`` entries in file order."""

    language: str
    path: str
    format: str
    kind: str  # "translation" (--translations) or "dataset" (a caption file of the dataset release)
    entries: list[tuple[str, list[str]]] = field(default_factory=list)
    alt_refs: dict[int, str] = field(default_factory=dict)  # entry index -> a second reference (CCLM image_id)


def parse_translation_option(text: str) -> tuple[str, Path]:
    """``LANG=PATH`` -> (LANG, PATH); raises ValueError with a readable message."""
    lang, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--translations expects LANG=PATH (e.g. de=train.de.json), got {text!r}")
    if not valid_language(lang):
        raise ValueError(f"--translations: {lang!r} is not a usable language tag (letters, digits, '_' or '-')")
    return lang, Path(path)


def _str_list(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _expected() -> str:
    return ("expected one of: a JSON object {image: [captions]} (MLA/DASD), text lines '<image_id>#<n> caption' "
            "(NRCCR/COCO-CN), a JSON list of {image, caption(s), image_id} (CCLM), or a COCO caption file "
            "{images, annotations[{image_id, caption}]}")


def _parse_json(path: Path, data: Any, out: CaptionFile) -> None:
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        out.format = "coco-annotations"
        annotations = data["annotations"]
        if not isinstance(annotations, list):
            raise RawFormatError(f"{path}: 'annotations' must be a list, found {type(annotations).__name__}")
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise RawFormatError(f"{path}: annotation {index} must be an object with 'image_id' and 'caption', "
                                     f"found {str(ann)[:80]!r}")
            if not isinstance(ann["caption"], str) or isinstance(ann["image_id"], (bool, list, dict)):
                raise RawFormatError(f"{path}: annotation {index}: 'caption' must be a string and 'image_id' a "
                                     f"number or string, found {ann['image_id']!r}, {ann['caption']!r}")
            out.entries.append((str(ann["image_id"]), [ann["caption"]]))
        return
    if isinstance(data, dict):
        out.format = "json-dict"
        for name, value in data.items():
            captions = _str_list(value)
            if captions is None:
                raise RawFormatError(f"{path}: the value of {name!r} must be a caption string or a list of "
                                     f"strings, found {str(value)[:80]!r} ({_expected()})")
            out.entries.append((str(name), captions))
        return
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        out.format = "json-records"
        for index, item in enumerate(data):
            if "image" not in item or not ("caption" in item or "captions" in item):
                raise RawFormatError(f"{path}: record {index} lacks 'image' or 'caption(s)' (found keys "
                                     f"{sorted(item)[:8]}); {_expected()}")
            captions = _str_list(item.get("captions", item.get("caption")))
            if captions is None or not isinstance(item["image"], str):
                raise RawFormatError(f"{path}: record {index}: 'image' must be a string and 'caption(s)' text, "
                                     f"found {str(item)[:100]!r}")
            out.entries.append((item["image"], captions))
            if item.get("image_id") is not None and not isinstance(item["image_id"], (list, dict)):
                out.alt_refs[index] = str(item["image_id"])
        return
    raise RawFormatError(f"{path}: found {describe_json(data)}; {_expected()}")


def parse_caption_file(path: Path, language: str, kind: str = "translation") -> CaptionFile:
    """Read one caption file in any of :data:`FORMATS`; raises :class:`RawFormatError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RawFormatError(f"{path}: no such caption file ({kind} for language {language!r})")
    out = CaptionFile(language=language, path=str(path), format="", kind=kind)
    head = path.open("rb").read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"{", b"["):
        _parse_json(path, load_json(path), out)
    else:
        out.format = "cap-id-lines"
        for number, line in enumerate(read_lines(path, f"{kind} captions"), start=1):
            if not line.strip():
                continue
            match = _CAP_LINE.match(line.strip())
            cap_id, caption = (match[1], match[2]) if match else (line.strip(), "")
            if "#" not in cap_id:
                raise RawFormatError(f"{path}: line {number} starts with {cap_id[:60]!r}, which is no cap_id "
                                     f"'<image_or_video_id>#...'; {_expected()}")
            out.entries.append((cap_id.split("#", 1)[0], [caption.strip()]))
    if not out.entries:
        raise RawFormatError(f"{path}: the caption file has no entries; {_expected()}")
    return out


# ------------------------------------------------------------------------------------------------ matching


def _aliases(record: RawRecord) -> Iterable[str]:
    source = record.source.replace("\\", "/")
    name = PurePosixPath(source).name
    yield source
    yield name
    yield name.rsplit(".", 1)[0] if "." in name else name
    if record.image_id is not None:
        yield str(record.image_id)


def _identity(record: RawRecord) -> str:
    return str(record.image_id) if record.image_id is not None else record.source


class _Index:
    """alias -> record positions, for matching caption-file entries to samples."""

    def __init__(self, records: Sequence[RawRecord]) -> None:
        self.records = records
        self.by_alias: dict[str, list[int]] = {}
        for position, record in enumerate(records):
            for alias in dict.fromkeys(_aliases(record)):
                self.by_alias.setdefault(alias, []).append(position)

    def lookup(self, ref: str) -> tuple[list[int], str | None]:
        """Positions of the records ``ref`` names, or ``([], reason)``."""
        ref = ref.strip().replace("\\", "/")
        name = PurePosixPath(ref).name
        stem = name.rsplit(".", 1)[0] if "." in name else name
        for candidate in dict.fromkeys((ref, name, stem)):
            positions = self.by_alias.get(candidate)
            if positions:
                identities = {_identity(self.records[p]) for p in positions}
                if len(identities) > 1:
                    return [], f"ambiguous: matches {len(identities)} different images ({sorted(identities)[:3]})"
                return positions, None
        return [], "no sample has this image"


def merge_caption_files(records: list[RawRecord], files: Sequence[CaptionFile]) -> tuple[list[RawRecord],
                                                                                        list[dict[str, Any]]]:
    """Merge the captions of ``files`` into ``records`` (appended per language); return the records and a report
    per file: entries, captions merged, images enriched and every unmatched entry with its reason."""
    if not files:
        return records, []
    index = _Index(records)
    added: dict[int, dict[str, list[str]]] = {}
    reports: list[dict[str, Any]] = []
    for caption_file in files:
        unmatched: list[dict[str, str]] = []
        enriched: set[int] = set()
        merged = 0
        for entry_index, (ref, captions) in enumerate(caption_file.entries):
            positions, reason = index.lookup(ref)
            alt = caption_file.alt_refs.get(entry_index)
            if not positions and alt is not None:
                positions, alt_reason = index.lookup(alt)
                reason = reason if positions else f"{reason}; image_id {alt!r}: {alt_reason}"
            if not positions:
                unmatched.append({"image": ref, "reason": reason or "no sample has this image"})
                continue
            for position in positions:
                added.setdefault(position, {}).setdefault(caption_file.language, []).extend(captions)
                enriched.add(position)
            merged += len(captions)
        existing = sum(1 for p in enriched if caption_file.language in caption_map(records[p]))
        reports.append({
            "language": caption_file.language,
            "path": caption_file.path,
            "format": caption_file.format,
            "kind": caption_file.kind,
            "entries": len(caption_file.entries),
            "captions_merged": merged,
            "records_enriched": len(enriched),
            "records_that_already_had_this_language": existing,
            "unmatched": unmatched,
        })
    out = list(records)
    for position, extra in added.items():
        captions = caption_map(records[position])
        for lang, new in extra.items():
            captions.setdefault(lang, []).extend(new)
        out[position] = dataclasses.replace(records[position], captions=captions)
    return out, reports


def describe_caption_report(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for one merge report (the CLI prints them)."""
    lines = [f"{report['kind']} {report['language']}: {report['path']} (format {report['format']}): "
             f"{report['entries']} entries, {report['captions_merged']} captions merged into "
             f"{report['records_enriched']} records, {len(report['unmatched'])} unmatched"]
    for item in report["unmatched"][:MAX_UNMATCHED_PRINTED]:
        lines.append(f"  unmatched {item['image']!r}: {item['reason']}")
    if len(report["unmatched"]) > MAX_UNMATCHED_PRINTED:
        lines.append(f"  ... and {len(report['unmatched']) - MAX_UNMATCHED_PRINTED} more (see the manifests)")
    return lines
