"""Damage WebDataset shards the ways real data goes bad.

The manifests keep describing the intact shards, as when a shard is damaged in storage after it was written:
readers then refuse a shard whose size differs from its manifest's and fault a shard whose content does. Damage
made before the manifest was written (the source had it) is modelled by ``restate_manifests``, which makes the
manifests describe the damaged shards, so that the readers meet the damage sample by sample."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

Members = list[tuple[str, bytes]]


def read_members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def write_members(path: Path, members: Members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def keys(path: Path) -> list[str]:
    """Sample keys of a shard, in order."""
    return list(dict.fromkeys(name.split(".", 1)[0] for name, _ in read_members(path)))


def edit_sample(path: Path, position: int, edit: Callable[[Members], Members]) -> str:
    """Replace the members of the sample at ``position`` by ``edit(members)``; returns the sample's key."""
    members = read_members(path)
    key = keys(path)[position]
    mine = [m for m in members if m[0].split(".", 1)[0] == key]
    first = members.index(mine[0])
    rest = [m for m in members if m[0].split(".", 1)[0] != key]
    write_members(path, rest[:first] + edit(mine) + rest[first:])
    return key


def corrupt_image(members: Members) -> Members:
    return [(n, b"\xff\xd8 this is no jpeg" if n.endswith(".jpg") else d) for n, d in members]


def truncate_image(members: Members) -> Members:
    return [(n, d[: len(d) // 2] if n.endswith(".jpg") else d) for n, d in members]


def bad_json(members: Members) -> Members:
    return [(n, b'{"key": "broken' if n.endswith(".json") else d) for n, d in members]


def no_captions(members: Members) -> Members:
    def strip(data: bytes) -> bytes:
        meta = json.loads(data)
        meta.pop("captions")
        return json.dumps(meta).encode()
    return [(n, strip(d) if n.endswith(".json") else d) for n, d in members]


def drop(suffix: str) -> Callable[[Members], Members]:
    return lambda members: [(n, d) for n, d in members if not n.endswith(suffix)]


def truncate_file(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage_inside(path: Path, position: int) -> None:
    """Overwrite the tar header of the sample at ``position`` with garbage (tar readers stop there)."""
    members = read_members(path)
    key = keys(path)[position]
    offset = 0
    for name, data in members:
        if name.split(".", 1)[0] == key:
            break
        offset += 512 + -(-len(data) // 512) * 512
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 512] = bytes((i * 37 + 11) % 256 for i in range(512))
    path.write_bytes(bytes(raw))


def empty_tar(path: Path) -> None:
    write_members(path, [])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def restate_manifests(shard_dir: Path) -> None:
    """Make every manifest of ``shard_dir`` record its shards' present size and sha256 (sample counts unchanged)."""
    for manifest_path in shard_dir.glob("*.manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest["shards"]:
            data = (shard_dir / shard["name"]).read_bytes()
            shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        manifest_path.write_text(json.dumps(manifest, indent=2))


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
