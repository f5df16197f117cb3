"""Writing files so that readers only ever see a complete one."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` at once: write a temporary file beside it, then rename it over ``path``.

    ``durable``: flush the data to the disk before the rename (for files that must survive a power cut, such as
    the shard manifests). Raises ``OSError`` (the temporary file removed) when the write fails.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else
                                                                    {"encoding": "utf-8"})) as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
