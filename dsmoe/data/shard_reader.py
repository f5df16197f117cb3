"""One shard's samples, in order, from wherever it lives (a local path, URL or pipe: command:
``dsmoe.shards.location``), from its start or from a sample whose byte offset is known.

dsmoe's shards are plain USTAR tars, read header by header (``dsmoe.shards.tar.scan_members``), which gives every
member's place in the file: a sample's media can be left where it is (``MediaRef``) and read later
(``load_media``), and a reader can start again at the byte where a sample begins. Anything that is not a whole,
well-formed USTAR tar is read through ``tarfile`` (webdataset's iterator) from its start instead, which decides
what damage means, so a damaged shard gives the same samples and faults however it is entered.
"""
from __future__ import annotations

import io
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dsmoe.data.faults import SampleFault
from dsmoe.shards import location
from dsmoe.shards.tar import TAR_BLOCK, UnscannableTar, scan_members


@dataclass(frozen=True)
class MediaRef:
    """Where a member's bytes are in its shard."""

    address: str
    offset: int
    size: int


def shard_samples(path: str, expected: int, faults: list[SampleFault], owns=lambda position: True,
                  skip_media: Callable[[], bool] | None = None, start: int = 0,
                  offset: int | None = None) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of one shard from its sample ``start`` on (at byte ``offset`` when known, else found
    by reading from the shard's start); members are never unpickled.

    A sample is ``{"__key__", "__shard__", ext: bytes, ..., "__start__": byte offset of its first member,
    "__end__": after its last}`` (the offsets None where the shard is read through tarfile; ``__start__`` None too
    where the shard cannot be read from a byte again, a pipe: command). While
    ``skip_media()`` is true, a seekable shard's media are not read: they are ``MediaRef``s, to be read if needed.

    A remote shard that fails part-way is opened again (``location.RETRIES`` times) and read on from where it
    failed. Whatever else stops the tar short (truncation, garbage, an empty file) ends the shard: each of its
    ``expected`` samples not read becomes a fault, for the positions ``owns`` says are this reader's.
    """
    name = location.file_name(path)
    position, error, retries = start, "", 0 if location.is_local(path) else location.RETRIES
    scan, rereadable = True, not location.is_pipe(path)
    while True:
        entry, index = (offset, start) if scan and offset is not None else (0, 0)  # where reading starts: its byte
        try:                                                                         # and its sample's position
            with _members(path, skip_media if scan else None, entry, scan) as members:
                for sample in _grouped(members, name):
                    if index >= position:  # samples already given (after a retry, or before ``start``) are passed
                        if not rereadable:
                            sample["__start__"] = None
                        yield position, sample
                        position += 1
                    index += 1
            break
        except UnscannableTar:
            scan = False  # not a whole tar as dsmoe writes them: read it through tarfile, which judges damage
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            error = f" ({type(exc).__name__}: {str(exc).split(' @ ')[0]})"
            if retries == 0 or isinstance(exc, FileNotFoundError):
                break
            retries -= 1
            time.sleep(location.RETRY_WAIT)
    problem = f"unreadable: the tar ends after {position} of {expected} samples{error}"
    if position > expected and owns(expected):
        faults.append(SampleFault(name, expected, f"the shard holds {position} samples, its manifest {expected}"))
    faults.extend(SampleFault(name, p, problem) for p in range(position, expected) if owns(p))


@contextmanager
def _members(path: str, skip_media: Callable[[], bool] | None, offset: int, scan: bool) -> Iterator[Iterator[dict]]:
    """The tar members of a shard from byte ``offset`` as ``{"fname", "data", "offset", "size"}`` (offset: of the
    data; None through tarfile). With ``skip_media``, a seekable file is opened and the media's bytes are left where
    they are while ``skip_media()``."""
    if not scan:
        with location.open_stream(path) as stream:
            yield ({"fname": m["fname"], "data": m["data"], "offset": None, "size": len(m["data"])}
                   for m in tar_file_iterator(stream))
        return
    seekable = location.open_random(path) if skip_media is not None else None
    if seekable is None:
        skip_media = None
    with (seekable or location.open_stream(path, offset=offset)) as f:
        if not f.seekable():
            f = io.BufferedReader(f, 1 << 16)  # headers are read a block at a time

        def wanted(member: str) -> bool:
            return skip_media is None or member.endswith(".json") or not skip_media()
        yield _scanned(f, path, wanted, offset)


def _scanned(f, path: str, wanted: Callable[[str], bool], offset: int) -> Iterator[dict]:
    for member, at, size, data in scan_members(f, wanted, start=offset):
        yield {"fname": member, "data": MediaRef(path, at, size) if data is None else data, "offset": at, "size": size}


def sample_at(path: str, offset: int, files: dict) -> dict:
    """The sample whose first member begins at byte ``offset`` of a seekable shard (``files``: as ``load_media``),
    its media left as ``MediaRef``s. ``UnscannableTar`` where no sample dsmoe wrote begins there."""
    members = _scanned(_opened(path, files), path, lambda member: member.endswith(".json"), offset)
    for sample in _grouped(members, location.file_name(path)):
        return sample
    raise UnscannableTar(f"no sample at byte {offset} of {path}")


def load_media(media, files: dict) -> bytes | list[bytes]:
    """``media`` with every ``MediaRef`` read (``files``: address -> open seekable file, kept for later reads)."""
    if isinstance(media, list):
        return [load_media(item, files) for item in media]
    if not isinstance(media, MediaRef):
        return media
    f = _opened(media.address, files)
    f.seek(media.offset)
    data = f.read(media.size)
    if len(data) != media.size:
        raise EOFError(f"{location.file_name(media.address)} ends inside a member")
    return data


def _opened(address: str, files: dict):
    """The open seekable file of ``address`` in ``files``, opened on first use."""
    if address not in files:
        files[address] = location.open_random(address)
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
