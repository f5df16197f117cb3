"""``write_shards``: raw records to shards and manifests (the steps are described in ``dsmoe.shards``)."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsmoe.files import write_atomic
from dsmoe.progress import Phase
from dsmoe.data.format import FORMAT_NAME, FORMAT_VERSION, KNOWN_SPLITS, SHARD_NAME, manifest_address, shard_name
from dsmoe.shards.plan import JOURNAL_NAME, accept, cut, plan_digest, prep_tasks, previous_shards, screen, split_report
from dsmoe.shards.records import RawRecord, ShardWriteError, writing
from dsmoe.shards.tar import tar_bytes
from dsmoe.shards.tasks import Sample, ShardResult, ShardTask, SplitReport, sample_bytes
from dsmoe.shards.workers import DEFAULT_FRAMES, SPILL_NAME, Runner, build_shard, prepare


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




def _manifest(split: str, dataset: str, report: SplitReport, samples: Sequence[Sample],
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
            match = SHARD_NAME.match(path.name)
            if match and match["split"] == split and path.name not in listed:
                path.unlink(missing_ok=True)
        if split not in present:
            (out_dir / f"{split}.manifest.json").unlink(missing_ok=True)


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
    progress: bool = False,
) -> dict[str, SplitReport]:
    """Write ``records`` as WebDataset shards plus one manifest per split under ``out_dir``.

    ``caption_reports`` (merged caption files, with their unmatched entries) and ``notes`` (what the layout
    reader decided) are recorded in every manifest; ``progress`` reports how far reading and writing are.
    Returns a report per split (known splits with input first,
    then unknown split names). With ``workers > 1`` a spawn-context process pool is used; call it under
    ``if __name__ == "__main__":``. Raises :class:`ShardWriteError` for bad options, and with ``strict=True``
    when any record was skipped or any caption-file entry matched no sample: then the shards are written but no
    manifest is (a re-run reuses the shards).
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
    candidates = screen(records, reports, skips)
    previous = previous_shards(out_dir)
    journal = out_dir / JOURNAL_NAME
    dropped: dict[str, Counter] = {split: Counter() for split in KNOWN_SPLITS}

    try:
        with Runner(workers) as runner:
            probes = []
            with Phase("reading inputs", len(candidates), "inputs", enabled=progress) as phase:
                for chunk in runner.map(prepare, prep_tasks(candidates, spill_dir, resize, frames, workers)):
                    probes += chunk
                    phase.advance(len(chunk))
            samples = accept(candidates, probes, dataset, frames, skips, dropped)
            tasks: list[ShardTask] = []
            for split in KNOWN_SPLITS:
                for index, shard in enumerate(cut(samples[split], samples_per_shard, max_shard_bytes)):
                    name = shard_name(split, index)
                    plan = plan_digest(shard, resize, frames)
                    old = previous.get(name)
                    tasks.append(ShardTask(str(out_dir), name, tuple(shard), plan,
                                            tar_bytes(sum(sample_bytes(s) for s in shard)),
                                            old[1] if old and old[0] == plan else None))
            plans = {task.name: task for task in tasks}
            results: dict[str, ShardResult] = {}
            with writing(journal):
                log = open(journal, "a", encoding="utf-8")
            with log, Phase("writing shards", len(tasks), "shards", enabled=progress) as phase:
                for result in runner.unordered(build_shard, tasks):
                    phase.advance()
                    results[result.name] = result
                    entry = {"name": result.name, "plan": plans[result.name].plan, "sha256": result.sha256}
                    with writing(journal):
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    failure = _strict_failure(skips, caption_reports, len(results)) if strict else None
    if failure:  # the shards stay, listed in the journal for a re-run; no manifest says they are complete
        for split in KNOWN_SPLITS:
            Path(manifest_address(out_dir, split)).unlink(missing_ok=True)
        raise failure
    for _, split, source, reason in sorted(skips):
        report = split_report(reports, split)
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
        path = Path(manifest_address(out_dir, split))
        with writing(path):
            write_atomic(path, json.dumps(manifest, indent=1, ensure_ascii=False), durable=True)
    _remove_unlisted(out_dir, set(results), present)
    journal.unlink(missing_ok=True)

    final = {split: report for split, report in reports.items() if report.inputs > 0}
    assert all(report.balanced for report in final.values()), final
    return final


def _strict_failure(skips: list[tuple[int, str, str, str]], caption_reports: Sequence[Mapping[str, Any]],
                    shards: int) -> ShardWriteError | None:
    """The error of a ``strict`` run that skipped records or left caption entries unmatched (None if clean)."""
    unmatched = sum(len(r.get("unmatched", [])) for r in caption_reports)
    if not (skips or unmatched):
        return None
    problems = [f"{split} {source}: {reason}" for _, split, source, reason in sorted(skips)]
    problems += [f"{r['path']}: {item['image']!r} {item['reason']}" for r in caption_reports
                 for item in r.get("unmatched", [])]
    shown = "; ".join(problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    head = f"{len(skips)} record(s) skipped" + (f" and {unmatched} caption entr(ies) unmatched" if unmatched else "")
    return ShardWriteError(f"{head} under --strict: {shown}{more}. No manifest was written, so nothing reads these "
                           f"shards; a re-run (with the input fixed, or without --strict) reuses the {shards} shards "
                           f"already written")


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
