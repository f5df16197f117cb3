"""The shard format: file and member names, the manifest, and reading a split's manifest (no torch, no PIL).

Layout of a shard directory::

    train-000000.tar  train-000001.tar ...  train.manifest.json
    val-000000.tar ...                      val.manifest.json
    test-000000.tar ...                     test.manifest.json

Each sample is a group of tar members sharing a key ``{split}_{n:07d}`` (``n`` counts the split's accepted records
in annotation order; keys never contain a dot, since WebDataset splits member names at the first dot):

* images: ``{key}.jpg`` then ``{key}.json``;
* videos: ``{key}.jpg`` (the first sampled frame, so image readers work unchanged), ``{key}.frame00.jpg`` ...
  ``{key}.frame{N-1}.jpg`` (``N`` frames sampled uniformly), then ``{key}.json`` with ``"frames": N``.

The json member is ``{"key", "pid", "captions": {"en": [...]}, "source", "split", "dataset"}`` for person data
and ``{"key", "image_id", "captions": {"en": [...], "de": [...], ...}, "source", "split", "dataset"}`` (plus
``"frames"`` for videos) for image-text data. Nothing is pickled; captions are UTF-8 JSON strings.

``{split}.manifest.json`` records the format and version, the dataset, the split, the sample, caption (per language)
and image counts, every shard with its samples, bytes and sha256, every skipped input with its reason, and the
arguments of the tool that wrote it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dsmoe.shards.location import child, is_local, read_bytes

FORMAT_NAME = "dsmoe-shards"
FORMAT_VERSION = 1
KNOWN_SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCE_LANGUAGE = "en"
"""Captions are keyed by language; English is the source language of every dataset."""

SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
MEMBER_NAME = re.compile(r"^(?P<key>[^.]+)\.(?P<ext>(?:frame\d{2,}\.)?[^.]+)$")
FRAME_EXT = re.compile(r"^frame(\d{2,})\.jpg$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def frame_member(index: int) -> str:
    """The member extension of a video's frame ``index``."""
    return f"frame{index:02d}.jpg"


@dataclass(frozen=True)
class SplitInfo:
    shards: list[str]  # each shard's address: a local path, a URL or a pipe: command (see dsmoe.shards.location)
    samples: int
    captions: int  # of the language asked for
    shard_samples: list[int]  # samples of each shard, as its manifest lists them


def manifest_address(shard_dir: str | Path, split: str) -> str:
    """Where ``split``'s manifest is: a path, a URL or a pipe: command (``dsmoe.shards.location``)."""
    return child(shard_dir, f"{split}.manifest.json")


def read_split(shard_dir: str | Path, split: str, language: str = SOURCE_LANGUAGE) -> SplitInfo:
    """The shards and counts of ``split`` from its manifest, read from ``shard_dir``: a directory, or a URL prefix
    or pipe: command (``dsmoe.shards.location``), where the shards are too."""
    address = manifest_address(shard_dir, split)
    try:
        manifest = json.loads(read_bytes(address))
    except FileNotFoundError:
        local = Path(shard_dir) if is_local(shard_dir) else None
        found = sorted(p.name for p in local.glob("*.manifest.json")) if local and local.is_dir() else []
        raise FileNotFoundError(f"no manifest for split '{split}' in {shard_dir} (found: {found or 'none'}); "
                                f"write the shards with tools/make_shards.py") from None
    shards = [child(shard_dir, s["name"]) for s in manifest["shards"]]
    missing = [p for p in shards if is_local(p) and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{address} lists shards that do not exist: {missing[:3]}")
    return SplitInfo(shards=shards, samples=int(manifest["samples"]),
                     captions=int(manifest["captions"].get(language, 0)),
                     shard_samples=[int(s["samples"]) for s in manifest["shards"]])


def sample_label(meta: dict) -> int:
    """The retrieval label of a sample: the person id, or (image-text data) a stable 63-bit hash of the image id."""
    if "pid" in meta:
        return int(meta["pid"])
    digest = hashlib.blake2b(str(meta["image_id"]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
