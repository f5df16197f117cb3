"""Write raw person-retrieval records into WebDataset tar shards, with manifests, and verify them.

Layout of an output directory::

    train-000000.tar  train-000001.tar ...  train.manifest.json
    val-000000.tar ...                      val.manifest.json
    test-000000.tar ...                     test.manifest.json

Each sample is two tar members, ``{key}.jpg`` then ``{key}.json``, with ``key = {split}_{n:07d}`` (``n`` counts
the split's accepted records in annotation order; keys never contain a dot). Nothing is pickled.

How the work is organised (so that the output does not depend on the number of workers):

1. *Screen* (main process): unknown splits and records without a non-empty caption are skipped.
2. *Probe* (pool): every remaining image is read and fully decoded; unreadable or missing images are skipped.
   The probe also computes the exact size of the image member: the file size for a pass-through RGB JPEG,
   else the size of the re-encoded JPEG (the image is encoded once here and once more when the shard is written;
   JPEG encoding is deterministic, and a mismatch is an error).
3. *Plan* (main process): duplicates (same split and source as an earlier accepted record) are skipped, keys
   are assigned and shard boundaries are cut: a shard ends when it holds ``samples_per_shard`` samples, or when
   adding the next sample would make the tar file larger than ``max_shard_bytes``. Tar sizes are computed
   exactly from the member sizes (512-byte headers and blocks, 10 KiB records), so the byte limit holds for the
   real files; a single sample larger than the limit gets a shard of its own.
4. *Build* (pool, one task per shard): each worker writes a whole shard to ``name.tar.tmp-<pid>`` and renames
   it. A shard whose file exists with the checksum recorded for the same plan (in the manifest of a previous
   run, or in the journal of an interrupted one) is kept as it is.
5. *Manifests* (main process): ``{split}.manifest.json`` is written atomically after all shards; shard files
   of a split that are no longer listed, manifests of splits that have no input any more, and the journal are
   then removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from dsmoe.data.raw_formats import RawRecord

__all__ = [
    "KNOWN_SPLITS",
    "REASON_DUPLICATE",
    "REASON_EMPTY_CAPTIONS",
    "REASON_IMAGE_MISSING",
    "REASON_IMAGE_UNREADABLE",
    "REASON_UNKNOWN_SPLIT",
    "ShardWriteError",
    "SplitReport",
    "format_accounting",
    "verify_shards",
    "write_shards",
]

KNOWN_SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_NAME = "dsmoe-shards"
FORMAT_VERSION = 1
JPEG_QUALITY = 95
JOURNAL_NAME = ".make_shards.journal.jsonl"

# Skip reasons start with one of these (details may follow after ": ").
REASON_IMAGE_MISSING = "image missing"
REASON_IMAGE_UNREADABLE = "image unreadable"
REASON_EMPTY_CAPTIONS = "no non-empty caption"
REASON_DUPLICATE = "duplicate of an earlier record with the same split and source"
REASON_UNKNOWN_SPLIT = "unknown split"

_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
_MEMBER_NAME = re.compile(r"^(?P<key>[^.]+)\.(?P<ext>[^.]+)$")

T = TypeVar("T")
R = TypeVar("R")


class ShardWriteError(ValueError):
    """The shards could not be written as asked (bad options, or skipped records under ``strict``)."""


@dataclass
class SplitReport:
    """Accounting of one split: ``inputs == written + skipped``."""

    split: str
    inputs: int = 0
    written: int = 0
    skipped: int = 0
    shards: int = 0
    skips: list[dict[str, str]] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """Whether every input record is accounted for."""
        return self.inputs == self.written + self.skipped


# ------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class _Candidate:
    index: int
    record: RawRecord
    captions: tuple[str, ...]


@dataclass(frozen=True)
class _Probe:
    reason: str | None  # None when the image is usable
    raw_sha256: str = ""
    jpg_bytes: int = 0
    passthrough: bool = False


@dataclass(frozen=True)
class _Sample:
    key: str
    image_path: str
    raw_sha256: str
    passthrough: bool
    jpg_bytes: int
    json_bytes: bytes
    pid: int
    num_captions: int


@dataclass(frozen=True)
class _ShardTask:
    out_dir: str
    name: str
    samples: tuple[_Sample, ...]
    resize: tuple[int, int] | None
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
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_jpeg(image: Image.Image, resize: tuple[int, int] | None) -> bytes:
    """RGB, optionally resized (bicubic) to ``resize`` = (H, W), JPEG quality 95."""
    rgb = image.convert("RGB")
    if resize is not None:
        rgb = rgb.resize((resize[1], resize[0]), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ------------------------------------------------------------------------------------------------ the workers


def _probe(task: tuple[str, tuple[int, int] | None]) -> _Probe:
    """Read and decode one image; return why it is unusable, or its hash and member size."""
    path, resize = task
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return _Probe(f"{REASON_IMAGE_MISSING}: {path}")
    except OSError as exc:
        return _Probe(f"{REASON_IMAGE_UNREADABLE}: {exc.strerror or exc}")
    try:
        image = _decode(data)
    except Exception as exc:  # PIL raises many types for bad files; any of them means "unreadable"
        return _Probe(f"{REASON_IMAGE_UNREADABLE}: {type(exc).__name__}: {exc}")
    passthrough = resize is None and image.format == "JPEG" and image.mode == "RGB"
    size = len(data) if passthrough else len(_encode_jpeg(image, resize))
    return _Probe(None, hashlib.sha256(data).hexdigest(), size, passthrough)


def _image_member(sample: _Sample, resize: tuple[int, int] | None) -> bytes:
    data = Path(sample.image_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sample.raw_sha256:
        raise ShardWriteError(f"{sample.image_path} changed while the shards were being written; run again")
    member = data if sample.passthrough else _encode_jpeg(_decode(data), resize)
    if len(member) != sample.jpg_bytes:
        raise RuntimeError(f"JPEG encoding of {sample.image_path} is not deterministic; cannot plan shards")
    return member


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def _build_shard(task: _ShardTask) -> _ShardResult:
    """Write one shard (or keep the existing file when it matches the previous run's checksum)."""
    final = Path(task.out_dir) / task.name
    if task.previous_sha256 is not None and final.is_file() and _sha256_file(final) == task.previous_sha256:
        return _ShardResult(task.name, task.previous_sha256, final.stat().st_size, kept=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in task.samples:
                    _add_member(tar, f"{sample.key}.jpg", _image_member(sample, task.resize))
                    _add_member(tar, f"{sample.key}.json", sample.json_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        assert size == task.expected_bytes, (task.name, size, task.expected_bytes)
        sha = _sha256_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return _ShardResult(task.name, sha, size, kept=False)


class _Runner:
    """Map functions inline (one worker) or over a spawn-context process pool (several)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        if workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(workers)

    def __enter__(self) -> _Runner:
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
        if self._pool is None:
            return [fn(item) for item in items]
        chunksize = max(1, min(64, len(items) // (self.workers * 4)))
        return list(self._pool.imap(fn, items, chunksize))

    def unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        if self._pool is None:
            return (fn(item) for item in items)
        return self._pool.imap_unordered(fn, items)


# --------------------------------------------------------------------------------------------- planning steps


def _check_options(dataset: str, samples_per_shard: int, max_shard_bytes: int, workers: int,
                   resize: tuple[int, int] | None) -> tuple[int, int] | None:
    if not isinstance(dataset, str) or not dataset:
        raise ShardWriteError(f"dataset must be a non-empty name, found {dataset!r}")
    for name, value in (("samples_per_shard", samples_per_shard), ("max_shard_bytes", max_shard_bytes),
                        ("workers", workers)):
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
        captions = tuple(c.strip() for c in record.captions if c.strip())
        if not captions:
            skips.append((index, record.split, record.source, REASON_EMPTY_CAPTIONS))
            continue
        kept.append(_Candidate(index, record, captions))
    return kept


def _json_member(key: str, candidate: _Candidate, dataset: str) -> bytes:
    record = candidate.record
    payload = {
        "key": key,
        "pid": record.pid,
        "captions": {"en": list(candidate.captions)},
        "source": record.source,
        "split": record.split,
        "dataset": dataset,
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _accept(candidates: Sequence[_Candidate], probes: Sequence[_Probe], dataset: str,
            skips: list[tuple[int, str, str, str]]) -> dict[str, list[_Sample]]:
    """Skip bad images and duplicates; give the accepted records their keys, per split in order."""
    samples: dict[str, list[_Sample]] = {split: [] for split in KNOWN_SPLITS}
    seen: set[tuple[str, str]] = set()
    for candidate, probe in zip(candidates, probes, strict=True):
        record = candidate.record
        if probe.reason is not None:
            skips.append((candidate.index, record.split, record.source, probe.reason))
            continue
        if (record.split, record.source) in seen:
            skips.append((candidate.index, record.split, record.source, REASON_DUPLICATE))
            continue
        seen.add((record.split, record.source))
        split_samples = samples[record.split]
        key = f"{record.split}_{len(split_samples):07d}"
        assert "." not in key
        split_samples.append(_Sample(
            key=key,
            image_path=str(record.image_path),
            raw_sha256=probe.raw_sha256,
            passthrough=probe.passthrough,
            jpg_bytes=probe.jpg_bytes,
            json_bytes=_json_member(key, candidate, dataset),
            pid=record.pid,
            num_captions=len(candidate.captions),
        ))
    return samples


def _cut(samples: Sequence[_Sample], samples_per_shard: int, max_shard_bytes: int) -> list[list[_Sample]]:
    """Split samples into shards by count and by exact tar size."""
    shards: list[list[_Sample]] = []
    current: list[_Sample] = []
    member_total = 0
    for sample in samples:
        size = _member_bytes(sample.jpg_bytes) + _member_bytes(len(sample.json_bytes))
        too_big = current and _tar_bytes(member_total + size) > max_shard_bytes
        if current and (len(current) >= samples_per_shard or too_big):
            shards.append(current)
            current, member_total = [], 0
        current.append(sample)
        member_total += size
    if current:
        shards.append(current)
    return shards


def _plan_digest(samples: Sequence[_Sample], resize: tuple[int, int] | None) -> str:
    """A digest of everything that determines a shard's bytes (for resuming)."""
    plan = [FORMAT_VERSION, list(resize) if resize else None,
            [[s.key, s.raw_sha256, s.passthrough, s.json_bytes.decode("utf-8")] for s in samples]]
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
              shards: Sequence[dict[str, Any]], resize: tuple[int, int] | None,
              tool_args: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dataset": dataset,
        "split": split,
        "samples": len(samples),
        "captions": {"en": sum(s.num_captions for s in samples)},
        "identities": len({s.pid for s in samples}),
        "resize": list(resize) if resize else None,
        "shards": list(shards),
        "skipped": list(report.skips),
        "inputs": report.inputs,
        "tool_args": dict(tool_args),
    }


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
    strict: bool = False,
    tool_args: dict[str, Any] | None = None,
) -> dict[str, SplitReport]:
    """Write ``records`` as WebDataset shards plus one manifest per split under ``out_dir``.

    Returns a report per split (known splits with input first, then unknown split names). With
    ``workers > 1`` a spawn-context process pool is used; call it under ``if __name__ == "__main__":``.
    Raises :class:`ShardWriteError` for bad options, and with ``strict=True`` when any record was skipped
    (after everything else has been written).
    """
    resize = _check_options(dataset, samples_per_shard, max_shard_bytes, workers, resize)
    if not records:
        raise ShardWriteError("no records to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir)

    reports: dict[str, SplitReport] = {split: SplitReport(split) for split in KNOWN_SPLITS}
    skips: list[tuple[int, str, str, str]] = []
    candidates = _screen(records, reports, skips)
    previous = _previous_shards(out_dir)
    journal = out_dir / JOURNAL_NAME

    with _Runner(workers) as runner:
        probes = runner.map(_probe, [(str(c.record.image_path), resize) for c in candidates])
        samples = _accept(candidates, probes, dataset, skips)
        tasks: list[_ShardTask] = []
        for split in KNOWN_SPLITS:
            for index, shard in enumerate(_cut(samples[split], samples_per_shard, max_shard_bytes)):
                name = _shard_name(split, index)
                plan = _plan_digest(shard, resize)
                member_total = sum(_member_bytes(s.jpg_bytes) + _member_bytes(len(s.json_bytes)) for s in shard)
                old = previous.get(name)
                tasks.append(_ShardTask(str(out_dir), name, tuple(shard), resize, plan, _tar_bytes(member_total),
                                        old[1] if old and old[0] == plan else None))
        plans = {task.name: task for task in tasks}
        results: dict[str, _ShardResult] = {}
        with open(journal, "a", encoding="utf-8") as log:
            for result in runner.unordered(_build_shard, tasks):
                results[result.name] = result
                entry = {"name": result.name, "plan": plans[result.name].plan, "sha256": result.sha256}
                log.write(json.dumps(entry) + "\n")
                log.flush()

    for _, split, source, reason in sorted(skips):
        report = _report(reports, split)
        report.skipped += 1
        report.skips.append({"source": source, "reason": reason})
    present = [split for split in KNOWN_SPLITS if reports[split].inputs > 0]
    for split in present:
        report = reports[split]
        report.written = len(samples[split])
        entries = [
            {"name": t.name, "samples": len(t.samples), "sha256": results[t.name].sha256,
             "bytes": results[t.name].bytes, "plan": t.plan}
            for t in tasks if t.name.startswith(f"{split}-")
        ]
        report.shards = len(entries)
        manifest = _manifest(split, dataset, report, samples[split], entries, resize, tool_args or {})
        _write_text_atomic(out_dir / f"{split}.manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    _remove_unlisted(out_dir, set(results), present)
    journal.unlink(missing_ok=True)

    final = {split: report for split, report in reports.items() if report.inputs > 0}
    assert all(report.balanced for report in final.values()), final
    if strict and skips:
        shown = "; ".join(f"{split} {source}: {reason}" for _, split, source, reason in sorted(skips)[:5])
        more = f" (and {len(skips) - 5} more)" if len(skips) > 5 else ""
        raise ShardWriteError(f"{len(skips)} record(s) skipped under --strict: {shown}{more}")
    return final


def format_accounting(reports: Mapping[str, SplitReport]) -> str:
    """One line per split: ``train: 120 inputs = 118 written + 2 skipped``."""
    return "\n".join(
        f"{split}: {r.inputs} inputs = {r.written} written + {r.skipped} skipped" for split, r in reports.items()
    )


# ----------------------------------------------------------------------------------------------- verification


def _check_sample(shard: str, key: str, split: str, dataset: str, jpg: bytes | None,
                  meta: bytes | None) -> tuple[list[str], int, int | None]:
    """Problems of one sample, its caption count and its pid."""
    problems: list[str] = []
    if jpg is None or meta is None:
        return [f"{shard}: sample {key} lacks its {'.jpg' if jpg is None else '.json'} member"], 0, None
    if not jpg.startswith(b"\xff\xd8"):
        problems.append(f"{shard}: {key}.jpg is not a JPEG")
    try:
        info = json.loads(meta.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return problems + [f"{shard}: {key}.json does not parse: {exc}"], 0, None
    if not isinstance(info, dict):
        return problems + [f"{shard}: {key}.json is not an object"], 0, None
    for field_name, expected in (("key", key), ("split", split), ("dataset", dataset)):
        if info.get(field_name) != expected:
            problems.append(f"{shard}: {key}.json has {field_name}={info.get(field_name)!r}, expected {expected!r}")
    captions = info.get("captions", {}).get("en") if isinstance(info.get("captions"), dict) else None
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
        problems.append(f"{shard}: {key}.json has no non-empty English captions")
        captions = []
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int):
        problems.append(f"{shard}: {key}.json has a non-integer pid {pid!r}")
        pid = None
    return problems, len(captions), pid


def _read_members(path: Path) -> list[tuple[str, bytes | None]]:
    members: list[tuple[str, bytes | None]] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            members.append((info.name, data))
    return members


def _verify_shard(path: Path, entry: Mapping[str, Any], split: str, dataset: str, first_index: int,
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
    samples: dict[str, dict[str, bytes | None]] = {}
    for member_name, data in members:
        match = _MEMBER_NAME.match(member_name)
        if data is None or match is None or match["ext"] not in ("jpg", "json"):
            problems.append(f"{name}: unexpected member {member_name!r}")
            continue
        samples.setdefault(match["key"], {})[match["ext"]] = data
    for offset, (key, parts) in enumerate(samples.items()):
        expected_key = f"{split}_{first_index + offset:07d}"
        if key != expected_key:
            problems.append(f"{name}: key {key!r} where {expected_key!r} was expected")
        sample_problems, num_captions, pid = _check_sample(name, key, split, dataset, parts.get("jpg"),
                                                           parts.get("json"))
        problems += sample_problems
        totals["captions"] += num_captions
        if pid is not None:
            totals["pids"].add(pid)
    if len(samples) != entry.get("samples"):
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry.get('samples')}")
    totals["samples"] += len(samples)
    return problems


def _verify_manifest(path: Path, listed: set[str]) -> list[str]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path.name}: unreadable manifest: {exc}"]
    required = ("dataset", "split", "samples", "captions", "identities", "shards", "skipped", "inputs")
    missing = [key for key in required if key not in manifest] if isinstance(manifest, dict) else list(required)
    if missing:
        return [f"{path.name}: manifest lacks {missing}"]
    split, dataset = manifest["split"], manifest["dataset"]
    problems: list[str] = []
    if path.name != f"{split}.manifest.json":
        problems.append(f"{path.name}: manifest is for split {split!r}")
    totals: dict[str, Any] = {"samples": 0, "captions": 0, "pids": set()}
    for entry in manifest["shards"]:
        name = str(entry.get("name", ""))
        listed.add(name)
        match = _SHARD_NAME.match(name)
        if not match or match["split"] != split:
            problems.append(f"{path.name}: shard name {name!r} does not belong to split {split!r}")
            continue
        problems += _verify_shard(path.parent / name, entry, split, dataset, totals["samples"], totals)
    checks = (("samples", totals["samples"], manifest["samples"]),
              ("captions", totals["captions"], manifest["captions"].get("en")),
              ("identities", len(totals["pids"]), manifest["identities"]))
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
