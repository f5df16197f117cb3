"""Re-reading shards against their manifests: checksums, member names, keys, JSON content and counts."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsmoe.data.format import FRAME_EXT, MEMBER_NAME, SHARD_NAME, sample_key
from dsmoe.shards.tar import sha256_file


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
    frames = sorted((int(m[1]), ext) for ext in parts if (m := FRAME_EXT.match(ext)))
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
    if sha256_file(path) != entry.get("sha256"):
        return problems + [f"{name}: sha256 does not match the manifest (corrupted or replaced)"]
    try:
        members = _read_members(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return problems + [f"{name}: not a readable tar file: {exc}"]
    samples: dict[str, dict[str, bytes]] = {}
    for member_name, data in members:
        match = MEMBER_NAME.match(member_name)
        ext = match["ext"] if match else ""
        if data is None or match is None or not (ext in ("jpg", "json") or FRAME_EXT.match(ext)):
            problems.append(f"{name}: unexpected member {member_name!r}")
            continue
        samples.setdefault(match["key"], {})[ext] = data
    for offset, (key, parts) in enumerate(samples.items()):
        expected_key = sample_key(split, first_index + offset)
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
        match = SHARD_NAME.match(name)
        if not match or match["split"] != split:
            problems.append(f"{path.name}: shard name {name!r} does not belong to split {split!r}")
            continue
        found = _verify_shard(path.parent / name, entry, split, dataset, person, totals["samples"], totals)
        # the first problem of a shard says what is wrong; the rest usually follow from it
        problems += found[:1] + ([f"{name}: {len(found) - 1} more problems after the first"] if len(found) > 1 else [])
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
