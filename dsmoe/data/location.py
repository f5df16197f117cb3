"""Where shards live: a local directory, a URL prefix (``http(s)://``, or ``s3://``, ``gs://`` and any protocol fsspec
knows), or webdataset's ``pipe:`` form, a shell command writing the file to stdout with ``{name}`` standing for the
file's name (``pipe:aws s3 cp s3://bucket/shards/{name} -``).

A split's manifest and its shards are read from the same place, by file name only: a name that is not a plain file
name (``check_name``) is refused, so no address leaves the location. A ``pipe:`` command receives the name as an
argument of its shell (``"$1"``), never as text of the script, whatever quotes the template puts around
``{name}``. Credentials come from the environment as the ecosystem's tools take them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``~/.netrc``, ...).

Every remote read (``RemoteStream``) has deadlines and resumes: a failed, stalled or too slow connection is
given up and opened again at the byte where reading stopped (an HTTP range, an fsspec seek; a ``pipe:`` command
is run again and read past what was read), with growing waits, up to ``RemoteReads.retries`` times; the last error
names the address. fsspec and its protocol packages are imported only when such a location is used.
"""
from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from dsmoe.schema import at_least, positive, ranged


@dataclass
class RemoteReads:
    """How shards and manifests are read from a server, an object store or a ``pipe:`` command (the config's
    ``data.remote``; local files are read directly)."""

    retries: int = at_least(0, 5)
    """Attempts after a failed one, each opened again at the byte where reading stopped. An attempt that read at
    least 1 MiB before it failed is not counted (a long shard over a flaky link still finishes)."""
    retry_wait: float = positive(0.5)
    """Seconds before the first retry, doubled before each next one (at most 30)."""
    stall_s: float = positive(30.0)
    """A read that receives no byte for this long is given up (and retried): a server that accepts and never
    answers, a ``pipe:`` command that hangs."""
    min_bytes_per_s: float = ranged(16384.0, 0)
    """A connection delivering less than this, averaged over ``window_s``, is given up (and retried): a server
    that sends a byte now and then. 0: no minimum."""
    window_s: float = positive(30.0)
    connect_s: float = positive(10.0)
    """Seconds to establish a connection."""


DEFAULT_READS = RemoteReads()
PROGRESS_BYTES = 1 << 20  # an attempt that read this much before failing does not count against the retries
MAX_WAIT = 30.0
CHUNK = 1 << 18
QUEUE_CHUNKS = 4

# errors that another attempt would only repeat
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, TypeError, AttributeError, ImportError)

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}")


class ShardSourceError(OSError):
    """A remote shard or manifest could not be read; the message names the address."""


class UnsafeName(ValueError):
    """A file name (from a manifest or a config) that could leave its folder or be read as an option."""


