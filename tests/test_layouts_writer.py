"""Internals of the shard writer that the speed depends on: one encode per image, tar bytes equal to tarfile's."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from dsmoe.shards import tar as shard_tar
from dsmoe.shards import workers as shard_workers
import synthetic_crosslingual as synth
from dsmoe.shards.layouts.multi30k import read_multi30k
from dsmoe.shards.verify import verify_shards
from dsmoe.shards.writer import write_shards


@pytest.mark.parametrize("sizes", [[0], [1, 511, 512, 513], [10_000, 3, 20_000, 1024 * 9 + 17]])
def test_tar_writer_writes_the_bytes_tarfile_writes(sizes: list[int]) -> None:
    members = [(f"k_{i:07d}.{'jpg' if i % 2 else 'json'}", bytes([i % 251]) * size) for i, size in enumerate(sizes)]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    written = io.BytesIO()
    writer = shard_tar.TarWriter(written)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    assert written.getvalue() == expected.getvalue()
    assert writer.digest.hexdigest() == hashlib.sha256(expected.getvalue()).hexdigest()
    assert writer.offset == len(expected.getvalue())
    total = sum(shard_tar.member_bytes(len(d)) for _, d in members)
    assert len(written.getvalue()) == shard_tar.tar_bytes(total)


def test_each_image_is_encoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = synth.make_multi30k(tmp_path / "m", per_split=(5, 2, 2), faults=False)
    records = read_multi30k(layout.root).records
    calls = {"n": 0}
    real = shard_workers.encode_jpeg

    def counting(image, resize):
        calls["n"] += 1
        return real(image, resize)

    monkeypatch.setattr(shard_workers, "encode_jpeg", counting)
    write_shards(records, tmp_path / "resized", dataset="multi30k", resize=(12, 16), samples_per_shard=2)
    assert calls["n"] == len(records) == 9
    calls["n"] = 0
    write_shards(records, tmp_path / "as-is", dataset="multi30k", samples_per_shard=2)
    assert calls["n"] == 0  # RGB JPEG files pass through unchanged
    assert verify_shards(tmp_path / "resized") == [] and verify_shards(tmp_path / "as-is") == []
    assert not (tmp_path / "resized" / shard_workers.SPILL_NAME).exists()
