"""Convert a raw retrieval dataset into WebDataset shards with manifests.

Datasets (``--dataset``) and what they read (details in ``dsmoe/data/raw_formats.py`` and ``dsmoe/data/layouts/``):

* ``cuhk-pedes``, ``icfg-pedes``, ``rstpreid``: ``--root`` with the annotation JSON and ``imgs/``.
* ``multi30k``: ``--root`` = a checkout of github.com/multi30k/dataset, ``--images`` = the Flickr30K images;
  ``--task 1|2``, ``--languages en,de,fr,cs``, ``--test-set test_2016_flickr``.
* ``coco``: ``--root`` with ``dataset_coco.json`` and ``train2014/``, ``val2014/``; ``--stair`` (Japanese),
  ``--coco-cn`` (Chinese), ``--split-source karpathy|coco-cn``.
* ``msrvtt``: ``--root`` with ``MSRVTT_data.json``, ``--videos``; ``--test-list MSRVTT_JSFUSION_test.csv``
  (1k-A), ``--train-list``, ``--zh-captions``, ``--frames 12``.
* ``jsonl``: ``--annotations`` = a JSON-lines file of {image, captions, id?, split?}; ``--images``.
* ``hf``: ``--hf NAME_OR_DIR`` with ``--image-column``, ``--caption-columns``, ``--split-column``, ``--id-column``.

Any dataset takes ``--translations LANG=PATH`` (repeatable): machine-translated captions merged into the same
samples; the file format is detected and reported, and entries whose image is not among the samples are listed.

Example::

    python tools/make_shards.py --dataset cuhk-pedes --root data/CUHK-PEDES --out shards/cuhk-pedes \\
        --resize 384x128 --workers 8 --verify

Exit status: 0 on success, 1 when --verify finds problems, 2 on a user error (bad arguments, a raw layout that
does not parse, skipped records or unmatched caption entries under --strict) or a failed write (the file is
named), 130 when interrupted (a re-run continues from the shards already finished).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

try:
    import dsmoe  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe.data.layouts.base import LayoutResult  # noqa: E402
from dsmoe.data.layouts.captions import describe_caption_report, merge_caption_files, parse_caption_file, \
    parse_translation_option  # noqa: E402
from dsmoe.data.raw_formats import DATASETS, RawFormatError, read_person_layout  # noqa: E402
from dsmoe.data.shards import DEFAULT_FRAMES, ShardWriteError, SplitReport, format_accounting, format_details, \
    verify_shards, write_shards  # noqa: E402

MAX_SKIPS_SHOWN = 10
PERSON = tuple(sorted(DATASETS))
ALL_DATASETS = PERSON + ("multi30k", "coco", "msrvtt", "jsonl", "hf")

# Options that only some datasets use (option dest -> datasets); anything else given is an error.
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "task": ("multi30k",), "languages": ("multi30k",), "test_set": ("multi30k",),
    "stair": ("coco",), "coco_cn": ("coco",), "split_source": ("coco",),
    "videos": ("msrvtt",), "test_list": ("msrvtt",), "train_list": ("msrvtt",), "zh_captions": ("msrvtt",),
    "images": ("multi30k", "coco", "jsonl", "hf"), "annotations": ("coco", "msrvtt", "jsonl"),
    "hf": ("hf",), "hf_config": ("hf",), "image_column": ("hf",), "caption_columns": ("hf",),
    "split_column": ("hf",), "id_column": ("hf",), "default_split": ("jsonl", "hf"),
}


def parse_resize(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``384x128``) into ``(H, W)``; raise ValueError with a readable message."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--resize expects HxW such as 384x128, got {text!r}")
    height, width = (int(p) for p in parts)
    if height < 1 or width < 1:
        raise ValueError(f"--resize needs positive sizes, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Convert a raw retrieval dataset (person, image-text or video-text) into WebDataset tar shards "
                    "with manifests.",
    )
    parser.add_argument("--dataset", required=True, choices=ALL_DATASETS)
    parser.add_argument("--root", type=Path, help="raw dataset directory (all datasets but jsonl and hf)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and manifests")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=2000)
    parser.add_argument("--max-shard-bytes", type=_positive_int, default=1 << 30)
    parser.add_argument("--workers", type=_positive_int, default=1)
    parser.add_argument("--resize", default=None, help="re-encode every image (and video frame) at HxW, e.g. 384x128")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when any record is skipped or any caption entry matches no sample")
    parser.add_argument("--verify", action="store_true", help="re-read the shards after writing them")
    parser.add_argument("--translations", action="append", default=[], metavar="LANG=PATH",
                        help="machine-translated captions to merge (repeatable; format detected from the content)")
    group = parser.add_argument_group("dataset-specific options")
    group.add_argument("--images", type=Path, help="image directory (multi30k: Flickr30K images; coco: the root of "
                                                   "train2014/ val2014/; jsonl/hf: base of relative paths)")
    group.add_argument("--annotations", type=Path,
                       help="annotation file (jsonl: required; coco: dataset_coco.json; msrvtt: MSRVTT_data.json)")
    group.add_argument("--task", type=int, choices=(1, 2), help="multi30k task (default 1)")
    group.add_argument("--languages", help="multi30k caption languages, e.g. en,de,fr,cs (default: all of the task)")
    group.add_argument("--test-set", help="multi30k test set (default test_2016_flickr for task 1, test_2016 for 2)")
    group.add_argument("--stair", type=Path, action="append", help="coco: STAIR Captions files or their directory")
    group.add_argument("--coco-cn", type=Path, help="coco: the COCO-CN directory (coco-cn-version1805v1.1)")
    group.add_argument("--split-source", choices=("karpathy", "coco-cn"),
                       help="coco: whose split defines train/val/test (default karpathy)")
    group.add_argument("--videos", type=Path, help="msrvtt: directory searched for <video_id>.mp4 (default --root)")
    group.add_argument("--test-list", type=Path, help="msrvtt: the 1k-A test list, MSRVTT_JSFUSION_test.csv")
    group.add_argument("--train-list", type=Path, help="msrvtt: training list such as MSRVTT_train.9k.csv")
    group.add_argument("--zh-captions", type=Path, action="append", help="msrvtt: MSR-VTT-CN Chinese caption file(s)")
    group.add_argument("--frames", type=_positive_int, default=DEFAULT_FRAMES,
                       help=f"video frames sampled uniformly per video (default {DEFAULT_FRAMES})")
    group.add_argument("--hf", help="hf: a save_to_disk directory or a datasets.load_dataset name")
    group.add_argument("--hf-config", help="hf: configuration name for load_dataset")
    group.add_argument("--image-column", help="hf: the image column (default image)")
    group.add_argument("--caption-columns", help="hf: COLUMN or LANG=COLUMN, comma separated (default: captions, "
                                                 "caption, sentences or text)")
    group.add_argument("--split-column", help="hf: column giving each row's split (a single Dataset)")
    group.add_argument("--id-column", help="hf: column giving the image id")
    group.add_argument("--default-split", help="jsonl/hf: split of rows that name none (default train)")
    return parser


def _check_applicable(args: argparse.Namespace) -> None:
    for dest, datasets in ONLY_FOR.items():
        if getattr(args, dest) not in (None, []) and args.dataset not in datasets:
            flag = "--" + dest.replace("_", "-")
            raise RawFormatError(f"{flag} does not apply to --dataset {args.dataset} (only to {', '.join(datasets)})")
    if args.dataset not in ("jsonl", "hf") and args.root is None:
        raise RawFormatError(f"--dataset {args.dataset} needs --root (the raw dataset directory)")
    if args.dataset == "jsonl" and args.annotations is None:
        raise RawFormatError("--dataset jsonl needs --annotations (the JSON-lines file)")
    if args.dataset == "hf" and args.hf is None:
        raise RawFormatError("--dataset hf needs --hf NAME_OR_DIR")


def read_dataset(args: argparse.Namespace) -> LayoutResult:
    """Read the raw layout that ``args`` describe (raises RawFormatError)."""
    _check_applicable(args)
    if args.dataset in PERSON:
        return LayoutResult(records=read_person_layout(args.dataset, args.root))
    if args.dataset == "multi30k":
        from dsmoe.data.layouts.multi30k import read_multi30k

        languages = [x.strip() for x in args.languages.split(",") if x.strip()] if args.languages else None
        return read_multi30k(args.root, task=args.task or 1, languages=languages, test_set=args.test_set,
                             images_dir=args.images)
    if args.dataset == "coco":
        from dsmoe.data.layouts.coco import read_coco

        return read_coco(args.root, annotations=args.annotations, images_dir=args.images, stair=args.stair,
                         coco_cn=args.coco_cn, split_source=args.split_source or "karpathy")
    if args.dataset == "msrvtt":
        from dsmoe.data.layouts.msrvtt import read_msrvtt

        return read_msrvtt(args.root, annotations=args.annotations, videos_dir=args.videos,
                           test_list=args.test_list, train_list=args.train_list, zh_captions=args.zh_captions)
    if args.dataset == "jsonl":
        from dsmoe.data.layouts.generic import read_jsonl

        return read_jsonl(args.annotations, images_dir=args.images, default_split=args.default_split or "train")
    from dsmoe.data.layouts.generic import parse_caption_columns, read_hf

    return read_hf(args.hf, config=args.hf_config, image_column=args.image_column or "image",
                   caption_columns=parse_caption_columns(args.caption_columns), split_column=args.split_column,
                   id_column=args.id_column, images_dir=args.images, default_split=args.default_split or "train")


def _print_skips(reports: dict[str, SplitReport]) -> None:
    for split, report in reports.items():
        for skip in report.skips[:MAX_SKIPS_SHOWN]:
            print(f"  skipped {split} {skip['source']}: {skip['reason']}")
        if len(report.skips) > MAX_SKIPS_SHOWN:
            print(f"  ... and {len(report.skips) - MAX_SKIPS_SHOWN} more {split} skips (see the manifest)")


def _tool_args(args: argparse.Namespace, resize: tuple[int, int] | None, layout: LayoutResult) -> dict[str, Any]:
    values: dict[str, Any] = {"tool": "tools/make_shards.py"}
    for name, value in sorted(vars(args).items()):
        if name in ("out", "workers", "verify") or value in (None, []):
            continue  # the output directory, worker count and --verify do not change the shards
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = [str(v) for v in value]
        values[name] = value
    values["resize"] = list(resize) if resize else None
    values["strict"] = args.strict
    values["samples_per_shard"] = args.samples_per_shard
    values["max_shard_bytes"] = args.max_shard_bytes
    if layout.files_read:
        values["files_read"] = layout.files_read
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message (or --help)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        resize = parse_resize(args.resize) if args.resize is not None else None
        translations = [parse_translation_option(text) for text in args.translations]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        layout = read_dataset(args)
        files = [parse_caption_file(path, lang, kind="translation") for lang, path in translations]
        for parsed in files:
            print(f"translations {parsed.language}: {parsed.path}: detected format {parsed.format}")
            layout.files_read.append(parsed.path)
        records, translation_reports = merge_caption_files(layout.records, files)
        caption_reports = layout.caption_reports + translation_reports
        reports = write_shards(
            records,
            args.out,
            dataset=args.dataset,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            workers=args.workers,
            resize=resize,
            frames=args.frames,
            strict=args.strict,
            tool_args=_tool_args(args, resize, layout),
            caption_reports=caption_reports,
            notes=layout.notes,
        )
    except (RawFormatError, ShardWriteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: shards already finished in {args.out} are kept; run the same command again to "
              f"continue", file=sys.stderr)
        return 130
    print(format_accounting(reports))
    details = format_details(reports)
    if details:
        print(details)
    for note in layout.notes:
        print(f"note: {note}")
    for report in caption_reports:
        for line in describe_caption_report(report):
            print(line)
    _print_skips(reports)
    if args.verify:
        problems = verify_shards(args.out)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"verify: ok ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
