"""Decoding chosen frames of one video clip in a worker process, with PyAV (FFmpeg inside the wheel).

:func:`decode_clip` seeks to the keyframe at or before the first wanted frame, decodes forward only as far as the
last wanted frame, and turns each wanted frame, as soon as it is decoded, into its finished crop at the bucket size
(display-upright, the crop window resized with Pillow's antialiased bilinear filter, as the ``pillow`` image
decoder does). So a worker holds, per clip: the encoded bytes (or an open file, read in pieces), the decoder's own
reference frames (a few source frames), one upright source frame at a time, and the finished clip
``uint8 [F, bucket_h, bucket_w, 3]``; never the whole decoded video.

Frame numbers are positions in presentation order from the first frame (what :func:`frame_number` derives from a
frame's timestamp: ``round(t * fps)`` for a constant frame rate, the nearest of the manifest's ``frame_times`` for a
variable one), the same numbers ``dali_arb.plan.frames.frame_indices`` hands out and ``batch["frame_index"]`` reports.

Imports NumPy, ``plan.geometry`` and ``contracts``; PyAV and Pillow when it decodes (no DALI).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...plan.geometry import Geometry
from ..contracts import Failure

__all__ = ["ClipFrames", "decode_clip", "frame_number", "upright"]


@dataclass(frozen=True)
class ClipFrames:
    """Which frames of a clip to serve and how frames are numbered.

    Attributes:
        indices: ``int64 [F]`` source frame numbers, non-decreasing (a frame may repeat when the target rate is
            above the source's).
        fps: the video's average frame rate (frame ``k`` of a constant-rate video is shown at ``k / fps`` s).
        frame_times: ``float32 [N]`` each frame's presentation time from the first frame (variable-rate videos),
            or ``None``.
    """

    indices: np.ndarray
    fps: float
    frame_times: np.ndarray | None = None

    def time_of(self, index: int) -> float:
        """Seconds from the first frame at which frame ``index`` is shown."""
        if self.frame_times is not None:
            return float(self.frame_times[min(index, len(self.frame_times) - 1)])
        return index / self.fps


def frame_number(seconds: float, clip: ClipFrames) -> int:
    """The frame number of a frame shown ``seconds`` after the first frame."""
    if clip.frame_times is not None:
        times = clip.frame_times
        i = int(np.searchsorted(times, seconds))
        if i >= len(times):
            return len(times) - 1 if seconds - float(times[-1]) < 0.5 / clip.fps else len(times)
        if i > 0 and seconds - float(times[i - 1]) < float(times[i]) - seconds:
            return i - 1
        return i
    return round(seconds * clip.fps)


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """``rgb`` ``uint8 [H, W, 3]`` as displayed: turned counter-clockwise by ``rotation`` degrees (the display
    matrix's angle as FFmpeg and PyAV's ``VideoFrame.rotation`` give it; FFmpeg's players turn it the same way)."""
    turns = (round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _finish(rgb: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The crop window of an upright frame ``uint8 [H, W, 3]`` resized to the bucket: ``uint8 [bh, bw, 3]``."""
    from PIL import Image

    h, w, rh, rw, top, left, bucket_h, bucket_w = geometry
    if rgb.shape[:2] != (h, w):
        raise _Resized
    y_scale, x_scale = h / rh, w / rw
    box = (left * x_scale, top * y_scale, (left + bucket_w) * x_scale, (top + bucket_h) * y_scale)
    return np.asarray(Image.fromarray(rgb).resize((bucket_w, bucket_h), Image.BILINEAR, box=box))


class _Resized(Exception):
    """A decoded frame is not the indexed (upright) size."""


def _open(source: str | os.PathLike | bytes | np.ndarray) -> Any:
    import av

    if isinstance(source, np.ndarray):
        source = memoryview(source)
    if isinstance(source, (bytes, memoryview)):
        return av.open(io.BytesIO(source), "r")  # BytesIO shares the bytes until written to
    return av.open(os.fspath(source), "r")


def decode_clip(
    source: str | os.PathLike | bytes | np.ndarray,
    clip: ClipFrames,
    geometry: Geometry,
    *,
    threads: int = 1,
) -> tuple[np.ndarray | None, Failure]:
    """The frames ``clip.indices`` of the video in ``source`` (a path, or its encoded bytes), each display-upright
    and cut to ``geometry`` (the cover resize's crop window, resized to the bucket): ``(uint8 [F, bh, bw, 3],
    Failure.NONE)``, or ``(None, failure)`` when the file cannot serve them (``TRUNCATED``: it ends before the last
    wanted frame; ``RESIZED``: its frames are not the indexed size; ``UNDECODABLE``: FFmpeg cannot read it).

    ``threads``: FFmpeg decoding threads (1 in worker processes, which are already one per core).
    """
    import av

    wanted = np.asarray(clip.indices, np.int64)
    if wanted.ndim != 1 or len(wanted) == 0 or wanted[0] < 0 or np.any(np.diff(wanted) < 0):
        raise ValueError(f"frame indices must be a non-empty, non-decreasing int64 [F], got {wanted!r}")
    out = np.empty((len(wanted), geometry.bucket_h, geometry.bucket_w, 3), np.uint8)
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            stream.thread_count = max(1, int(threads))
            stream.thread_type = "AUTO" if threads > 1 else "SLICE"
            filled = _decode_into(container, stream, clip, wanted, geometry, out, seek=True)
            if filled == -1:  # the seek landed after the first wanted frame (a bad index): decode from the start
                container.seek(0, stream=stream)
                filled = _decode_into(container, stream, clip, wanted, geometry, out, seek=False)
    except _Resized:
        return None, Failure.RESIZED
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None, Failure.UNDECODABLE
    if filled < len(wanted):
        return None, Failure.TRUNCATED
    return out, Failure.NONE


def _decode_into(container, stream, clip: ClipFrames, wanted: np.ndarray, geometry: Geometry,
                 out: np.ndarray, *, seek: bool) -> int:  # fmt: skip
    """Decode forward (after seeking near ``wanted[0]`` when ``seek``), writing each wanted frame into ``out``;
    the count of positions filled, or -1 when the first frame decoded after the seek is already past
    ``wanted[0]``."""
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None else 0.0
    first = int(wanted[0])
    if seek and first > 0:
        # half a frame early, so rounding never skips the wanted keyframe; FFmpeg goes back to a keyframe
        target = start + clip.time_of(first) - 0.5 / clip.fps
        container.seek(max(0, int(target / base)), stream=stream, backward=True, any_frame=False)
    position, last = 0, int(wanted[-1])
    counted = -1  # frame number by counting, for frames without a timestamp (only from the start)
    checked_first = False
    for frame in container.decode(stream):
        counted += 1
        if frame.pts is not None:
            number = frame_number(float(frame.pts * base) - start, clip)
        elif not seek or first == 0:
            number = counted
        else:
            return -1
        if not checked_first:
            checked_first = True
            if number > first:
                return -1 if seek and first > 0 else 0
        if number < wanted[position]:
            continue
        # (number > wanted[position]: the stream lacks that frame; the next one shown stands in)
        finished = None
        while position < len(wanted) and wanted[position] <= number:
            if finished is None:
                finished = _finish(upright(frame.to_ndarray(format="rgb24"), frame.rotation), geometry)
            out[position] = finished
            position += 1
        if position == len(wanted) or number >= last:
            break
    return position
