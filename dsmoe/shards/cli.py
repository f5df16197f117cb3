"""Convert a raw retrieval dataset into WebDataset shards with manifests.

Datasets (``--dataset``) and what they read (details in ``dsmoe/shards/layouts/``):

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

Run it as ``python -m dsmoe.shards`` (installed), ``dsmoe-shards`` or ``python tools/make_shards.py`` (a checkout).
Example::

    python -m dsmoe.shards --dataset cuhk-pedes --root data/CUHK-PEDES --out shards/cuhk-pedes \\
        --resize 384x128 --workers 8 --verify

``python -m dsmoe.shards verify DIR`` checks shards already written, writing nothing (the first problem of each
shard, then how many more).

Exit status: 0 on success, 1 when --verify (or verify) finds problems, 2 on a user error (bad arguments, a raw layout that
does not parse, skipped records or unmatched caption entries under --strict) or a failed write (the file is
named), 130 when interrupted (a re-run continues from the shards already finished).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dsmoe.shards.layouts import LAYOUTS, read_dataset
from dsmoe.shards.layouts.base import LayoutResult
from dsmoe.shards.layouts.captions import describe_caption_report, merge_caption_files, parse_caption_file, \
    parse_translation_option
from dsmoe.shards.records import RawFormatError, ShardWriteError
from dsmoe.shards.tasks import SplitReport
from dsmoe.shards.verify import verify_shards
from dsmoe.shards.workers import DEFAULT_FRAMES
from dsmoe.shards.writer import format_accounting, format_details, write_shards

MAX_SKIPS_SHOWN = 10


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
        prog="python -m dsmoe.shards",
        description="Convert a raw retrieval dataset (person, image-text or video-text) into WebDataset tar shards "
                    "with manifests.",
    )
    parser.add_argument("--dataset", required=True, choices=list(LAYOUTS))
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


def _print_skips(reports: dict[str, SplitReport]) -> None:
    for split, report in reports.items():
        for skip in report.skips[:MAX_SKIPS_SHOWN]:
            print(f"  skipped {split} {skip['source']}: {skip['reason']}")
        if len(report.skips) > MAX_SKIPS_SHOWN:
            print(f"  ... and {len(report.skips) - MAX_SKIPS_SHOWN} more {split} skips (see the manifest)")


def _tool_args(args: argparse.Namespace, resize: tuple[int, int] | None, layout: LayoutResult) -> dict[str, Any]:
    values: dict[str, Any] = {"tool": "tools/make_shards.py"}  # the name every manifest so far records
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


def verify_main(argv: list[str]) -> int:
    """``python -m dsmoe.shards verify DIR``: check existing shards against their manifests, writing nothing."""
    parser = argparse.ArgumentParser(prog="python -m dsmoe.shards verify",
                                     description="Re-read shards against their manifests (checksums, members, keys, "
                                                 "JSON, counts); the first problem of each shard is reported.")
    parser.add_argument("out", type=Path, help="a directory written by python -m dsmoe.shards")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return report_verification(args.out)


def report_verification(out: Path) -> int:
    """Print what ``verify_shards`` finds; 1 when there are problems."""
    problems = verify_shards(out)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"verify: ok ({out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
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
            progress=True,
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
        return report_verification(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
