"""Convert a raw person-retrieval dataset (CUHK-PEDES, ICFG-PEDES, RSTPReid) into WebDataset shards.

Example::

    python tools/make_shards.py --dataset cuhk-pedes --root data/CUHK-PEDES --out shards/cuhk-pedes \\
        --resize 384x128 --workers 8 --verify

Exit status: 0 on success, 1 when --verify finds problems, 2 on a user error (bad arguments, a raw layout that
does not parse, skipped records under --strict).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import dsmoe  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe.data.raw_formats import DATASETS, RawFormatError, read_person_layout  # noqa: E402
from dsmoe.data.shards import ShardWriteError, SplitReport, format_accounting, verify_shards, write_shards  # noqa: E402

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
        prog="make_shards.py",
        description="Convert a raw person-retrieval dataset into WebDataset tar shards with manifests.",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root", required=True, type=Path, help="raw dataset directory (annotation + imgs/)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and manifests")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=2000)
    parser.add_argument("--max-shard-bytes", type=_positive_int, default=1 << 30)
    parser.add_argument("--workers", type=_positive_int, default=1)
    parser.add_argument("--resize", default=None, help="re-encode every image at HxW, e.g. 384x128")
    parser.add_argument("--strict", action="store_true", help="fail (exit 2) when any record is skipped")
    parser.add_argument("--verify", action="store_true", help="re-read the shards after writing them")
    return parser


def _print_skips(reports: dict[str, SplitReport]) -> None:
    for split, report in reports.items():
        for skip in report.skips[:MAX_SKIPS_SHOWN]:
            print(f"  skipped {split} {skip['source']}: {skip['reason']}")
        if len(report.skips) > MAX_SKIPS_SHOWN:
            print(f"  ... and {len(report.skips) - MAX_SKIPS_SHOWN} more {split} skips (see the manifest)")


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message (or --help)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        resize = parse_resize(args.resize) if args.resize is not None else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        records = read_person_layout(args.dataset, args.root)
        tool_args = {
            "tool": "tools/make_shards.py",
            "dataset": args.dataset,
            "root": str(args.root),
            "samples_per_shard": args.samples_per_shard,
            "max_shard_bytes": args.max_shard_bytes,
            "resize": list(resize) if resize else None,
            "strict": args.strict,
        }
        reports = write_shards(
            records,
            args.out,
            dataset=args.dataset,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            workers=args.workers,
            resize=resize,
            strict=args.strict,
            tool_args=tool_args,
        )
    except (RawFormatError, ShardWriteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_accounting(reports))
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