def check_name(name: object) -> str:
    """``name`` if it is a plain file name: letters, digits and ``_ . + = -``, not starting with ``.`` or ``-``,
    without ``..``, at most 255 characters; else ``UnsafeName``."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise UnsafeName(f"{name!r} is not a plain file name (letters, digits and _ . + = -, not starting with . or "
                         f"-, no '..', no '/')")
    return name


def is_pipe(location: str) -> bool:
    return str(location).startswith("pipe:")


def is_local(location: str | Path) -> bool:
    location = str(location)
    return "://" not in location and not is_pipe(location)


def is_http(location: str) -> bool:
    return str(location).startswith(("http://", "https://"))


class PipeAddress(str):
    """A ``pipe:`` template with the file it reads: as text, the command with the name filled in (for messages);
    what runs is ``sh -c SCRIPT sh NAME``, the script referring to the name as ``$1``."""

    template: str
    name: str

    def __new__(cls, template: str, name: str) -> PipeAddress:
        self = super().__new__(cls, template.replace("{name}", name))
        self.template, self.name = template, name
        return self

    def __reduce__(self):
        return PipeAddress, (self.template, self.name)

    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", pipe_script(self.template[len("pipe:"):]), "sh", self.name]


def pipe_script(command: str) -> str:
    """``command`` with each ``{name}`` replaced by a reference to the shell's first argument, quoted for where it
    stands (bare, in double quotes, or in single quotes, which are closed around it)."""
    out, quote, i = [], None, 0
    while i < len(command):
        if command.startswith("{name}", i):
            out.append({None: '"${1}"', '"': "${1}", "'": "'\"${1}\"'"}[quote])
            i += len("{name}")
            continue
        char = command[i]
        if char == "\\" and quote != "'":
            out.append(command[i:i + 2])
            i += 2
            continue
        if quote is None and char in "'\"":
            quote = char
        elif char == quote:
            quote = None
        out.append(char)
        i += 1
    if quote is not None:
        raise ValueError(f"the pipe: command has an unclosed {quote} quote: pipe:{command}")
    return "".join(out)


def child(location: str | Path, name: str) -> str:
    """The address of the file ``name`` in ``location`` (``UnsafeName`` unless it is a plain file name)."""
    check_name(name)
    location = str(location)
    if is_pipe(location):
        if "{name}" not in location:
            raise ValueError(f"a pipe: shard location needs {{name}} where the file name goes: {location}")
        pipe_script(location[len("pipe:"):])  # refuse unbalanced quotes here, not in a loader worker
        return PipeAddress(location, name)
    if is_local(location):
        return str(Path(location) / name)
    return location.rstrip("/") + "/" + name


def file_name(address: str | Path) -> str:
    """The file name of a shard address (for messages and sample identities)."""
    if isinstance(address, PipeAddress):
        return address.name
    return str(address).rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------------------
# sources: one attempt's connection to a file, from a byte on


class _HttpSource:
    """One GET from byte ``offset`` (to ``end``, exclusive, when given). ``size``: the file's; ``start``: the byte
    its data begins at (0 when the server ignored the range)."""

    def __init__(self, session, url: str, offset: int, end: int | None, reads: RemoteReads):
        wanted = f"bytes={offset}-{'' if end is None else end - 1}"
        headers = {"Accept-Encoding": "identity", **({"Range": wanted} if offset or end is not None else {})}
        self.response = session.get(url, stream=True, timeout=(reads.connect_s, reads.stall_s), headers=headers)
        status, self.start = self.response.status_code, offset
        total = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", self.response.headers.get("Content-Range", ""))
        length = self.response.headers.get("Content-Length", "")
        if status == 416 and total:  # nothing at or after ``offset``: an empty file, or a read at its end
            self.response.close()
            self.size, self.raw = int(total[1]), io.BytesIO()
            return
        if status >= 400:
            self.response.close()
            kind = {404: FileNotFoundError, 410: FileNotFoundError, 401: PermissionError, 403: PermissionError}
            raise kind.get(status, OSError)(f"HTTP {status} {self.response.reason} for {url}")
        self.raw = self.response.raw
        if status == 206 and total:
            self.size = int(total[1])
        else:  # the whole file
            self.size, self.start = (int(length) if length.isdigit() else None), 0

    def read(self, size: int) -> bytes:
        return self.raw.read1(size)

    def close(self) -> None:
        self.response.close()


class _FsspecSource:
    """An fsspec file (s3://, gs://, ...) read from byte ``offset`` to ``end``."""

    def __init__(self, address: str, offset: int, end: int | None):
        from fsspec.core import url_to_fs

        try:
            fs, path = url_to_fs(address, skip_instance_cache=True)  # sees the environment as it is now
        except ImportError as exc:
            raise ImportError(f"reading {address} needs the package for its protocol ({exc}); e.g. pip install "
                              f"s3fs (s3://) or gcsfs (gs://)") from None
        self.file = fs.open(path, "rb", block_size=CHUNK if end is None else max(1, end - offset))
        self.size, self.start = self.file.size, offset
        self.left = (end - offset) if end is not None else None
        self.file.seek(offset)

    def read(self, size: int) -> bytes:
        if self.left is not None:
            size = min(size, self.left)
            if size <= 0:
                return b""
        data = self.file.read(size)
        if self.left is not None:
            self.left -= len(data)
        return data

    def close(self) -> None:
        self.file.close()


class _PipeSource:
    """A ``pipe:`` command's stdout (from its first byte: ``start`` 0); a non-zero exit is an error at its end
    (``FileNotFoundError`` when it wrote nothing: a missing file reads as missing)."""

    size, start = None, 0

    def __init__(self, address: PipeAddress):
        self.address, self.count = address, 0
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(address.argv(), stdout=subprocess.PIPE, stderr=self.errors,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def read(self, size: int) -> bytes:
        data = self.proc.stdout.read1(size)
        self.count += len(data)
        if not data:
            code = self.proc.wait()
            if code != 0:
                self.errors.seek(0)
                error = self.errors.read().decode(errors="replace").strip()[-500:]
                message = f"{self.address} exited with status {code}: {error}"
                raise FileNotFoundError(message) if self.count == 0 else ShardSourceError(message)
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the command and whatever it started
            except OSError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.errors.close()


def _opener(address: str) -> Callable[[int, int | None, RemoteReads], object]:
    """How to open an attempt at ``address``: (offset, end, reads) -> a source with ``read``, ``close``, ``size``
    and ``start``, the byte its data begins at (at most ``offset``: a command or a server that cannot start
    elsewhere sends the file from its start, and what comes before ``offset`` is passed over)."""
    if is_pipe(address):
        if not isinstance(address, PipeAddress):
            raise ValueError(f"a pipe: address is made by location.child from a template with {{name}}: {address}")
        return lambda offset, end, reads: _PipeSource(address)
    if is_http(address):
        import requests

        session = requests.Session()
        return lambda offset, end, reads: _HttpSource(session, address, offset, end, reads)
    return lambda offset, end, reads: _FsspecSource(address, offset, end)


class _Attempt:
    """One connection delivering a file's bytes from ``offset`` on, read by a thread of its own into a small queue,
    so that the reader can give it up at a deadline whatever the connection does."""

    def __init__(self, open_source: Callable[[int], object], offset: int):
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.abandoned = threading.Event()
        self.source = None
        self.size: int | None = None
        self.start = offset  # the byte the source's data begins at
        threading.Thread(target=self._run, args=(open_source, offset), name="dsmoe-read", daemon=True).start()

    def _run(self, open_source, offset: int) -> None:
        try:
            self.source = open_source(offset)
            if self.abandoned.is_set():
                self.source.close()
                return
            self.size, self.start = self.source.size, self.source.start
            while not self.abandoned.is_set():
                data = self.source.read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who decides
            self._put(exc)

    def _put(self, item) -> None:
        while not self.abandoned.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, timeout: float):
        return self.queue.get(timeout=timeout)

    def close(self) -> None:
        self.abandoned.set()
        source = self.source
        if source is not None:
            try:
                source.close()  # unblocks the thread's read where the transport allows
            except Exception:  # noqa: BLE001
                pass


class RemoteStream(io.RawIOBase):
    """A remote file read from byte ``offset`` to ``end`` (exclusive; None: its end), with deadlines, resumed at
    the byte where an attempt failed. ``size`` is the file's size once known (None for a ``pipe:`` command)."""

    def __init__(self, address: str, reads: RemoteReads = DEFAULT_READS, offset: int = 0, end: int | None = None,
                 opener: Callable | None = None):
        super().__init__()
        self.address, self.reads, self.position, self.end = address, reads, offset, end
        self.open_source = opener or _opener(address)
        self.size: int | None = None
        self.attempt: _Attempt | None = None
        self.failures, self.eof = 0, False
        self.pending = self._next_chunk()  # opening errors (a missing file) surface here

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending:
            self.pending = self._next_chunk()
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if self.attempt is not None:
            self.attempt.close()
            self.attempt = None
        super().close()

    def _start(self) -> None:
        at = self.position
        self.attempt = _Attempt(lambda offset: self.open_source(offset, self.end, self.reads), at)
        self.started_at, self.window, self.skip = at, (time.monotonic(), at), None

    def _next_chunk(self) -> bytes:
        """The next bytes after ``position`` (which counts them as given); b"" at the end."""
        while not self.eof:
            if self.attempt is None:
                self._start()
            try:
                item = self.attempt.get(timeout=self.reads.stall_s)
            except queue.Empty:
                self._failed(TimeoutError(f"no byte received for {self.reads.stall_s:g} s"))
                continue
            if isinstance(item, BaseException):
                if isinstance(item, NOT_TRANSIENT):
                    self.close()
                    raise item
                self._failed(item)
                continue
            self._check_size(self.attempt.size)
            if self.skip is None:
                self.skip = self.position - self.attempt.start  # bytes before ``position`` that the source resends
            if self.skip and item:
                passed = min(self.skip, len(item))
                self.skip, item = self.skip - passed, item[passed:]
                if not item:
                    continue
            end = self.end if self.end is not None else self.size
            if not item:
                if end is not None and self.position < end:
                    self._failed(EOFError(f"the connection ended at byte {self.position} of {end}"))
                    continue
                self._finish()
                return b""
            if self.end is not None and self.position + len(item) >= self.end:
                item = item[:self.end - self.position]
                self._finish()
            self.position += len(item)
            self._check_rate()
            return item
        return b""

    def _finish(self) -> None:
        self.eof = True
        self.attempt.close()
        self.attempt = None

    def _check_size(self, size: int | None) -> None:
        if size is None:
            return
        if self.size is None:
            self.size = size
            if self.end is not None:
                self.end = min(self.end, size)
        elif size != self.size:
            self.close()
            raise ShardSourceError(f"{self.address} changed while it was read ({self.size} bytes, then {size})")

    def _check_rate(self) -> None:
        """Give the attempt up (the next read opens another) when it delivered less than ``min_bytes_per_s`` over
        the last ``window_s``."""
        reads, now = self.reads, time.monotonic()
        since, at = self.window
        if self.attempt is None or not reads.min_bytes_per_s or now - since < reads.window_s:
            return
        rate = (self.position - at) / (now - since)
        if rate >= reads.min_bytes_per_s:
            self.window = (now, self.position)
            return
        self._failed(TimeoutError(f"{rate:.0f} bytes/s over {now - since:.0f} s, under data.remote.min_bytes_per_s "
                                  f"{reads.min_bytes_per_s:g}"))

    def _failed(self, error: BaseException) -> None:
        """Give up the current attempt; wait before the next, or raise once the retries are spent."""
        progressed = self.position - self.started_at
        self.attempt.close()
        self.attempt = None
        if progressed >= PROGRESS_BYTES:
            self.failures = 0
        self.failures += 1
        if self.failures > self.reads.retries:
            self.close()
            raise ShardSourceError(f"could not read {self.address} (stopped at byte {self.position}) after "
                                   f"{self.failures} attempts: {type(error).__name__}: {error}") from error
        time.sleep(min(MAX_WAIT, self.reads.retry_wait * 2 ** (self.failures - 1)))


class RangedFile(io.RawIOBase):
    """A remote file for reads at any offset: each read one ranged ``RemoteStream`` (deadlines, resumes)."""

    def __init__(self, address: str, reads: RemoteReads = DEFAULT_READS):
        super().__init__()
        self.address, self.reads, self.position = address, reads, 0
        self.open_source = _opener(address)
        probe = RemoteStream(address, reads, 0, 1, self.open_source)
        probe.close()
        if probe.size is None:
            raise ShardSourceError(f"{address}: the server does not say the file's size (no ranged reads)")
        self.size = probe.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        stream = RemoteStream(self.address, self.reads, self.position, end, self.open_source)
        try:
            data = stream.read(end - self.position)
            while len(data) < end - self.position:
                more = stream.read(end - self.position - len(data))
                if not more:
                    break
                data += more
        finally:
            stream.close()
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


# ---------------------------------------------------------------------------------------------------------------
# what readers use


def read_bytes(address: str | Path, reads: RemoteReads = DEFAULT_READS) -> bytes:
    """The whole file at ``address`` (local, URL or pipe:); ``FileNotFoundError`` when it does not exist."""
    with open_stream(address, reads=reads) as stream:
        return stream.read()


@contextmanager
def open_stream(address: str | Path, offset: int = 0, reads: RemoteReads = DEFAULT_READS) -> Iterator[BinaryIO]:
    """The file at ``address`` for reading from byte ``offset`` to its end; a remote one is a ``RemoteStream``."""
    if is_local(address):
        with open(address, "rb") as f:
            f.seek(offset)
            yield f
        return
    stream = RemoteStream(str(address) if not isinstance(address, PipeAddress) else address, reads, offset)
    try:
        yield stream
    finally:
        stream.close()


def open_random(address: str | Path, reads: RemoteReads = DEFAULT_READS) -> BinaryIO | None:
    """The file at ``address`` for reads at any offset (remote: ranged reads, buffered); None for a pipe:
    command."""
    if is_local(address):
        return open(address, "rb")
    if is_pipe(address):
        return None
    return io.BufferedReader(RangedFile(str(address), reads), 1 << 16)


def stream_size(stream) -> int | None:
    """The size of the file behind an open stream, where it is known before reading it to the end."""
    if isinstance(stream, (RemoteStream, RangedFile)):
        return stream.size
    if isinstance(stream, io.BufferedReader):
        return stream_size(stream.raw)
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
