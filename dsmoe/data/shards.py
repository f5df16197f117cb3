"""Write raw records (person retrieval, image-text, video-text) into WebDataset tar shards, with manifests, and
verify them.

Layout of an output directory::

    train-000000.tar  train-000001.tar ...  train.manifest.json
    val-000000.tar ...                      val.manifest.json
    test-000000.tar ...                     test.manifest.json

Each sample is a group of tar members sharing a key ``{split}_{n:07d}`` (``n`` counts the split's accepted
records in annotation order; keys never contain a dot, since WebDataset splits member names at the first dot):

* images: ``{key}.jpg`` then ``{key}.json``;
* videos: ``{key}.jpg`` (the first sampled frame, so image readers work unchanged), ``{key}.frame00.jpg`` ...
  ``{key}.frame{N-1}.jpg`` (``N`` frames sampled uniformly), then ``{key}.json`` with ``"frames": N``.

The json member is ``{"key", "pid", "captions": {"en": [...]}, "source", "split", "dataset"}`` for person data
and ``{"key", "image_id", "captions": {"en": [...], "de": [...], ...}, "source", "split", "dataset"}`` (plus
``"frames"`` for videos) for image-text data. Nothing is pickled; captions are UTF-8 JSON strings.

How the work is organised (so that the output does not depend on the number of workers, and every image is
decoded and encoded once):

1. *Screen* (main process): unknown splits and records without a non-empty caption are skipped; blank captions
   inside a kept record are dropped and counted per language.
2. *Prepare* (pool, chunks of records in order): every image or video is read, hashed and decoded; unreadable or
   missing ones are skipped. An RGB JPEG file kept at its size is passed through unchanged (checked with a
   reduced-size "draft" decode, which reads all of its entropy-coded data); anything else (other formats,
   ``resize``, video frames, images stored in a Hugging Face dataset) is encoded once here, to JPEG quality 95,
   and *spilled* to ``.make_shards.spill/<chunk>.bin`` so that the shard writer copies the bytes instead of
   encoding again. Each record's member sizes are returned.
3. *Plan* (main process): duplicates (same split and image id, or source for person data, as an earlier
   accepted record) are skipped, keys are assigned and shard boundaries are cut: a shard ends when it holds
   ``samples_per_shard`` samples, or when adding the next sample would make the tar file larger than
   ``max_shard_bytes``. Tar sizes are computed exactly from the member sizes (512-byte headers and blocks,
   10 KiB records), so the byte limit holds for the real files; a single sample larger than the limit gets a
   shard of its own.
4. *Build* (pool, one task per shard): each worker writes a whole shard to ``name.tar.tmp-<pid>`` and renames
   it, so a shard appears under its final name only when complete. A shard whose file exists with the checksum
   recorded for the same plan (in the manifest of a previous run, or in the journal of an interrupted one) is
   kept as it is.
5. *Manifests* (main process): ``{split}.manifest.json`` is written atomically after all shards; shard files
   of a split that are no longer listed, manifests of splits that have no input any more, the spill directory
   and the journal are then removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from dsmoe.data.raw_formats import BlobRef, RawRecord, caption_map

__all__ = [
    "DEFAULT_FRAMES",
    "KNOWN_SPLITS",
    "REASON_DUPLICATE",
    "REASON_DUPLICATE_ID",
    "REASON_EMPTY_CAPTIONS",
    "REASON_IMAGE_MISSING",
    "REASON_IMAGE_UNREADABLE",
    "REASON_UNKNOWN_SPLIT",
    "REASON_VIDEO_MISSING",
    "REASON_VIDEO_UNREADABLE",
    "ShardWriteError",
    "SplitReport",
    "format_accounting",
    "format_details",
    "verify_shards",
    "write_shards",
]

KNOWN_SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_NAME = "dsmoe-shards"
FORMAT_VERSION = 1
JPEG_QUALITY = 95
DEFAULT_FRAMES = 12
JOURNAL_NAME = ".make_shards.journal.jsonl"
SPILL_NAME = ".make_shards.spill"
MAX_CHUNK = 32  # records per prepare task (videos: 2)

# Skip reasons start with one of these (details may follow after ": ").
REASON_IMAGE_MISSING = "image missing"
REASON_IMAGE_UNREADABLE = "image unreadable"
REASON_VIDEO_MISSING = "video missing"
REASON_VIDEO_UNREADABLE = "video unreadable"
REASON_EMPTY_CAPTIONS = "no non-empty caption"
REASON_DUPLICATE = "duplicate of an earlier record with the same split and source"
REASON_DUPLICATE_ID = "duplicate of an earlier record with the same split and image id"
REASON_UNKNOWN_SPLIT = "unknown split"

_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
_MEMBER_NAME = re.compile(r"^(?P<key>[^.]+)\.(?P<ext>(?:frame\d{2,}\.)?[^.]+)$")
_FRAME_EXT = re.compile(r"^frame(\d{2,})\.jpg$")
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")

T = TypeVar("T")
R = TypeVar("R")


class ShardWriteError(ValueError):
    """The shards could not be written as asked (bad options, skipped records under ``strict``, a failed write)."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (a full disk, say) into an error that names the file."""
    try:
        yield
    except OSError as exc:
        raise ShardWriteError(f"could not write {path}: {exc.strerror or exc}") from None


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


