"""The converter's pool work: preparing images and videos (read, check, encode, spill) and building whole shards."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from dsmoe.files import write_atomic
from dsmoe.shards.records import ShardWriteError, writing
from dsmoe.shards.tar import TarWriter, sha256_file
from dsmoe.shards.tasks import PrepTask, Probe, Sample, ShardResult, ShardTask, Work

JPEG_QUALITY = 95
DEFAULT_FRAMES = 12
SPILL_NAME = ".make_shards.spill"
MAX_CHUNK = 32  # records per prepare task (videos: 2)

# Skip reasons start with one of these (details may follow after ": ").
REASON_IMAGE_MISSING = "image missing"
REASON_IMAGE_UNREADABLE = "image unreadable"
REASON_VIDEO_MISSING = "video missing"
REASON_VIDEO_UNREADABLE = "video unreadable"

_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")

T = TypeVar("T")
R = TypeVar("R")


def encode_jpeg(image: Image.Image, resize: tuple[int, int] | None) -> bytes:
    """RGB, optionally resized to ``resize`` = (H, W) as the releases resize at load time (PIL's bilinear, through
    torchvision's ``T.Resize`` on the fully decoded image), JPEG quality 95."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # (convert and a same-size resize only copy)
    if resize is not None and rgb.size != (resize[1], resize[0]):
        rgb = rgb.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)
    return buffer.getvalue()


def _clean(exc: BaseException) -> str:
    """An exception message without object addresses (``<_io.BytesIO object at 0x...>``): manifests must not
    depend on the process that wrote them."""
    return _ADDRESS.sub("", str(exc)).strip() or type(exc).__name__


def _read_input(work: Work) -> bytes:
    if work.blob is not None:
        from dsmoe.shards.layouts.generic import fetch_blob

        return fetch_blob(work.blob)
    assert work.path is not None
    return Path(work.path).read_bytes()


def _prepare_one(work: Work, task: PrepTask, spill: bytearray, spill_name: str) -> Probe:
    """Read, hash and decode one input; encode (and spill) its image members unless it passes through."""
    missing, unreadable = ((REASON_VIDEO_MISSING, REASON_VIDEO_UNREADABLE) if work.video
                           else (REASON_IMAGE_MISSING, REASON_IMAGE_UNREADABLE))
    try:
        data = _read_input(work)
    except FileNotFoundError:
        return Probe(f"{missing}: {work.path}" if work.path else f"{missing}: {work.blob}")
    except OSError as exc:
        return Probe(f"{unreadable}: {exc.strerror or exc}")
    except Exception as exc:  # a Hugging Face row that cannot be read
        return Probe(f"{unreadable}: {type(exc).__name__}: {_clean(exc)}")
    sha = hashlib.sha256(data).hexdigest()
    if work.video:
        from dsmoe.shards.video import VideoDecodeError, sample_frames

        try:
            frames = sample_frames(data, task.frames)
        except VideoDecodeError as exc:
            return Probe(f"{unreadable}: {_clean(exc)}")
        members = [encode_jpeg(frame, task.resize) for frame in frames]
        passthrough = False
    else:
        try:
            image = Image.open(io.BytesIO(data))
            passthrough = task.resize is None and image.format == "JPEG" and image.mode == "RGB"
            if passthrough:  # a reduced-size decode still reads (and checks) all entropy-coded data
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # resized from the full decode, as the releases resize (no reduced-scale shortcut)
        except Exception as exc:  # PIL raises many types for bad files; any of them means "unreadable"
            return Probe(f"{unreadable}: {type(exc).__name__}: {_clean(exc)}")
        if passthrough and work.path is not None:
            return Probe(None, sha, passthrough=True, from_file=True, sizes=(len(data),))
        members = [data if passthrough else encode_jpeg(image, task.resize)]
    offsets = []
    for member in members:
        offsets.append(len(spill))
        spill += member
    return Probe(None, sha, passthrough=passthrough, sizes=tuple(len(m) for m in members),
                  offsets=tuple(offsets), spill=spill_name)


def prepare(task: PrepTask) -> list[Probe]:
    """Prepare one chunk of records; their encoded members go to one spill file."""
    spill = bytearray()
    name = f"{task.chunk:07d}.bin"
    probes = [_prepare_one(work, task, spill, name) for work in task.work]
    if spill:
        path = Path(task.spill_dir) / name
        with writing(path):
            write_atomic(path, bytes(spill))
    return probes


class SpillReader:
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


def image_members(sample: Sample, spill: SpillReader) -> list[bytes]:
    if sample.from_file:
        data = Path(sample.image_path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sample.raw_sha256 or len(data) != sample.sizes[0]:
            raise ShardWriteError(f"{sample.image_path} changed while the shards were being written; run again")
        return [data]
    return [spill.read(sample.spill, offset, size) for offset, size in zip(sample.offsets, sample.sizes,
                                                                           strict=True)]


def build_shard(task: ShardTask) -> ShardResult:
    """Write one shard (or keep the existing file when it matches the previous run's checksum)."""
    final = Path(task.out_dir) / task.name
    if task.previous_sha256 is not None and final.is_file() and sha256_file(final) == task.previous_sha256:
        return ShardResult(task.name, task.previous_sha256, final.stat().st_size, kept=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    spill = SpillReader(Path(task.out_dir) / SPILL_NAME)
    try:
        with writing(tmp), open(tmp, "wb") as fh:
            tar = TarWriter(fh)
            for sample in task.samples:
                members = image_members(sample, spill)
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
    return ShardResult(task.name, sha, size, kept=False)


class Runner:
    """Map functions inline (one worker) or over a spawn-context process pool (several).

    Workers start with Ctrl-C ignored (an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler): the main process alone reacts to it, stops the pool and says how to continue.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> Runner:
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
