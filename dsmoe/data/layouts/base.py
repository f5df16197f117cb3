"""What a layout reader returns, and small helpers shared by the readers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsmoe.data.raw_formats import RawFormatError, RawRecord

__all__ = ["LayoutResult", "find_dir"]


@dataclass
class LayoutResult:
    """Records of one dataset, the files they were read from, notes for the manifest, and the reports of caption
    files merged by the layout itself (STAIR, COCO-CN, MSR-VTT-CN)."""

    records: list[RawRecord] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    caption_reports: list[dict[str, Any]] = field(default_factory=list)
    image_dir: str | None = None


def find_dir(given: Path | None, root: Path, names: Sequence[str], what: str) -> Path:
    """``given`` (must exist) or the first of ``root/name`` that is a directory; else a RawFormatError."""
    if given is not None:
        given = Path(given).expanduser().absolute()
        if not given.is_dir():
            raise RawFormatError(f"{given}: no such directory ({what})")
        return given
    for name in names:
        candidate = (root / name).resolve()
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(root / name) for name in names)
    raise RawFormatError(f"cannot find {what}: looked for {looked}; give the directory explicitly")
