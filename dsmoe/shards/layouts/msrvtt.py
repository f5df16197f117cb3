"""MSR-VTT videos with the official split or the 1k-A protocol, plus Chinese captions (MSR-VTT-CN).

* ``MSRVTT_data.json`` (``--annotations``, else ``root/MSRVTT_data.json``, ``root/annotation/MSRVTT_data.json``,
  ``root/msrvtt_data/MSRVTT_data.json``): ``{"videos": [{"video_id": "video0", "split": "train|validate|test",
  ...}], "sentences": [{"video_id": "video0", "caption": "...", "sen_id": 0}]}``. Official split: ``train``
  (6,513), ``validate`` -> ``val`` (497), ``test`` (2,990), 20 captions per video.
* The 1k-A protocol (``--test-list``): ``MSRVTT_JSFUSION_test.csv`` with a header naming at least ``video_id``
  and ``sentence`` (the release has ``key,vid_key,video_id,sentence``, sometimes with a leading unnamed index
  column); these 1,000 videos form ``test`` with the listed sentence as their one English caption (the 1k-A
  query). ``--train-list`` (``MSRVTT_train.9k.csv`` or ``MSRVTT_train.7k.csv``, column ``video_id``) names the
  training videos; without it every video not in the test list is a training video (the 9k set). Videos in
  neither list are not part of the protocol and are noted, not written.
* Chinese captions (``--zh-captions``, repeatable): MSR-VTT-CN caption files as released with NRCCR,
  ``<video_id>#<tag>#<n> <caption>`` lines (e.g. ``video7010#zh#0 ...``), or any other caption-file format of
  ``dsmoe.shards.layouts.captions``; merged as ``zh``.
* Videos (``--videos``, default ``root``): every file with a video extension under that directory is indexed by
  its name without extension (``video0.mp4``), so ``videos/all/``, ``TrainValVideo/`` + ``TestVideo/`` and flat
  layouts all work. A video that is listed but has no file is reported as missing.

In the 1k-A protocol only the English test captions are narrowed to the listed sentence; Chinese captions are
merged as the caption files give them (MSR-VTT-CN's test file already holds the matching sentences).
"""

from __future__ import annotations

import csv
from argparse import Namespace
from pathlib import Path

from dsmoe.shards.layouts.base import LayoutResult, describe_json, load_json, other_files_hint
from dsmoe.shards.layouts.captions import merge_caption_files, parse_caption_file
from dsmoe.shards.records import RawFormatError, RawRecord
from dsmoe.shards.video import VIDEO_EXTENSIONS

__all__ = ["read_msrvtt", "index_videos"]

