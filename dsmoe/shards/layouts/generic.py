"""Generic inputs: a JSON-lines annotation file, and a Hugging Face ``datasets`` dataset.

JSON lines (``--annotations PATH``): one object per line,
``{"image": "relative/path.jpg", "captions": ..., "id": ..., "split": ...}``:

* ``image`` (required): a path relative to the image directory (``--images``, default the file's directory);
  a file with a video extension (``.mp4``, ...) makes a video sample.
* ``captions`` (required): a string, a list of strings (English), or an object ``{language: string | [strings]}``.
  ``caption`` is accepted for a single string.
* ``id`` (optional, string or integer): the image id (default: the image path).
* ``split`` (optional): ``train``, ``val`` or ``test``; other values are reported as unknown splits; without it
  the sample goes to ``default_split`` (``--default-split``, default ``train``).
Blank lines are ignored; a line that is not a JSON object with these fields stops the run naming its number.

Hugging Face (``--hf NAME_OR_DIR``): a directory written by ``save_to_disk`` (read with ``datasets.load_from_disk``)
or anything ``datasets.load_dataset`` accepts (a hub name, with ``--hf-config``; a directory of data files).
``--image-column`` (default ``image``) is an ``Image`` feature (bytes or path) or a string column of paths
relative to ``--images``; ``--caption-columns`` is a comma list of ``column`` (English) or ``lang=column``
(default: the first of ``captions``, ``caption``, ``sentences``, ``text``), each a string or a list of strings;
``--id-column`` gives the image id (default: the image's stored path, else ``<split>-<row>``). The splits of a
DatasetDict are used (``validation`` -> ``val``); a single Dataset uses ``--split-column`` or ``default_split``.
Image bytes are not copied by the reader: each shard worker re-opens the dataset (memory-mapped) and reads the
rows it needs.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path
from typing import Any

from dsmoe.shards.layouts.base import LayoutResult, relative_source
from dsmoe.shards.records import BlobRef, RawFormatError, RawRecord, valid_language
from dsmoe.shards.video import VIDEO_EXTENSIONS

__all__ = ["fetch_blob", "parse_caption_columns", "read_hf", "read_jsonl"]

HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
DEFAULT_CAPTION_COLUMNS = ("captions", "caption", "sentences", "text")


def _captions(value: Any, where: str) -> dict[str, list[str]]:
    if isinstance(value, str):
        return {"en": [value]}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {"en": list(value)}
    if isinstance(value, dict):
        out: dict[str, list[str]] = {}
        for lang, caps in value.items():
            if not valid_language(lang):
                raise RawFormatError(f"{where}: {lang!r} is not a language tag (letters, digits, '_' or '-')")
            if isinstance(caps, str):
                out[lang] = [caps]
            elif isinstance(caps, list) and all(isinstance(c, str) for c in caps):
                out[lang] = list(caps)
            else:
                raise RawFormatError(f"{where}: captions[{lang!r}] must be a string or a list of strings, "
                                     f"found {str(caps)[:80]!r}")
        return out
    raise RawFormatError(f"{where}: 'captions' must be a string, a list of strings or an object "
                         f"{{language: [strings]}}, found {str(value)[:80]!r}")


def read_jsonl(path: Path, *, images_dir: Path | None = None, default_split: str = "train") -> LayoutResult:
    """Read a JSON-lines annotation file of {image, captions, id?, split?}."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise RawFormatError(f"{path}: no such file (--annotations, a JSON-lines file)")
    images = Path(images_dir).expanduser().absolute() if images_dir is not None else path.parent
    if not images.is_dir():
        raise RawFormatError(f"{images}: no such directory (--images)")
    result = LayoutResult(files_read=[str(path)], image_dir=str(images))
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise RawFormatError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RawFormatError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); expected one object "
                                 f"{{image, captions, id?, split?}} per line") from None
        if not isinstance(item, dict) or "image" not in item or not ("captions" in item or "caption" in item):
            found = sorted(item)[:8] if isinstance(item, dict) else type(item).__name__
            raise RawFormatError(f"{where}: expected an object with 'image' and 'captions' (and optionally 'id', "
                                 f"'split'), found {found}")
        source = relative_source(path, f"line {number}", item["image"])
        captions = _captions(item.get("captions", item.get("caption")), where)
        split = item.get("split", default_split)
        if not isinstance(split, str):
            raise RawFormatError(f"{where}: 'split' must be a string, found {split!r}")
        image_id = item.get("id", source)
        if isinstance(image_id, (bool, list, dict)) or image_id is None:
            raise RawFormatError(f"{where}: 'id' must be a string or an integer, found {image_id!r}")
        result.records.append(RawRecord(split=split, image_path=images / source, source=source, captions=captions,
                                        image_id=str(image_id),
                                        video=Path(source).suffix.lower() in VIDEO_EXTENSIONS))
    if not result.records:
        raise RawFormatError(f"{path}: no records (an empty JSON-lines file)")
    return result


