"""One shard's samples, in order, from wherever it lives (a local path, URL or pipe: command:
``dsmoe.data.location``), from its start or from a sample whose byte offset is known.

dsmoe's shards are plain USTAR tars, read header by header (``dsmoe.data.tar.scan_members``), which gives every
member's place in the file: a sample's media can be left where it is (``MediaRef``) and read later
(``load_media``), and a reader can start again at the byte where a sample begins. Anything that is not a whole,
well-formed USTAR tar is read through ``tarfile`` (webdataset's iterator) from its start instead, which decides
what damage means, so a damaged shard gives the same samples and faults however it is entered.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dsmoe.data.bad_samples import SampleFault
from dsmoe.data import location
from dsmoe.data.format import ShardEntry
from dsmoe.data.location import DEFAULT_READS, RemoteReads
from dsmoe.data.tar import TAR_BLOCK, UnscannableTar, scan_members


@dataclass(frozen=True)
class MediaRef:
    """Where a member's bytes are in its shard."""

    address: str
    offset: int
    size: int


def shard_samples(shard: ShardEntry, faults: list[SampleFault], owns=lambda position: True,
                  skip_media: Callable[[], bool] | None = None, start: int = 0, offset: int | None = None,
                  reads: RemoteReads = DEFAULT_READS, checksum: bool = True) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of one shard from its sample ``start`` on (at byte ``offset`` when known, else found
    by reading from the shard's start); members are never unpickled.

    A sample is ``{"__key__", "__shard__", ext: bytes, ..., "__start__": byte offset of its first member,
    "__end__": after its last}`` (the offsets None where the shard is read through tarfile; ``__start__`` None too
    where the shard cannot be read from a byte again, a pipe: command). While ``skip_media()`` is true, a seekable
    shard's media are not read: they are ``MediaRef``s, to be read if needed.

    The shard must be what its manifest says: a size that differs (known when it is opened) means none of its
    samples is read; a shard read whole from its start is also checked against the manifest's sha256 (when
    ``checksum``) and byte count, and a difference found at its end makes each of its samples a fault, although
    they were given. A remote shard that fails part-way is read on from where it failed (``RemoteStream``); when it
    finally gives up, or anything else stops the tar short (truncation, garbage, an empty file), the shard ends.
    Each of its ``shard.samples`` not read, or not the manifest's, becomes a fault, for the positions ``owns``
    says are this reader's.
    """
    path, expected = shard.address, shard.samples
    name = location.file_name(path)
    position, error, mismatch, scan = start, "", None, True
    while True:
        entry, index = (offset, start) if scan and offset is not None else (0, 0)  # where reading starts: its byte
        try:                                                                         # and its sample's position
            with _members(shard, skip_media if scan else None, entry, scan, reads, checksum) as (members, check):
                for sample in _grouped(members, name):
                    if index >= position:  # samples already given (after a retry, or before ``start``) are passed
                        if location.is_pipe(path):
                            sample["__start__"] = None
                        yield position, sample
                        position += 1
                    index += 1
                if check is not None:
                    mismatch = check.verdict()
            break
        except UnscannableTar:
            scan = False  # not a whole tar as dsmoe writes them: read it through tarfile, which judges damage
        except ShardMismatch as exc:
            mismatch = str(exc)
            break
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            error = f" ({type(exc).__name__}: {str(exc).split(' @ ')[0]})"
            break
    if mismatch:
        faults.extend(SampleFault(name, p, mismatch) for p in range(start, max(expected, position)) if owns(p))
        return
    problem = f"unreadable: the tar ends after {position} of {expected} samples{error}"
    if position > expected and owns(expected):
        faults.append(SampleFault(name, expected, f"the shard holds {position} samples, its manifest {expected}"))
    faults.extend(SampleFault(name, p, problem) for p in range(position, expected) if owns(p))


class ShardMismatch(OSError):
    """A shard whose size differs from its manifest's, found when it is opened."""


class _Checked(io.RawIOBase):
    """A stream read from its first byte, counted and hashed as it goes, to be held against its manifest entry."""

    def __init__(self, raw, shard: ShardEntry, checksum: bool):
        super().__init__()
        self.raw, self.shard, self.count = raw, shard, 0
        self.digest = hashlib.sha256() if checksum and shard.sha256 else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        if self.digest is not None:
            self.digest.update(data)
        return n

    def verdict(self) -> str | None:
        """Read to the end (the tar's closing blocks); what differs from the manifest, or None."""
        while self.read(1 << 16):
            pass
        if self.shard.bytes is not None and self.count != self.shard.bytes:
            return f"the shard has {self.count} bytes, its manifest {self.shard.bytes}: {_REPLACED}"
        if self.digest is not None and self.digest.hexdigest() != self.shard.sha256:
            return f"the shard's sha256 differs from its manifest's: {_REPLACED}"
        return None


