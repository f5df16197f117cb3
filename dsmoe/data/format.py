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

from dsmoe.data.location import DEFAULT_READS, RemoteReads, UnsafeName, child, is_local, read_bytes

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


class ManifestError(ValueError):
    """A manifest that cannot be used (not the format, or a shard entry that is not a plain file name); the
    message names the manifest."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as its split's manifest lists it."""

    address: str  # a local path, a URL or a pipe: command (see dsmoe.data.location)
    samples: int
    bytes: int | None = None  # None: not recorded
    sha256: str | None = None


@dataclass(frozen=True)
class SplitInfo:
    entries: list[ShardEntry]
    samples: int
    captions: int  # of the language asked for

    @property
    def shards(self) -> list[str]:
        """Each shard's address."""
        return [entry.address for entry in self.entries]

    @property
    def shard_samples(self) -> list[int]:
        """Samples of each shard, as its manifest lists them."""
        return [entry.samples for entry in self.entries]


def manifest_address(shard_dir: str | Path, split: str) -> str:
    """Where ``split``'s manifest is: a path, a URL or a pipe: command (``dsmoe.data.location``)."""
    return child(shard_dir, f"{split}.manifest.json")


def read_split(shard_dir: str | Path, split: str, language: str = SOURCE_LANGUAGE,
               reads: RemoteReads = DEFAULT_READS) -> SplitInfo:
    """The shards and counts of ``split`` from its manifest, read from ``shard_dir``: a directory, or a URL prefix
    or pipe: command (``dsmoe.data.location``), where the shards are too. ``ManifestError`` for a manifest that
    is not one (every shard name must be a plain file name)."""
    try:
        address = manifest_address(shard_dir, split)
    except UnsafeName as exc:
        raise ManifestError(f"split {exc}") from None
    try:
        manifest = json.loads(read_bytes(address, reads))
    except FileNotFoundError:
        local = Path(shard_dir) if is_local(shard_dir) else None
        found = sorted(p.name for p in local.glob("*.manifest.json")) if local and local.is_dir() else []
        raise FileNotFoundError(f"no manifest for split '{split}' in {shard_dir} (found: {found or 'none'}); "
                                f"write the shards with tools/make_shards.py") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{address} is not JSON ({exc})") from None
    try:
        entries = [_entry(shard_dir, item) for item in manifest["shards"]]
        samples = _count(manifest["samples"])
        captions = manifest["captions"].get(language, 0)
    except UnsafeName as exc:
        raise ManifestError(f"{address} lists a shard name that is not a plain file name: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ManifestError(f"{address} is not a dsmoe shard manifest: {type(exc).__name__}: {exc}") from None
    missing = [e.address for e in entries if is_local(e.address) and not Path(e.address).is_file()]
    if missing:
        raise FileNotFoundError(f"{address} lists shards that do not exist: {missing[:3]}")
    return SplitInfo(entries=entries, samples=samples, captions=_count(captions))


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _entry(shard_dir: str | Path, item: dict) -> ShardEntry:
    size, digest = item.get("bytes"), item.get("sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"shard {item.get('name')!r}: sha256 {digest!r} is not a hex digest")
    return ShardEntry(child(shard_dir, item["name"]), _count(item["samples"]),
                      None if size is None else _count(size), digest)


def sample_label(meta: dict) -> int:
    """The retrieval label of a sample: the person id, or (image-text data) a stable 63-bit hash of the image id."""
    if "pid" in meta:
        return int(meta["pid"])
    digest = hashlib.blake2b(str(meta["image_id"]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