# ------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class _Candidate:
    index: int
    record: RawRecord
    captions: tuple[tuple[str, tuple[str, ...]], ...]  # (language, captions) with blank ones removed
    dropped: tuple[tuple[str, int], ...]  # (language, blank captions removed)


@dataclass(frozen=True)
class _Work:
    path: str | None
    blob: BlobRef | None
    video: bool


@dataclass(frozen=True)
class _PrepTask:
    chunk: int
    spill_dir: str
    work: tuple[_Work, ...]
    resize: tuple[int, int] | None
    frames: int


@dataclass(frozen=True)
class _Probe:
    reason: str | None  # None when the image or video is usable
    raw_sha256: str = ""
    passthrough: bool = False  # the image member is the original bytes
    from_file: bool = False  # ... read again from the original file (not spilled)
    sizes: tuple[int, ...] = ()  # image members: one for an image, one per frame for a video
    offsets: tuple[int, ...] = ()  # positions of those members in the spill file
    spill: str = ""


@dataclass(frozen=True)
class _Sample:
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
class _ShardTask:
    out_dir: str
    name: str
    samples: tuple[_Sample, ...]
    plan: str
    expected_bytes: int
    previous_sha256: str | None


@dataclass(frozen=True)
class _ShardResult:
    name: str
    sha256: str
    bytes: int
    kept: bool


# ---------------------------------------------------------------------------------------------- small helpers


def _member_bytes(size: int) -> int:
    """On-disk size of one tar member: a header block plus the data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(member_total: int) -> int:
    """On-disk size of a tar file whose members take ``member_total`` bytes (end blocks, record padding)."""
    return -(-(member_total + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _sample_bytes(sample: _Sample) -> int:
    """Tar bytes of one sample's members (a video repeats its first frame as ``.jpg``)."""
    images = sum(_member_bytes(size) for size in sample.sizes)
    if sample.video:
        images += _member_bytes(sample.sizes[0])
    return images + _member_bytes(len(sample.json_bytes))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with _writing(tmp), open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_jpeg(image: Image.Image, resize: tuple[int, int] | None) -> bytes:
    """RGB, optionally resized (bicubic) to ``resize`` = (H, W), JPEG quality 95."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # (convert and a same-size resize only copy)
    if resize is not None and rgb.size != (resize[1], resize[0]):
        rgb = rgb.resize((resize[1], resize[0]), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ the workers


def _clean(exc: BaseException) -> str:
    """An exception message without object addresses (``<_io.BytesIO object at 0x...>``): manifests must not
    depend on the process that wrote them."""
    return _ADDRESS.sub("", str(exc)).strip() or type(exc).__name__


def _read_input(work: _Work) -> bytes:
    if work.blob is not None:
        from dsmoe.data.layouts.generic import fetch_blob

        return fetch_blob(work.blob)
    assert work.path is not None
    return Path(work.path).read_bytes()


def _prepare_one(work: _Work, task: _PrepTask, spill: bytearray, spill_name: str) -> _Probe:
    """Read, hash and decode one input; encode (and spill) its image members unless it passes through."""
    missing, unreadable = ((REASON_VIDEO_MISSING, REASON_VIDEO_UNREADABLE) if work.video
                           else (REASON_IMAGE_MISSING, REASON_IMAGE_UNREADABLE))
    try:
        data = _read_input(work)
    except FileNotFoundError:
        return _Probe(f"{missing}: {work.path}" if work.path else f"{missing}: {work.blob}")
    except OSError as exc:
        return _Probe(f"{unreadable}: {exc.strerror or exc}")
    except Exception as exc:  # a Hugging Face row that cannot be read
        return _Probe(f"{unreadable}: {type(exc).__name__}: {_clean(exc)}")
    sha = hashlib.sha256(data).hexdigest()
    if work.video:
        from dsmoe.data.video import VideoDecodeError, sample_frames

        try:
            frames = sample_frames(data, task.frames)
        except VideoDecodeError as exc:
            return _Probe(f"{unreadable}: {_clean(exc)}")
        members = [_encode_jpeg(frame, task.resize) for frame in frames]
        passthrough = False
    else:
        try:
            image = Image.open(io.BytesIO(data))
            passthrough = task.resize is None and image.format == "JPEG" and image.mode == "RGB"
            if passthrough:  # a reduced-size decode still reads (and checks) all entropy-coded data
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            elif task.resize is not None and image.format == "JPEG":
                # Shrinking by 2x or more: let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target),
                # as Image.thumbnail does; the bicubic resize then only does the rest.
                image.draft(None, (task.resize[1], task.resize[0]))
            image.load()
        except Exception as exc:  # PIL raises many types for bad files; any of them means "unreadable"
            return _Probe(f"{unreadable}: {type(exc).__name__}: {_clean(exc)}")
        if passthrough and work.path is not None:
            return _Probe(None, sha, passthrough=True, from_file=True, sizes=(len(data),))
        members = [data if passthrough else _encode_jpeg(image, task.resize)]
    offsets = []
    for member in members:
        offsets.append(len(spill))
        spill += member
    return _Probe(None, sha, passthrough=passthrough, sizes=tuple(len(m) for m in members),
                  offsets=tuple(offsets), spill=spill_name)


def _prepare(task: _PrepTask) -> list[_Probe]:
    """Prepare one chunk of records; their encoded members go to one spill file."""
    spill = bytearray()
    name = f"{task.chunk:07d}.bin"
    probes = [_prepare_one(work, task, spill, name) for work in task.work]
    if spill:
        path = Path(task.spill_dir) / name
        tmp = path.with_name(f"{name}.tmp-{os.getpid()}")
        try:
            with _writing(tmp):
                tmp.write_bytes(spill)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return probes


def _member_header(name: str, size: int) -> bytes:
    """The USTAR header block of a regular file member (mtime 0, mode 644, uid/gid 0, no user names)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