_REPLACED = "it is not the shard the manifest describes (replaced or damaged since it was written)"


def _size_mismatch(shard: ShardEntry, size: int | None) -> None:
    if shard.bytes is not None and size is not None and size != shard.bytes:
        raise ShardMismatch(f"the shard has {size} bytes, its manifest {shard.bytes}: {_REPLACED}; not read")


@contextmanager
def _members(shard: ShardEntry, skip_media: Callable[[], bool] | None, offset: int, scan: bool,
             reads: RemoteReads, checksum: bool) -> Iterator[tuple[Iterator[dict], _Checked | None]]:
    """The tar members of a shard from byte ``offset`` as ``{"fname", "data", "offset", "size"}`` (offset: of the
    data; None through tarfile), and the check of a shard read whole from its start. With ``skip_media``, a
    seekable file is opened and the media's bytes are left where they are while ``skip_media()``."""
    path = shard.address
    seekable = location.open_random(path, reads) if scan and skip_media is not None else None
    if seekable is not None:
        with seekable as f:
            _size_mismatch(shard, location.stream_size(f))

            def wanted(member: str) -> bool:
                return member.endswith(".json") or not skip_media()
            yield _scanned(f, path, wanted, offset), None
        return
    with location.open_stream(path, offset=offset, reads=reads) as stream:
        _size_mismatch(shard, location.stream_size(stream))
        check = _Checked(stream, shard, checksum) if offset == 0 else None
        f = io.BufferedReader(check or stream, 1 << 16)  # headers are read a block at a time
        if not scan:
            yield ({"fname": m["fname"], "data": m["data"], "offset": None, "size": len(m["data"])}
                   for m in tar_file_iterator(f)), check
        else:
            yield _scanned(f, path, lambda member: True, offset), check


def _scanned(f, path: str, wanted: Callable[[str], bool], offset: int) -> Iterator[dict]:
    for member, at, size, data in scan_members(f, wanted, start=offset):
        yield {"fname": member, "data": MediaRef(path, at, size) if data is None else data, "offset": at, "size": size}


def sample_at(path: str, offset: int, files: dict, reads: RemoteReads = DEFAULT_READS) -> dict:
    """The sample whose first member begins at byte ``offset`` of a seekable shard (``files``: as ``load_media``),
    its media left as ``MediaRef``s. ``UnscannableTar`` where no sample dsmoe wrote begins there."""
    members = _scanned(_opened(path, files, reads), path, lambda member: member.endswith(".json"), offset)
    for sample in _grouped(members, location.file_name(path)):
        return sample
    raise UnscannableTar(f"no sample at byte {offset} of {path}")


def load_media(media, files: dict, reads: RemoteReads = DEFAULT_READS) -> bytes | list[bytes]:
    """``media`` with every ``MediaRef`` read (``files``: address -> open seekable file, kept for later reads)."""
    if isinstance(media, list):
        return [load_media(item, files, reads) for item in media]
    if not isinstance(media, MediaRef):
        return media
    f = _opened(media.address, files, reads)
    f.seek(media.offset)
    data = f.read(media.size)
    if len(data) != media.size:
        raise EOFError(f"{location.file_name(media.address)} ends inside a member")
    return data


def _opened(address: str, files: dict, reads: RemoteReads):
    """The open seekable file of ``address`` in ``files``, opened on first use."""
    if address not in files:
        files[address] = location.open_random(address, reads)
    return files[address]


def _grouped(members: Iterator[dict], shard: str) -> Iterator[dict]:
    """Consecutive tar members sharing a key as one sample (see ``shard_samples``)."""
    current: dict | None = None
    for member in members:
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            at = member["offset"]
            current = {"__key__": key, "__shard__": shard, "__start__": None if at is None else at - TAR_BLOCK,
                       "__end__": None}
        current[ext.lower()] = member["data"]
        if member["offset"] is not None:
            current["__end__"] = member["offset"] + -(-member["size"] // TAR_BLOCK) * TAR_BLOCK
    if current is not None:
        yield current
