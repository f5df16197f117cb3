"""Where shards live: a local directory, a URL prefix read through fsspec (``http(s)://``, ``s3://``, ``gs://``,
any protocol fsspec knows), or webdataset's ``pipe:`` form, a shell command writing the file to stdout with
``{name}`` standing for the file's name (``pipe:aws s3 cp s3://bucket/shards/{name} -``).

A split's manifest and its shards are read from the same place. Credentials come from the environment as the
ecosystem's tools take them (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``~/.netrc``, ...). Opening a remote file is retried; a failure names the URL. fsspec and its protocol packages
are imported only when a remote location is used.
"""
from __future__ import annotations

import io
import shlex
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

RETRIES = 3
"""Attempts after the first to open (or re-read) a remote file."""
RETRY_WAIT = 0.5
"""Seconds before the first retry; doubled before each next one."""


# errors that another attempt would only repeat
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, TypeError, AttributeError, ImportError)


class ShardSourceError(OSError):
    """A remote shard or manifest could not be read; the message names the URL."""


def is_pipe(location: str) -> bool:
    return location.startswith("pipe:")


def is_local(location: str | Path) -> bool:
    location = str(location)
    return "://" not in location and not is_pipe(location)


def child(location: str | Path, name: str) -> str:
    """The address of the file ``name`` in ``location``."""
    location = str(location)
    if is_pipe(location):
        if "{name}" not in location:
            raise ValueError(f"a pipe: shard location needs {{name}} where the file name goes: {location}")
        return location.replace("{name}", shlex.quote(name))
    if is_local(location):
        return str(Path(location) / name)
    return location.rstrip("/") + "/" + name


def file_name(address: str | Path) -> str:
    """The file name of a shard address (for messages and sample identities)."""
    address = str(address)
    if is_pipe(address):
        return shlex.split(address[len("pipe:"):])[-1].rsplit("/", 1)[-1] if address[5:].strip() else address
    return address.rstrip("/").rsplit("/", 1)[-1]


def _with_retries(address: str, attempt):
    """``attempt()``, retried with growing waits on errors other than a missing file; the last error names
    ``address``."""
    wait = RETRY_WAIT
    for tries in range(RETRIES + 1):
        try:
            return attempt()
        except NOT_TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 - network stacks raise many types
            if tries == RETRIES:
                raise ShardSourceError(f"could not read {address} after {RETRIES + 1} attempts: "
                                       f"{type(exc).__name__}: {exc}") from exc
            time.sleep(wait)
            wait *= 2


def _fsspec_open(address: str, **options):
    """An fsspec file (``options``: of the filesystem's ``open``); a new filesystem object each time, so that it
    sees the environment as it is now."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(address, skip_instance_cache=True)
        return fs.open(path, "rb", **options)
    except ImportError as exc:
        raise ShardSourceError(f"reading {address} needs the package for its protocol ({exc}); e.g. pip install "
                               f"s3fs (s3://), gcsfs (gs://) or aiohttp (http://)") from None


def _http_stream(address: str, offset: int = 0) -> BinaryIO:
    """One streamed GET from byte ``offset`` on (fsspec's would ask for the size first and call any failure a
    missing file)."""
    import requests

    headers = {"Range": f"bytes={offset}-"} if offset else {}
    response = requests.get(address, stream=True, timeout=60, headers=headers)
    if response.status_code == 404:
        response.close()
        raise FileNotFoundError(f"{address} (HTTP 404)")
    response.raise_for_status()
    response.raw.decode_content = True
    if offset and response.status_code != 206:  # the server sent the whole file
        _discard(response.raw, offset)
    return response.raw


def _discard(stream: BinaryIO, size: int) -> None:
    """Read past ``size`` bytes of a stream."""
    while size > 0:
        chunk = stream.read(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the file ends before the place to read from")
        size -= len(chunk)


def read_bytes(address: str | Path) -> bytes:
    """The whole file at ``address`` (local, URL or pipe:); ``FileNotFoundError`` when it does not exist."""
    address = str(address)
    if is_local(address):
        return Path(address).read_bytes()

    def attempt() -> bytes:
        with open_stream(address, retries=False) as stream:
            return stream.read()
    return _with_retries(address, attempt)


@contextmanager
def open_stream(address: str | Path, retries: bool = True, offset: int = 0) -> Iterator[BinaryIO]:
    """The file at ``address`` for reading from byte ``offset`` to the end (opening retried for remote files)."""
    address = str(address)
    if is_local(address):
        with open(address, "rb") as f:
            f.seek(offset)
            yield f
    elif is_pipe(address):
        with _pipe(address) as f:
            _discard(f, offset)
            yield f
    else:
        if address.startswith(("http://", "https://")):
            def opener():
                return _http_stream(address, offset)
        else:
            def opener():
                f = _fsspec_open(address)
                f.seek(offset)
                return f
        stream = _with_retries(address, opener) if retries else opener()
        try:
            yield stream
        finally:
            stream.close()


def open_random(address: str | Path) -> BinaryIO | None:
    """The file at ``address`` for reads at any offset (remote: ranged requests); None for a pipe: command."""
    address = str(address)
    if is_local(address):
        return open(address, "rb")
    if is_pipe(address):
        return None
    return _with_retries(address, lambda: _fsspec_open(address, block_size=1 << 16, cache_type="readahead"))


@contextmanager
def _pipe(address: str) -> Iterator[BinaryIO]:
    """A shell command's stdout; a non-zero exit is an error naming the command (FileNotFoundError before any
    byte came out, so a missing manifest reads as missing)."""
    command = address[len("pipe:"):]
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    counted = _Counted(proc.stdout)
    try:
        yield counted
    finally:
        proc.stdout.close()
        proc.wait()
        error = proc.stderr.read().decode(errors="replace").strip()[-500:]
        proc.stderr.close()
    if proc.returncode != 0:
        message = f"{address} exited with status {proc.returncode}: {error}"
        raise FileNotFoundError(message) if counted.count == 0 else ShardSourceError(message)


class _Counted(io.RawIOBase):
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)
