"""Planning the shards: screening records, accepting the prepared ones (duplicates out, keys in), cutting shards by
count and exact size, and recognising shards an earlier run already wrote (manifests and the journal)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsmoe.data.format import FORMAT_VERSION, KNOWN_SPLITS, sample_key
from dsmoe.shards.records import RawRecord, ShardWriteError, caption_map
from dsmoe.shards.tar import tar_bytes
from dsmoe.shards.tasks import Candidate, PrepTask, Probe, Sample, SplitReport, Work, sample_bytes
from dsmoe.shards.workers import MAX_CHUNK

JOURNAL_NAME = ".make_shards.journal.jsonl"
REASON_EMPTY_CAPTIONS = "no non-empty caption"
REASON_DUPLICATE = "duplicate of an earlier record with the same split and source"
REASON_DUPLICATE_ID = "duplicate of an earlier record with the same split and image id"
REASON_UNKNOWN_SPLIT = "unknown split"


def split_report(reports: dict[str, SplitReport], split: str) -> SplitReport:
    if split not in reports:
        reports[split] = SplitReport(split)
    return reports[split]


def screen(records: Sequence[RawRecord], reports: dict[str, SplitReport],
            skips: list[tuple[int, str, str, str]]) -> list[Candidate]:
    """Count inputs; skip unknown splits and records without a caption. Returns the rest in order."""
    kept: list[Candidate] = []
    for index, record in enumerate(records):
        split_report(reports, record.split).inputs += 1
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
        kept.append(Candidate(index, record, tuple(captions), tuple(dropped)))
    return kept


def _json_member(key: str, candidate: Candidate, dataset: str, frames: int) -> bytes:
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


def accept(candidates: Sequence[Candidate], probes: Sequence[Probe], dataset: str, frames: int,
            skips: list[tuple[int, str, str, str]], dropped: dict[str, Counter]) -> dict[str, list[Sample]]:
    """Skip bad inputs and duplicates; give the accepted records their keys, per split in order."""
    samples: dict[str, list[Sample]] = {split: [] for split in KNOWN_SPLITS}
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
        key = sample_key(record.split, len(split_samples))
        assert "." not in key
        split_samples.append(Sample(
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


def cut(samples: Sequence[Sample], samples_per_shard: int, max_shard_bytes: int) -> list[list[Sample]]:
    """Split samples into shards by count and by exact tar size."""
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    member_total = 0
    for sample in samples:
        size = sample_bytes(sample)
        too_big = current and tar_bytes(member_total + size) > max_shard_bytes
        if current and (len(current) >= samples_per_shard or too_big):
            shards.append(current)
            current, member_total = [], 0
        current.append(sample)
        member_total += size
    if current:
        shards.append(current)
    return shards


def plan_digest(samples: Sequence[Sample], resize: tuple[int, int] | None, frames: int) -> str:
    """A digest of everything that determines a shard's bytes (for resuming)."""
    plan: list[Any] = [FORMAT_VERSION, list(resize) if resize else None]
    if any(s.video for s in samples):
        plan.append({"frames": frames})
    plan.append([[s.key, s.raw_sha256, s.passthrough, s.json_bytes.decode("utf-8")] for s in samples])
    return hashlib.sha256(json.dumps(plan, separators=(",", ":")).encode("utf-8")).hexdigest()


def previous_shards(out_dir: Path) -> dict[str, tuple[str, str]]:
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


def prep_tasks(candidates: Sequence[Candidate], spill_dir: Path, resize: tuple[int, int] | None, frames: int,
                workers: int) -> list[PrepTask]:
    """Chunks of consecutive candidates (smaller for videos, and small enough to keep every worker busy)."""
    tasks: list[PrepTask] = []
    start = 0
    while start < len(candidates):
        video = candidates[start].record.video
        limit = 2 if video else MAX_CHUNK
        size = max(1, min(limit, -(-len(candidates) // (workers * 4))))
        chunk = candidates[start:start + size]
        work = tuple(Work(str(c.record.image_path) if c.record.image_path is not None else None, c.record.blob,
                           c.record.video) for c in chunk)
        tasks.append(PrepTask(len(tasks), str(spill_dir), work, resize, frames))
        start += size
    return tasks