# --------------------------------------------------------------------------------------------- Hugging Face


def parse_caption_columns(text: str | None) -> list[tuple[str, str]] | None:
    """``"caption,de=caption_de"`` -> [("en", "caption"), ("de", "caption_de")]."""
    if text is None:
        return None
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lang, sep, column = part.partition("=")
        lang, column = (lang, column) if sep else ("en", lang)
        if not valid_language(lang) or not column:
            raise RawFormatError(f"--caption-columns: {part!r} is not COLUMN or LANG=COLUMN")
        out.append((lang, column))
    if not out:
        raise RawFormatError("--caption-columns names no column")
    return out


def _is_save_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load(location: str, from_disk: bool, config: str | None) -> Any:
    import datasets

    if from_disk:
        return datasets.load_from_disk(location)
    return datasets.load_dataset(location, config)


_OPEN: dict[tuple[Any, ...], Any] = {}


def fetch_blob(ref: BlobRef) -> bytes:
    """The stored bytes of one image of a Hugging Face dataset (opened once per process)."""
    key = (ref.location, ref.from_disk, ref.config, ref.split, ref.column)
    dataset = _OPEN.get(key)
    if dataset is None:
        import datasets

        loaded = _load(ref.location, ref.from_disk, ref.config)
        if ref.split is not None:
            loaded = loaded[ref.split]
        dataset = loaded.select_columns([ref.column]).cast_column(ref.column, datasets.Image(decode=False))
        _OPEN[key] = dataset
    value = dataset[ref.row][ref.column]
    if not isinstance(value, dict):
        raise ValueError(f"column {ref.column!r} holds no image")
    if value.get("bytes"):
        return bytes(value["bytes"])
    if value.get("path"):
        return Path(value["path"]).read_bytes()
    raise FileNotFoundError(f"row {ref.row} of column {ref.column!r} has neither bytes nor a path")


