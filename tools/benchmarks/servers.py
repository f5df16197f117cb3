"""Real servers on loopback for the remote-shard tests and the scale rehearsal (``tools/bench_scale.py``): an
HTTP file server (with byte ranges, as nginx or an object store's HTTPS endpoint serve them) and an S3-compatible
object store (moto in server mode)."""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class ServerFaults:
    """What an HTTP test server does wrong, per file name: a list of faults used up one per GET, each None (answer
    well), ``("status", code)`` (answer with that status), ``("drop", n)`` (send the headers and ``n`` bytes of the
    body, then cut the connection), ``("stall", s)`` (accept and say nothing for ``s`` seconds) or ``("drip", s)``
    (send the headers, then a byte every ``s`` seconds). ``requests`` records (file name, Range header) of every
    GET."""

    def __init__(self, faults: dict[str, list[tuple[str, float] | None]] | None = None):
        self.faults = {name: list(items) for name, items in (faults or {}).items()}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def take(self, name: str, range_header: str) -> tuple[str, float] | None:
        with self.lock:
            self.requests.append((name, range_header))
            queue = self.faults.get(name)
            return queue.pop(0) if queue else None


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered 206, misbehaving as ``faults`` (a ``ServerFaults``) says."""

    faults: ServerFaults

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_head(self):
        name = self.path.rsplit("/", 1)[-1]
        self._fault = self.faults.take(name, self.headers.get("Range", "")) if self.command == "GET" else None
        kind, value = self._fault or ("", 0)
        if kind == "status":
            self.send_error(int(value), "injected")
            return None
        if kind == "stall":
            self.faults.stopping.wait(value)
            self.close_connection = True
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            self._remaining = None
            return super().send_head()
        size = path.stat().st_size
        start = int(match[1])
        end = min(int(match[2]) if match[2] else size - 1, size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        kind, value = self._fault or ("", 0)
        if kind not in ("drop", "drip"):
            if remaining is None:
                return super().copyfile(source, outputfile)
            return outputfile.write(source.read(remaining))
        data = source.read() if remaining is None else source.read(remaining)
        if kind == "drop":
            outputfile.write(data[:int(value)])
            outputfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif kind == "drip":
            for byte in data:
                if self.faults.stopping.wait(value):
                    break
                outputfile.write(bytes([byte]))
                outputfile.flush()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled or dripping answer does not hold up the server's end

    def handle_error(self, request, client_address) -> None:  # clients that hang up mid-answer are expected
        pass


@contextmanager
def http_server(root: Path, faults: ServerFaults | dict | None = None) -> Iterator[str]:
    """Serve ``root`` on a free loopback port, misbehaving as ``faults`` says (a ``ServerFaults``, or the dict to
    make one); yields the base URL (``http://127.0.0.1:PORT``)."""
    faults = faults if isinstance(faults, ServerFaults) else ServerFaults(faults)
    handler = type("Handler", (_RangeHandler,), {"faults": faults})
    server = _QuietServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        faults.stopping.set()
        server.shutdown()
        server.server_close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on a free loopback port; yields the environment that points the AWS tools
    (s3fs, boto3, the aws CLI) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    finally:
        server.stop()


def upload(env: dict[str, str], local: Path, url: str) -> None:
    """Copy the files of ``local`` to the s3:// prefix ``url`` (as ``aws s3 cp --recursive`` would)."""
    import s3fs

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        bucket = url[len("s3://"):].split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(local.iterdir()):
            fs.put_file(str(path), url.rstrip("/") + "/" + path.name)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
