"""Readers of the benchmarks' raw layouts, one registry entry per ``--dataset`` name.

Each reader turns a dataset release into :class:`dsmoe.shards.records.RawRecord` s (one per image or video,
captions keyed by language, a person id or the dataset's own image/video id) plus the list of files read and notes,
without dropping anything: faults of single records (missing files, blank captions, duplicates, unknown splits)
are left for the shard writer to report; a file that is not what the layout expects raises
:class:`~dsmoe.shards.records.RawFormatError` naming the file and what was expected.

* :mod:`~dsmoe.shards.layouts.person` - CUHK-PEDES, ICFG-PEDES, RSTPReid.
* :mod:`~dsmoe.shards.layouts.multi30k` - Multi30K task 1 / task 2 over the Flickr30K images.
* :mod:`~dsmoe.shards.layouts.coco` - MSCOCO with Karpathy's split, STAIR Captions (ja) and COCO-CN (zh).
* :mod:`~dsmoe.shards.layouts.msrvtt` - MSR-VTT videos, official split or 1k-A, MSR-VTT-CN (zh).
* :mod:`~dsmoe.shards.layouts.generic` - JSON lines, and Hugging Face ``datasets`` datasets.
* :mod:`~dsmoe.shards.layouts.captions` - caption files merged into samples: machine translations (MLA/DASD
  JSON, NRCCR ``cap_id caption`` lines, CCLM JSON records) and COCO-format caption files.

The module docstrings state what each reader assumes about the release where a detail could not be verified.
"""
from __future__ import annotations

import importlib
from argparse import Namespace
from dataclasses import dataclass

from dsmoe.shards.layouts.base import LayoutResult
from dsmoe.shards.records import RawFormatError


@dataclass(frozen=True)
class Layout:
    """A ``--dataset``: its reader (``module:function`` of ``dsmoe.shards.layouts``, called with the parsed
    arguments and imported only when used), the dataset-specific options it takes, and the one it requires."""

    reader: str
    options: tuple[str, ...] = ()
    required: str = "root"
    help: str = ""

    def read(self, args: Namespace) -> LayoutResult:
        if getattr(args, self.required, None) is None:
            raise RawFormatError(f"--dataset {args.dataset} needs --{self.required.replace('_', '-')} ({self.help})")
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(f"dsmoe.shards.layouts.{module}"), function)(args)


LAYOUTS: dict[str, Layout] = {
    "cuhk-pedes": Layout("person:read_from_args", help="the raw dataset directory"),
    "icfg-pedes": Layout("person:read_from_args", help="the raw dataset directory"),
    "rstpreid": Layout("person:read_from_args", help="the raw dataset directory"),
    "multi30k": Layout("multi30k:read_from_args", ("task", "languages", "test_set", "images"),
                       help="the raw dataset directory"),
    "coco": Layout("coco:read_from_args", ("stair", "coco_cn", "split_source", "images", "annotations"),
                   help="the raw dataset directory"),
    "msrvtt": Layout("msrvtt:read_from_args", ("videos", "test_list", "train_list", "zh_captions", "annotations"),
                     help="the raw dataset directory"),
    "jsonl": Layout("generic:read_jsonl_from_args", ("images", "annotations", "default_split"),
                    required="annotations", help="the JSON-lines file"),
    "hf": Layout("generic:read_hf_from_args", ("hf", "hf_config", "image_column", "caption_columns", "split_column",
                                               "id_column", "images", "default_split"),
                 required="hf", help="a save_to_disk directory or a dataset name"),
}
DATASET_OPTIONS = sorted({option for layout in LAYOUTS.values() for option in layout.options})


def read_dataset(args: Namespace) -> LayoutResult:
    """Read the raw layout that ``args`` (the converter's parsed command line) describe; a RawFormatError names
    an option that does not apply to the dataset, or a missing required one."""
    layout = LAYOUTS[args.dataset]
    for option in DATASET_OPTIONS:
        if getattr(args, option) not in (None, []) and option not in layout.options:
            users = [name for name, other in LAYOUTS.items() if option in other.options]
            raise RawFormatError(f"--{option.replace('_', '-')} does not apply to --dataset {args.dataset} "
                                 f"(only to {', '.join(users)})")
    return layout.read(args)
