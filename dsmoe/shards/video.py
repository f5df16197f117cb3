"""Uniform frame sampling from video files with PyAV (``av`` on PyPI).

``sample_frames(data, n)`` decodes the first video stream of a container held in memory and returns ``n`` RGB
frames spread uniformly over the video: frame ``i`` of ``n`` is the decoded frame at index
``floor((i + 0.5) * total / n)`` (the middle of the ``i``-th of ``n`` equal segments, as frame-sampling video
retrieval code usually does). A video with fewer than ``n`` frames repeats frames, so a sample always has
exactly ``n``.

The frame count is taken from the container (``stream.frames``) when it gives one; the frames are then decoded
once, keeping only the selected ones (a 30 s clip is never held in memory whole). When the decoder yields
another number of frames than the container announced, the selection is recomputed from the real count and the
video decoded a second time, so the result depends only on the file's bytes. Decoding is deterministic for a
given PyAV/FFmpeg build; PyAV is imported lazily so that importing this module costs nothing.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["VideoDecodeError", "frame_indices", "sample_frames", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp")


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video (no video stream, corrupt data, no frame at all)."""


def frame_indices(total: int, n: int) -> list[int]:
    """Indices of ``n`` frames spread uniformly over ``total`` (segment midpoints; repeats when total < n)."""
    if total < 1 or n < 1:
        raise ValueError(f"need total >= 1 and n >= 1, got total={total}, n={n}")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def _decode_selected(data: bytes, wanted: list[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode the video, keeping the frames whose index is in ``wanted``; also return the number decoded."""
    import av

    keep = set(wanted)
    kept: dict[int, Image.Image] = {}
    count = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if count in keep:
                kept[count] = frame.to_image()  # RGB24 via swscale
            count += 1
    return kept, count


def _announced_frames(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        return int(container.streams.video[0].frames or 0)


def sample_frames(data: bytes, n: int) -> list[Image.Image]:
    """``n`` uniformly sampled RGB frames of the video in ``data``; raises :class:`VideoDecodeError`."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency of dsmoe
        raise RuntimeError("decoding videos needs PyAV: pip install av") from exc
    try:
        announced = _announced_frames(data)
        wanted = frame_indices(announced, n) if announced > 0 else []
        kept, total = _decode_selected(data, wanted)
        if total == 0:
            raise VideoDecodeError("the video has no decodable frame")
        if total != announced:
            wanted = frame_indices(total, n)
            kept, again = _decode_selected(data, wanted)
            if again != total:
                raise VideoDecodeError(f"decoding is not repeatable ({total} then {again} frames)")
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from None
    return [kept[i] for i in wanted]