ANNOTATION_NAMES = ("MSRVTT_data.json", "annotation/MSRVTT_data.json", "msrvtt_data/MSRVTT_data.json")
SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def index_videos(directory: Path) -> dict[str, Path]:
    """Video files under ``directory`` by name without extension (the first in sorted order wins)."""
    index: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            index.setdefault(path.stem, path)
    return index


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise RawFormatError(f"{path}: no such file ({what})")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [h for h in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RawFormatError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    missing = [column for column in required if column not in header]
    if not rows or missing:
        raise RawFormatError(f"{path}: expected a CSV file with the columns {list(required)} ({what}); found "
                             f"{'no rows' if not rows else 'columns ' + str(header)}")
    return rows


def read_msrvtt(root: Path, *, annotations: Path | None = None, videos_dir: Path | None = None,
                test_list: Path | None = None, train_list: Path | None = None,
                zh_captions: list[Path] | None = None) -> LayoutResult:
    """Read MSR-VTT into one video record per video with English (and Chinese) captions."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise RawFormatError(f"dataset root {str(root)!r} does not exist or is not a directory")
    if annotations is not None:
        path = Path(annotations).expanduser().absolute()
    else:
        path = next((root / n for n in ANNOTATION_NAMES if (root / n).is_file()), None)
        if path is None:
            raise RawFormatError(f"no MSR-VTT annotation in {str(root)!r}: looked for {' or '.join(ANNOTATION_NAMES)}"
                                 + other_files_hint(root, exclude="msrvtt"))
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
            or not isinstance(data.get("sentences"), list):
        raise RawFormatError(f"{path}: expected MSRVTT_data.json, an object with 'videos' and 'sentences' lists; "
                             f"found {describe_json(data)}")
    videos_root = Path(videos_dir).expanduser().absolute() if videos_dir is not None else root
    if not videos_root.is_dir():
        raise RawFormatError(f"{videos_root}: no such directory (--videos)")
    files = index_videos(videos_root)
    if not files:
        raise RawFormatError(f"{videos_root}: no video files ({', '.join(VIDEO_EXTENSIONS[:4])}, ...) found")
    result = LayoutResult(files_read=[str(path)], image_dir=str(videos_root))

    order: list[tuple[str, str]] = []  # (video_id, official split) in annotation order
    for index, video in enumerate(data["videos"]):
        if not isinstance(video, dict) or not isinstance(video.get("video_id"), str) \
                or not isinstance(video.get("split"), str):
            raise RawFormatError(f"{path}: videos[{index}] must be an object with string 'video_id' and 'split', "
                                 f"found {str(video)[:100]!r}")
        order.append((video["video_id"], video["split"]))
    captions: dict[str, list[str]] = {}
    for index, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("video_id"), str) \
                or not isinstance(sentence.get("caption"), str):
            raise RawFormatError(f"{path}: sentences[{index}] must be an object with string 'video_id' and "
                                 f"'caption', found {str(sentence)[:100]!r}")
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    known = {video_id for video_id, _ in order}
    orphans = sorted(set(captions) - known)
    if orphans:
        result.notes.append(f"{len(orphans)} sentence video_id(s) not among the videos, e.g. {orphans[:3]}")

    split_of: dict[str, str] = {}
    test_caption: dict[str, str] = {}
    if test_list is not None:
        rows = _read_csv(test_list, ("video_id", "sentence"), "the 1k-A test list, e.g. MSRVTT_JSFUSION_test.csv")
        result.files_read.append(str(test_list))
        for row in rows:
            test_caption.setdefault(row["video_id"], row["sentence"])
            split_of[row["video_id"]] = "test"
        unknown = sorted(set(test_caption) - known)
        if unknown:
            raise RawFormatError(f"{test_list}: {len(unknown)} video_id(s) not in {path.name}, e.g. {unknown[:3]}: "
                                 f"is it a list of another dataset?")
        if train_list is not None:
            rows = _read_csv(train_list, ("video_id",), "the training list, e.g. MSRVTT_train.9k.csv")
            result.files_read.append(str(train_list))
            unknown = sorted({row["video_id"] for row in rows} - known)
            if unknown:
                raise RawFormatError(f"{train_list}: {len(unknown)} video_id(s) not in {path.name}, e.g. "
                                     f"{unknown[:3]}: is it a list of another dataset?")
            for row in rows:
                split_of.setdefault(row["video_id"], "train")
        else:
            for video_id, _ in order:
                split_of.setdefault(video_id, "train")
        left_out = [video_id for video_id, _ in order if video_id not in split_of]
        result.notes.append(f"1k-A protocol: {len(test_caption)} test videos with their listed sentence; "
                            f"{sum(s == 'train' for s in split_of.values())} training videos"
                            + (f"; {len(left_out)} videos in neither list are not part of it" if left_out else ""))
    elif train_list is not None:
        raise RawFormatError("--train-list needs --test-list (the 1k-A protocol)")

    for video_id, official in order:
        if test_list is not None:
            if video_id not in split_of:
                continue
            split = split_of[video_id]
        else:
            split = SPLITS.get(official, official)
        video_captions = [test_caption[video_id]] if split == "test" and video_id in test_caption \
            else captions.get(video_id, [])
        file = files.get(video_id)
        source = str(file.relative_to(videos_root)) if file is not None else f"{video_id}.mp4"
        result.records.append(RawRecord(split=split, image_path=file if file is not None else videos_root / source,
                                        source=source, captions={"en": video_captions}, image_id=video_id,
                                        video=True))
    zh_files = []
    for zh_path in zh_captions or []:
        zh_files.append(parse_caption_file(Path(zh_path).expanduser().absolute(), "zh", kind="dataset"))
        result.files_read.append(str(zh_path))
    result.records, reports = merge_caption_files(result.records, zh_files)
    result.caption_reports += reports
    return result


def read_from_args(args: Namespace) -> LayoutResult:
    return read_msrvtt(args.root, annotations=args.annotations, videos_dir=args.videos, test_list=args.test_list,
                       train_list=args.train_list, zh_captions=args.zh_captions)