class _TarWriter:
    """Writes the same bytes as ``tarfile.open(mode="w", format=USTAR_FORMAT)`` + ``addfile`` would, without
    tarfile's per-member file-object copying (a measurable share of the time per small member)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.offset = 0
        self.digest = hashlib.sha256()  # of everything written, so the shard is not read back to hash it

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self.digest.update(data)

    def add(self, name: str, data: bytes) -> None:
        header = _member_header(name, len(data))
        padding = -len(data) % _TAR_BLOCK
        self._write(header)
        self._write(data)
        if padding:
            self._write(b"\0" * padding)
        self.offset += len(header) + len(data) + padding

    def close(self) -> None:
        end = self.offset + 2 * _TAR_BLOCK
        padding = 2 * _TAR_BLOCK + -end % _TAR_RECORD
        self._write(b"\0" * padding)
        self.offset += padding


class _SpillReader:
    """Reads member bytes back from spill files (one open handle per file)."""

    def __init__(self, spill_dir: Path) -> None:
        self.spill_dir = spill_dir
        self.handles: dict[str, Any] = {}

    def read(self, name: str, offset: int, size: int) -> bytes:
        handle = self.handles.get(name)
        if handle is None:
            handle = self.handles[name] = open(self.spill_dir / name, "rb")
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise ShardWriteError(f"{self.spill_dir / name} is shorter than expected; run again")
        return data

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def _image_members(sample: _Sample, spill: _SpillReader) -> list[bytes]:
    if sample.from_file:
        data = Path(sample.image_path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sample.raw_sha256 or len(data) != sample.sizes[0]:
            raise ShardWriteError(f"{sample.image_path} changed while the shards were being written; run again")
        return [data]
    return [spill.read(sample.spill, offset, size) for offset, size in zip(sample.offsets, sample.sizes,
                                                                           strict=True)]


def _build_shard(task: _ShardTask) -> _ShardResult:
    """Write one shard (or keep the existing file when it matches the previous run's checksum)."""
    final = Path(task.out_dir) / task.name
    if task.previous_sha256 is not None and final.is_file() and _sha256_file(final) == task.previous_sha256:
        return _ShardResult(task.name, task.previous_sha256, final.stat().st_size, kept=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    spill = _SpillReader(Path(task.out_dir) / SPILL_NAME)
    try:
        with _writing(tmp), open(tmp, "wb") as fh:
            tar = _TarWriter(fh)
            for sample in task.samples:
                members = _image_members(sample, spill)
                tar.add(f"{sample.key}.jpg", members[0])
                if sample.video:
                    for i, frame in enumerate(members):
                        tar.add(f"{sample.key}.frame{i:02d}.jpg", frame)
                tar.add(f"{sample.key}.json", sample.json_bytes)
            tar.close()
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        assert size == task.expected_bytes == tar.offset, (task.name, size, task.expected_bytes, tar.offset)
        sha = tar.digest.hexdigest()
        os.replace(tmp, final)
    finally:
        spill.close()
        tmp.unlink(missing_ok=True)
    return _ShardResult(task.name, sha, size, kept=False)


class _Runner:
    """Map functions inline (one worker) or over a spawn-context process pool (several).

    Workers start with Ctrl-C ignored (an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler): the main process alone reacts to it, stops the pool and says how to continue.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            finally:
                signal.signal(signal.SIGINT, interrupt)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:
            self._pool.terminate()
        self._pool.join()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Results in order; each item is one task (items are chunks already)."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.imap(fn, items, 1))

    def unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        if self._pool is None:
            return (fn(item) for item in items)
        return self._pool.imap_unordered(fn, items)


# --------------------------------------------------------------------------------------------- planning steps


def _check_options(dataset: str, samples_per_shard: int, max_shard_bytes: int, workers: int,
                   resize: tuple[int, int] | None, frames: int) -> tuple[int, int] | None:
    if not isinstance(dataset, str) or not dataset:
        raise ShardWriteError(f"dataset must be a non-empty name, found {dataset!r}")
    for name, value in (("samples_per_shard", samples_per_shard), ("max_shard_bytes", max_shard_bytes),
                        ("workers", workers), ("frames", frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ShardWriteError(f"{name} must be a positive integer, found {value!r}")
    if resize is None:
        return None
    if (len(resize) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in resize)):
        raise ShardWriteError(f"resize must be (H, W) with positive integers, found {resize!r}")
    return (int(resize[0]), int(resize[1]))


def _remove_stale_tmp(out_dir: Path) -> None:
    for path in out_dir.glob("*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / SPILL_NAME, ignore_errors=True)


def _report(reports: dict[str, SplitReport], split: str) -> SplitReport:
    if split not in reports:
        reports[split] = SplitReport(split)
    return reports[split]


def _screen(records: Sequence[RawRecord], reports: dict[str, SplitReport],
            skips: list[tuple[int, str, str, str]]) -> list[_Candidate]:
    """Count inputs; skip unknown splits and records without a caption. Returns the rest in order."""
    kept: list[_Candidate] = []
    for index, record in enumerate(records):
        _report(reports, record.split).inputs += 1
        if record.split not in KNOWN_SPLITS:
            skips.append((index, record.split, record.source, f"{REASON_UNKNOWN_SPLIT} {record.split!r}"))
            continue
        captions: list[tuple[str, tuple[str, ...]]] = []
        dropped: list[tuple[str, int]] = []
        for lang, raw in caption_map(record).items():
            if not all(isinstance(c, str) for c in raw):
                raise ShardWriteError(f"record {index} ({record.source}): captions must be text, found "
                                      f"{[c for c in raw if not isinstance(c, str)][:2]!r}")
            clean = tuple(c.strip() for c in raw if c.strip())
            if len(clean) != len(raw):
                dropped.append((lang, len(raw) - len(clean)))
            if clean:
                captions.append((lang, clean))
        if not captions:
            skips.append((index, record.split, record.source, REASON_EMPTY_CAPTIONS))
            continue
        kept.append(_Candidate(index, record, tuple(captions), tuple(dropped)))
    return kept


def _json_member(key: str, candidate: _Candidate, dataset: str, frames: int) -> bytes:
    record = candidate.record
    payload: dict[str, Any] = {"key": key}
    if record.pid is not None:
        payload["pid"] = record.pid
    if record.image_id is not None or record.pid is None:
        payload["image_id"] = record.image_id if record.image_id is not None else record.source
    payload.update({
        "captions": {lang: list(caps) for lang, caps in candidate.captions},
        "source": record.source,
        "split": record.split,
        "dataset": dataset,
    })
    if record.video:
        payload["frames"] = frames
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _identity(record: RawRecord) -> str:
    """What makes two records of one split duplicates: the image id, else the source path."""
    return str(record.image_id) if record.image_id is not None else record.source


def _accept(candidates: Sequence[_Candidate], probes: Sequence[_Probe], dataset: str, frames: int,
            skips: list[tuple[int, str, str, str]], dropped: dict[str, Counter]) -> dict[str, list[_Sample]]:
    """Skip bad inputs and duplicates; give the accepted records their keys, per split in order."""
    samples: dict[str, list[_Sample]] = {split: [] for split in KNOWN_SPLITS}
    seen: set[tuple[str, str]] = set()
    for candidate, probe in zip(candidates, probes, strict=True):
        record = candidate.record
        if probe.reason is not None:
            skips.append((candidate.index, record.split, record.source, probe.reason))
            continue
        identity = (record.split, _identity(record))
        if identity in seen:
            reason = REASON_DUPLICATE_ID if record.image_id is not None else REASON_DUPLICATE
            skips.append((candidate.index, record.split, record.source, reason))
            continue
        seen.add(identity)
        dropped[record.split].update(dict(candidate.dropped))
        split_samples = samples[record.split]
        key = f"{record.split}_{len(split_samples):07d}"
        assert "." not in key
        split_samples.append(_Sample(
            key=key,
            image_path=str(record.image_path) if record.image_path is not None else "",
            raw_sha256=probe.raw_sha256,
            passthrough=probe.passthrough,
            from_file=probe.from_file,
            video=record.video,
            sizes=probe.sizes,
            offsets=probe.offsets,
            spill=probe.spill,
            json_bytes=_json_member(key, candidate, dataset, frames),
            label=record.pid if record.pid is not None else _identity(record),
            caption_counts=tuple((lang, len(caps)) for lang, caps in candidate.captions),
        ))
    return samples


def _cut(samples: Sequence[_Sample], samples_per_shard: int, max_shard_bytes: int) -> list[list[_Sample]]:
    """Split samples into shards by count and by exact tar size."""
    shards: list[list[_Sample]] = []
    current: list[_Sample] = []
    member_total = 0
    for sample in samples:
        size = _sample_bytes(sample)
        too_big = current and _tar_bytes(member_total + size) > max_shard_bytes
        if current and (len(current) >= samples_per_shard or too_big):
            shards.append(current)
            current, member_total = [], 0
        current.append(sample)
        member_total += size
    if current:
        shards.append(current)
    return shards


def _plan_digest(samples: Sequence[_Sample], resize: tuple[int, int] | None, frames: int) -> str:
    """A digest of everything that determines a shard's bytes (for resuming)."""
    plan: list[Any] = [FORMAT_VERSION, list(resize) if resize else None]
    if any(s.video for s in samples):
        plan.append({"frames": frames})
    plan.append([[s.key, s.raw_sha256, s.passthrough, s.json_bytes.decode("utf-8")] for s in samples])
    return hashlib.sha256(json.dumps(plan, separators=(",", ":")).encode("utf-8")).hexdigest()


def _previous_shards(out_dir: Path) -> dict[str, tuple[str, str]]:
    """name -> (plan, sha256) from existing manifests and an interrupted run's journal."""
    previous: dict[str, tuple[str, str]] = {}
    for path in sorted(out_dir.glob("*.manifest.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            for entry in manifest.get("shards", []):
                previous[entry["name"]] = (entry["plan"], entry["sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable manifest only means nothing is reused from it
    journal = out_dir / JOURNAL_NAME
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                previous[entry["name"]] = (entry["plan"], entry["sha256"])
            except (ValueError, KeyError, TypeError):
                continue  # e.g. a line cut short by the interruption
    return previous


def _manifest(split: str, dataset: str, report: SplitReport, samples: Sequence[_Sample],
              shards: Sequence[dict[str, Any]], resize: tuple[int, int] | None, frames: int, person: bool,
              extra: Mapping[str, Any], tool_args: Mapping[str, Any]) -> dict[str, Any]:
    video = any(s.video for s in samples)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dataset": dataset,
        "split": split,
        "kind": "video" if video else "image",
        "samples": len(samples),
        "captions": dict(report.captions),
        "languages": sorted(report.captions),
        "images": report.images,
    }
    if person:
        manifest["identities"] = len({s.label for s in samples})
    if video:
        manifest["frames"] = frames
    manifest.update({
        "empty_captions_dropped": dict(report.empty_captions_dropped),
        "resize": list(resize) if resize else None,
        "shards": list(shards),
        "skipped": list(report.skips),
        "inputs": report.inputs,
        "tool_args": dict(tool_args),
    })
    manifest.update(extra)
    return manifest


def _remove_unlisted(out_dir: Path, listed: set[str], splits_present: Iterable[str]) -> None:
    """Delete shard files of known splits that the new manifests do not list, and orphan manifests."""
    present = set(splits_present)
    for split in KNOWN_SPLITS:
        for path in out_dir.glob(f"{split}-*.tar"):
            match = _SHARD_NAME.match(path.name)
            if match and match["split"] == split and path.name not in listed:
                path.unlink(missing_ok=True)
        if split not in present:
            (out_dir / f"{split}.manifest.json").unlink(missing_ok=True)


def _prep_tasks(candidates: Sequence[_Candidate], spill_dir: Path, resize: tuple[int, int] | None, frames: int,
                workers: int) -> list[_PrepTask]:
    """Chunks of consecutive candidates (smaller for videos, and small enough to keep every worker busy)."""
    tasks: list[_PrepTask] = []
    start = 0
    while start < len(candidates):
        video = candidates[start].record.video
        limit = 2 if video else MAX_CHUNK
        size = max(1, min(limit, -(-len(candidates) // (workers * 4))))
        chunk = candidates[start:start + size]
        work = tuple(_Work(str(c.record.image_path) if c.record.image_path is not None else None, c.record.blob,
                           c.record.video) for c in chunk)
        tasks.append(_PrepTask(len(tasks), str(spill_dir), work, resize, frames))
        start += size
    return tasks


# ----------------------------------------------------------------------------------------------- public API


def write_shards(
    records: list[RawRecord],
    out_dir: Path,
    *,
    dataset: str,
    samples_per_shard: int = 2000,
    max_shard_bytes: int = 1 << 30,
    workers: int = 1,
    resize: tuple[int, int] | None = None,
    frames: int = DEFAULT_FRAMES,
    strict: bool = False,
    tool_args: dict[str, Any] | None = None,
    caption_reports: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
) -> dict[str, SplitReport]:
    """Write ``records`` as WebDataset shards plus one manifest per split under ``out_dir``.

    ``caption_reports`` (merged caption files, with their unmatched entries) and ``notes`` (what the layout
    reader decided) are recorded in every manifest. Returns a report per split (known splits with input first,
    then unknown split names). With ``workers > 1`` a spawn-context process pool is used; call it under
    ``if __name__ == "__main__":``. Raises :class:`ShardWriteError` for bad options, and with ``strict=True``
    when any record was skipped or any caption-file entry matched no sample (after everything else has been
    written).
    """
    resize = _check_options(dataset, samples_per_shard, max_shard_bytes, workers, resize, frames)
    if not records:
        raise ShardWriteError("no records to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir)
    spill_dir = out_dir / SPILL_NAME
    spill_dir.mkdir()
    person = all(record.pid is not None for record in records)

    reports: dict[str, SplitReport] = {split: SplitReport(split) for split in KNOWN_SPLITS}
    skips: list[tuple[int, str, str, str]] = []
    candidates = _screen(records, reports, skips)
    previous = _previous_shards(out_dir)
    journal = out_dir / JOURNAL_NAME
    dropped: dict[str, Counter] = {split: Counter() for split in KNOWN_SPLITS}

    try:
        with _Runner(workers) as runner:
            probes = [probe for chunk in runner.map(_prepare, _prep_tasks(candidates, spill_dir, resize, frames,
                                                                           workers))
                      for probe in chunk]
            samples = _accept(candidates, probes, dataset, frames, skips, dropped)
            tasks: list[_ShardTask] = []
            for split in KNOWN_SPLITS:
                for index, shard in enumerate(_cut(samples[split], samples_per_shard, max_shard_bytes)):
                    name = _shard_name(split, index)
                    plan = _plan_digest(shard, resize, frames)
                    old = previous.get(name)
                    tasks.append(_ShardTask(str(out_dir), name, tuple(shard), plan,
                                            _tar_bytes(sum(_sample_bytes(s) for s in shard)),
                                            old[1] if old and old[0] == plan else None))
            plans = {task.name: task for task in tasks}
            results: dict[str, _ShardResult] = {}
            with _writing(journal):
                log = open(journal, "a", encoding="utf-8")
            with log:
                for result in runner.unordered(_build_shard, tasks):
                    results[result.name] = result
                    entry = {"name": result.name, "plan": plans[result.name].plan, "sha256": result.sha256}
                    with _writing(journal):
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    for _, split, source, reason in sorted(skips):
        report = _report(reports, split)
        report.skipped += 1
        report.skips.append({"source": source, "reason": reason})
    present = [split for split in KNOWN_SPLITS if reports[split].inputs > 0]
    extra: dict[str, Any] = {}
    if caption_reports:
        extra["caption_files"] = [dict(r) for r in caption_reports]
    if notes:
        extra["notes"] = list(notes)
    for split in present:
        report = reports[split]
        report.written = len(samples[split])
        counts: Counter = Counter()
        for sample in samples[split]:
            counts.update(dict(sample.caption_counts))
        report.captions = dict(sorted(counts.items()))
        report.empty_captions_dropped = dict(sorted(dropped[split].items()))
        report.images = len({s.label for s in samples[split]}) if not person else len(samples[split])
        entries = [
            {"name": t.name, "samples": len(t.samples), "sha256": results[t.name].sha256,
             "bytes": results[t.name].bytes, "plan": t.plan}
            for t in tasks if t.name.startswith(f"{split}-")
        ]
        report.shards = len(entries)
        manifest = _manifest(split, dataset, report, samples[split], entries, resize, frames, person, extra,
                             tool_args or {})
        _write_text_atomic(out_dir / f"{split}.manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    _remove_unlisted(out_dir, set(results), present)
    journal.unlink(missing_ok=True)

    final = {split: report for split, report in reports.items() if report.inputs > 0}
    assert all(report.balanced for report in final.values()), final
    unmatched = sum(len(r.get("unmatched", [])) for r in caption_reports)
    if strict and (skips or unmatched):
        problems = [f"{split} {source}: {reason}" for _, split, source, reason in sorted(skips)]
        problems += [f"{r['path']}: {item['image']!r} {item['reason']}" for r in caption_reports
                     for item in r.get("unmatched", [])]
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        head = f"{len(skips)} record(s) skipped" + (f" and {unmatched} caption entr(ies) unmatched" if unmatched
                                                    else "")
        raise ShardWriteError(f"{head} under --strict: {shown}{more}")
    return final


def format_accounting(reports: Mapping[str, SplitReport]) -> str:
    """One line per split: ``train: 120 inputs = 118 written + 2 skipped``."""
    return "\n".join(
        f"{split}: {r.inputs} inputs = {r.written} written + {r.skipped} skipped" for split, r in reports.items()
    )


def format_details(reports: Mapping[str, SplitReport]) -> str:
    """Per split: captions per language and blank captions dropped inside kept samples."""
    lines = []
    for split, r in reports.items():
        if not r.written:
            continue
        captions = ", ".join(f"{lang} {n}" for lang, n in r.captions.items())
        line = f"{split}: {r.images} images, {r.shards} shards, captions: {captions}"
        if r.empty_captions_dropped:
            line += "; blank captions dropped: " + ", ".join(f"{lang} {n}"
                                                           for lang, n in r.empty_captions_dropped.items())
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- verification


def _check_sample(shard: str, key: str, split: str, dataset: str, parts: Mapping[str, bytes],
                  person: bool) -> tuple[list[str], dict[str, int], Any]:
    """Problems of one sample, its caption count per language and its label (pid or image id)."""
    problems: list[str] = []
    jpg, meta = parts.get("jpg"), parts.get("json")
    if jpg is None or meta is None:
        return [f"{shard}: sample {key} lacks its {'.jpg' if jpg is None else '.json'} member"], {}, None
    if not jpg.startswith(b"\xff\xd8"):
        problems.append(f"{shard}: {key}.jpg is not a JPEG")
    try:
        info = json.loads(meta.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return problems + [f"{shard}: {key}.json does not parse: {exc}"], {}, None
    if not isinstance(info, dict):
        return problems + [f"{shard}: {key}.json is not an object"], {}, None
    for field_name, expected in (("key", key), ("split", split), ("dataset", dataset)):
        if info.get(field_name) != expected:
            problems.append(f"{shard}: {key}.json has {field_name}={info.get(field_name)!r}, expected {expected!r}")
    counts: dict[str, int] = {}
    captions = info.get("captions")
    if not isinstance(captions, dict) or not captions:
        problems.append(f"{shard}: {key}.json has no captions")
    else:
        for lang, caps in captions.items():
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c for c in caps):
                problems.append(f"{shard}: {key}.json has no non-empty {lang} captions")
            else:
                counts[lang] = len(caps)
    frames = sorted((int(m[1]), ext) for ext in parts if (m := _FRAME_EXT.match(ext)))
    if "frames" in info or frames:
        expected_frames = info.get("frames")
        if [index for index, _ in frames] != list(range(len(frames))) or len(frames) != expected_frames:
            problems.append(f"{shard}: {key} has frames {[index for index, _ in frames]}, json says "
                            f"{expected_frames!r}")
        elif parts[frames[0][1]] != jpg:
            problems.append(f"{shard}: {key}.jpg is not the first frame")
        for _, ext in frames:
            if not parts[ext].startswith(b"\xff\xd8"):
                problems.append(f"{shard}: {key}.{ext} is not a JPEG")
    if person:
        label = info.get("pid")
        if isinstance(label, bool) or not isinstance(label, int):
            problems.append(f"{shard}: {key}.json has a non-integer pid {label!r}")
            label = None
    else:
        label = info.get("image_id")
        if not isinstance(label, str) or not label:
            problems.append(f"{shard}: {key}.json has no image_id")
            label = None
    return problems, counts, label


def _read_members(path: Path) -> list[tuple[str, bytes | None]]:
    members: list[tuple[str, bytes | None]] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            members.append((info.name, data))
    return members


def _verify_shard(path: Path, entry: Mapping[str, Any], split: str, dataset: str, person: bool, first_index: int,
                  totals: dict[str, Any]) -> list[str]:
    """Check one listed shard; ``first_index`` is the expected number of its first key."""
    name = path.name
    if not path.is_file():
        return [f"{name}: listed in {split}.manifest.json but missing"]
    problems: list[str] = []
    if path.stat().st_size != entry.get("bytes"):
        problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
    if _sha256_file(path) != entry.get("sha256"):
        return problems + [f"{name}: sha256 does not match the manifest (corrupted or replaced)"]
    try:
        members = _read_members(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return problems + [f"{name}: not a readable tar file: {exc}"]
    samples: dict[str, dict[str, bytes]] = {}
    for member_name, data in members:
        match = _MEMBER_NAME.match(member_name)
        ext = match["ext"] if match else ""
        if data is None or match is None or not (ext in ("jpg", "json") or _FRAME_EXT.match(ext)):
            problems.append(f"{name}: unexpected member {member_name!r}")
            continue
        samples.setdefault(match["key"], {})[ext] = data
    for offset, (key, parts) in enumerate(samples.items()):
        expected_key = f"{split}_{first_index + offset:07d}"
        if key != expected_key:
            problems.append(f"{name}: key {key!r} where {expected_key!r} was expected")
        sample_problems, counts, label = _check_sample(name, key, split, dataset, parts, person)
        problems += sample_problems
        totals["captions"].update(counts)
        if label is not None:
            totals["labels"].add(label)
    if len(samples) != entry.get("samples"):
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry.get('samples')}")
    totals["samples"] += len(samples)
    return problems


def _verify_manifest(path: Path, listed: set[str]) -> list[str]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path.name}: unreadable manifest: {exc}"]
    required = ("dataset", "split", "samples", "captions", "shards", "skipped", "inputs")
    missing = [key for key in required if key not in manifest] if isinstance(manifest, dict) else list(required)
    if missing:
        return [f"{path.name}: manifest lacks {missing}"]
    split, dataset = manifest["split"], manifest["dataset"]
    person = "identities" in manifest
    problems: list[str] = []
    if path.name != f"{split}.manifest.json":
        problems.append(f"{path.name}: manifest is for split {split!r}")
    totals: dict[str, Any] = {"samples": 0, "captions": Counter(), "labels": set()}
    for entry in manifest["shards"]:
        name = str(entry.get("name", ""))
        listed.add(name)
        match = _SHARD_NAME.match(name)
        if not match or match["split"] != split:
            problems.append(f"{path.name}: shard name {name!r} does not belong to split {split!r}")
            continue
        problems += _verify_shard(path.parent / name, entry, split, dataset, person, totals["samples"], totals)
    recorded_captions = manifest["captions"] if isinstance(manifest["captions"], dict) else {}
    checks: list[tuple[str, Any, Any]] = [("samples", totals["samples"], manifest["samples"])]
    for lang in sorted(set(recorded_captions) | set(totals["captions"])):
        checks.append((f"{lang} captions", totals["captions"].get(lang, 0), recorded_captions.get(lang, 0)))
    if person:
        checks.append(("identities", len(totals["labels"]), manifest["identities"]))
    elif "images" in manifest:
        checks.append(("images", len(totals["labels"]), manifest["images"]))
    for label, found, recorded in checks:
        if found != recorded:
            problems.append(f"{path.name}: shards hold {found} {label}, manifest says {recorded}")
    if manifest["inputs"] != manifest["samples"] + len(manifest["skipped"]):
        problems.append(f"{path.name}: inputs {manifest['inputs']} != samples {manifest['samples']} "
                        f"+ skipped {len(manifest['skipped'])}")
    return problems


def verify_shards(out_dir: Path) -> list[str]:
    """Re-read every manifest and shard under ``out_dir``; return the problems found (empty when fine)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return [f"{out_dir}: not a directory"]
    manifests = sorted(out_dir.glob("*.manifest.json"))
    if not manifests:
        return [f"{out_dir}: no *.manifest.json found"]
    listed: set[str] = set()
    problems: list[str] = []
    for manifest in manifests:
        problems += _verify_manifest(manifest, listed)
    for path in sorted(out_dir.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in any manifest")
    return problems