def read_hf(name_or_dir: str, *, config: str | None = None, image_column: str = "image",
            caption_columns: list[tuple[str, str]] | None = None, split_column: str | None = None,
            id_column: str | None = None, images_dir: Path | None = None,
            default_split: str = "train") -> LayoutResult:
    """Read a Hugging Face dataset (saved directory or loadable name) into records."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency of dsmoe
        raise RawFormatError(f"--dataset hf needs the datasets package ({exc})") from None
    as_path = Path(name_or_dir).expanduser()
    from_disk = as_path.is_dir() and _is_save_to_disk(as_path)
    location = str(as_path.absolute()) if as_path.exists() else name_or_dir
    try:
        loaded = _load(location, from_disk, config)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        how = "datasets.load_from_disk" if from_disk else "datasets.load_dataset"
        raise RawFormatError(f"{name_or_dir}: cannot be loaded with {how}: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        parts = [(name, loaded[name]) for name in loaded]
    else:
        parts = [(None, loaded)]
    result = LayoutResult(files_read=[location], image_dir=str(images_dir) if images_dir else None)
    for hf_split, dataset in parts:
        columns = list(dataset.column_names)
        where = f"{name_or_dir}" + (f"[{hf_split}]" if hf_split is not None else "")
        wanted = caption_columns
        if wanted is None:
            default = next((c for c in DEFAULT_CAPTION_COLUMNS if c in columns), None)
            if default is None:
                raise RawFormatError(f"{where}: no caption column among {columns}; name it with --caption-columns")
            wanted = [("en", default)]
        for column in [image_column] + [c for _, c in wanted] + [c for c in (split_column, id_column) if c]:
            if column not in columns:
                raise RawFormatError(f"{where}: no column {column!r}; the dataset has {columns}")
        feature = dataset.features[image_column]
        is_image = isinstance(feature, datasets.Image)
        if not is_image and not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise RawFormatError(f"{where}: column {image_column!r} is {feature}, expected an Image feature or a "
                                 f"string column of image paths")
        if not is_image and images_dir is None:
            raise RawFormatError(f"{where}: column {image_column!r} holds paths; give their directory with --images")
        meta_columns = [c for _, c in wanted] + [c for c in (split_column, id_column) if c]
        meta = dataset.select_columns(list(dict.fromkeys(meta_columns)))
        paths: list[str | None]
        if is_image:
            storage = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
            paths = []
            for batch in storage.with_format("arrow").iter(batch_size=512):
                paths += batch.column(image_column).combine_chunks().field("path").to_pylist()
        else:
            paths = list(dataset[image_column])
        out_split = HF_SPLITS.get(hf_split, hf_split) if hf_split is not None else None
        for row, values in enumerate(_rows(meta)):
            row_where = f"{where} row {row}"
            captions: dict[str, list[str]] = {}
            for lang, column in wanted:
                value = values[column]
                if value is None:
                    continue
                if isinstance(value, str):
                    captions.setdefault(lang, []).append(value)
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    captions.setdefault(lang, []).extend(value)
                else:
                    raise RawFormatError(f"{row_where}: column {column!r} must hold a string or a list of strings, "
                                         f"found {str(value)[:80]!r}")
            split = out_split
            if split_column is not None:
                split = values[split_column]
                split = HF_SPLITS.get(split, split) if isinstance(split, str) else str(split)
            split = split or default_split
            stored = paths[row]
            if id_column is not None:
                image_id = str(values[id_column])
            else:
                image_id = stored if stored else f"{hf_split or 'data'}-{row}"
            if is_image:
                source = stored or f"{hf_split or 'data'}[{row}]"
                blob = BlobRef(location=location, from_disk=from_disk, config=config, split=hf_split,
                               column=image_column, row=row)
                result.records.append(RawRecord(split=split, image_path=None, source=source, captions=captions,
                                                image_id=image_id, blob=blob))
            else:
                source = relative_source(Path(where), f"row {row}", stored)
                result.records.append(RawRecord(split=split, image_path=Path(images_dir).absolute() / source,
                                                source=source, captions=captions, image_id=image_id,
                                                video=Path(source).suffix.lower() in VIDEO_EXTENSIONS))
    if not result.records:
        raise RawFormatError(f"{name_or_dir}: the dataset has no rows")
    return result


def _rows(dataset: Any) -> Any:
    """Rows of a (metadata-only) dataset as dicts, read in batches."""
    for batch in dataset.iter(batch_size=1000):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def read_jsonl_from_args(args: Namespace) -> LayoutResult:
    return read_jsonl(args.annotations, images_dir=args.images, default_split=args.default_split or "train")


def read_hf_from_args(args: Namespace) -> LayoutResult:
    return read_hf(args.hf, config=args.hf_config, image_column=args.image_column or "image",
                   caption_columns=parse_caption_columns(args.caption_columns), split_column=args.split_column,
                   id_column=args.id_column, images_dir=args.images, default_split=args.default_split or "train")
