"""The converter's units of work: records screened (``Candidate``), images to prepare (``Work`` in a ``PrepTask``,
the ``Probe`` of each), planned samples (``Sample``) and shards (``ShardTask``, ``ShardResult``), and the
accounting of each split (``SplitReport``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsmoe.shards.records import BlobRef, RawRecord
from dsmoe.shards.tar import member_bytes


@dataclass
class SplitReport:
    """Accounting of one split: ``inputs == written + skipped``."""

    split: str
    inputs: int = 0
    written: int = 0
    skipped: int = 0
    shards: int = 0
    skips: list[dict[str, str]] = field(default_factory=list)
    captions: dict[str, int] = field(default_factory=dict)
    empty_captions_dropped: dict[str, int] = field(default_factory=dict)
    images: int = 0

    @property
    def balanced(self) -> bool:
        """Whether every input record is accounted for."""
        return self.inputs == self.written + self.skipped


@dataclass(frozen=True)
class Candidate:
    index: int
    record: RawRecord
    captions: tuple[tuple[str, tuple[str, ...]], ...]  # (language, captions) with blank ones removed
    dropped: tuple[tuple[str, int], ...]  # (language, blank captions removed)


@dataclass(frozen=True)
class Work:
    path: str | None
    blob: BlobRef | None
    video: bool


@dataclass(frozen=True)
class PrepTask:
    chunk: int
    spill_dir: str
    work: tuple[Work, ...]
    resize: tuple[int, int] | None
    frames: int


@dataclass(frozen=True)
class Probe:
    reason: str | None  # None when the image or video is usable
    raw_sha256: str = ""
    passthrough: bool = False  # the image member is the original bytes
    from_file: bool = False  # ... read again from the original file (not spilled)
    sizes: tuple[int, ...] = ()  # image members: one for an image, one per frame for a video
    offsets: tuple[int, ...] = ()  # positions of those members in the spill file
    spill: str = ""


@dataclass(frozen=True)
class Sample:
    key: str
    image_path: str
    raw_sha256: str
    passthrough: bool
    from_file: bool
    video: bool
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    spill: str
    json_bytes: bytes
    label: Any  # pid (person data) or the image identity
    caption_counts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ShardTask:
    out_dir: str
    name: str
    samples: tuple[Sample, ...]
    plan: str
    expected_bytes: int
    previous_sha256: str | None


@dataclass(frozen=True)
class ShardResult:
    name: str
    sha256: str
    bytes: int
    kept: bool


def sample_bytes(sample: Sample) -> int:
    """Tar bytes of one sample's members (a video repeats its first frame as ``.jpg``)."""
    images = sum(member_bytes(size) for size in sample.sizes)
    if sample.video:
        images += member_bytes(sample.sizes[0])
    return images + member_bytes(len(sample.json_bytes))
