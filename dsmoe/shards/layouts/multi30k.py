"""Multi30K (https://github.com/multi30k/dataset) over the Flickr30K images.

Layout of the release (``--root`` is the checkout, or its ``data`` directory)::

    data/task1/image_splits/{train,val,test_2016_flickr}.txt    one Flickr30K file name per line (1000092795.jpg)
    data/task1/raw/{split}.{en,de,fr,cs}[.gz]                    line i = the caption of image i of the split
    data/task2/image_splits/{train,val,test_2016}_images.txt
    data/task2/raw/{split}.{1..5}.{en,de}[.gz]                   five independent captions per image and language

The repository ships the caption files gzip-compressed (``train.en.gz``); both the ``.gz`` and the unpacked
files are read. Task 1 test sets other than test2016 (``test_2017_flickr``, ``test_2018_flickr``,
``test_2017_mscoco``) are chosen with ``test_set``; they become the ``test`` split all the same. Task 2 has only
test2016 (``test_2016``). Split names map ``train -> train``, ``val -> val``, the chosen test set -> ``test``.

Images (``images_dir``, default the first of ``root/flickr30k-images``, ``root/flickr30k_images``,
``root/images``, ``root/../flickr30k-images``) are looked up by the file name of the split list; the image id is
that name without ``.jpg``. A language missing for one split is an error when it was asked for explicitly,
otherwise it is left out for that split and noted. Each caption file must have exactly one line per image of its
split (a mismatch means the files are not aligned and is an error naming both files).
Assumption: the split lists and caption files are UTF-8; a blank caption line is an empty caption (reported).
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from dsmoe.shards.layouts.base import LayoutResult, find_dir, other_files_hint, read_lines, relative_source
from dsmoe.shards.records import RawFormatError, RawRecord, valid_language

__all__ = ["read_multi30k"]

TASK_LANGUAGES = {1: ("en", "de", "fr", "cs"), 2: ("en", "de")}
TEST_SETS = {1: ("test_2016_flickr", "test_2017_flickr", "test_2018_flickr", "test_2017_mscoco"), 2: ("test_2016",)}
IMAGE_DIR_NAMES = ("flickr30k-images", "flickr30k_images", "images", "../flickr30k-images")


def _data_dir(root: Path) -> Path:
    for candidate in (root / "data", root):
        if (candidate / "task1").is_dir() or (candidate / "task2").is_dir():
            return candidate
    raise RawFormatError(f"{root}: not a Multi30K checkout: expected data/task1/image_splits/ and data/task1/raw/ "
                         f"(https://github.com/multi30k/dataset)" + other_files_hint(root, exclude="multi30k"))


def _split_list(task_dir: Path, task: int, split: str) -> Path:
    name = f"{split}.txt" if task == 1 else f"{split}_images.txt"
    return task_dir / "image_splits" / name


def read_multi30k(root: Path, *, task: int = 1, languages: list[str] | None = None,
                  test_set: str | None = None, images_dir: Path | None = None) -> LayoutResult:
    """Read Multi30K task 1 or 2 into one record per image with captions per language."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise RawFormatError(f"dataset root {str(root)!r} does not exist or is not a directory")
    if task not in TASK_LANGUAGES:
        raise RawFormatError(f"--task must be 1 or 2 for multi30k, got {task!r}")
    explicit = languages is not None
    languages = list(languages) if languages is not None else list(TASK_LANGUAGES[task])
    for lang in languages:
        if not valid_language(lang):
            raise RawFormatError(f"--languages: {lang!r} is not a language tag")
    test_set = test_set or TEST_SETS[task][0]
    if test_set not in TEST_SETS[task]:
        raise RawFormatError(f"--test-set {test_set!r} is not a Multi30K task {task} test set; expected one of "
                             f"{list(TEST_SETS[task])}")
    task_dir = _data_dir(root) / f"task{task}"
    if not task_dir.is_dir():
        raise RawFormatError(f"{task_dir}: missing (Multi30K task {task})")
    images = find_dir(images_dir, root, IMAGE_DIR_NAMES, "the Flickr30K images (--images)")
    result = LayoutResult(image_dir=str(images))
    for split, out_split in (("train", "train"), ("val", "val"), (test_set, "test")):
        list_path = _split_list(task_dir, task, split)
        names = read_lines(list_path, f"the Multi30K {split} image list")
        result.files_read.append(str(list_path))
        captions: dict[str, list[list[str]]] = {}
        for lang in languages:
            columns = [None] if task == 1 else list(range(1, 6))
            per_image: list[list[str]] | None = [[] for _ in names]
            for column in columns:
                base = f"{split}.{lang}" if column is None else f"{split}.{column}.{lang}"
                path = task_dir / "raw" / base
                if not path.is_file() and not path.with_name(base + ".gz").is_file():
                    if explicit:
                        raise RawFormatError(f"{path}[.gz]: missing, but --languages asks for {lang!r} "
                                             f"(Multi30K task {task}, split {split})")
                    result.notes.append(f"{split}: no {lang} captions ({base}[.gz] missing); left out")
                    per_image = None
                    break
                lines = read_lines(path, f"Multi30K {lang} captions")
                result.files_read.append(str(path) if path.is_file() else str(path) + ".gz")
                if len(lines) != len(names):
                    raise RawFormatError(f"{path}[.gz]: {len(lines)} caption lines, but {list_path} lists "
                                         f"{len(names)} images: the files are not aligned")
                for i, line in enumerate(lines):
                    per_image[i].append(line.strip())
            if per_image is not None:
                captions[lang] = per_image
        if not captions:
            raise RawFormatError(f"{task_dir / 'raw'}: no caption file for split {split} in any of {languages}")
        for i, name in enumerate(names):
            where = f"line {i + 1}"
            source = relative_source(list_path, where, name.strip())
            stem = source.rsplit("/", 1)[-1]
            image_id = stem[:-4] if stem.lower().endswith(".jpg") else stem
            result.records.append(RawRecord(
                split=out_split,
                image_path=images / source,
                source=source,
                captions={lang: per_image[i] for lang, per_image in captions.items()},
                image_id=image_id,
            ))
    return result


def read_from_args(args: Namespace) -> LayoutResult:
    languages = [x.strip() for x in args.languages.split(",") if x.strip()] if args.languages else None
    return read_multi30k(args.root, task=args.task or 1, languages=languages, test_set=args.test_set,
                         images_dir=args.images)
