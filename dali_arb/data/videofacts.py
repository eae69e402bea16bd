"""Facts about one video file, for the indexer: :func:`inspect_video` reads its container (PyAV) and returns a
:class:`VideoFacts` (display-upright size, frame count, average frame rate, duration, codec, whether the frame rate
varies and then each frame's time) or the reason it cannot be trained on.

What it reads, per file (the indexer's summary line reports the totals):

- always the container's header and the first frame (decoded once: the display rotation lives in side data PyAV
  hands out on frames, and a file whose first frame does not decode is no use);
- the header's frame count is trusted where the container holds an index of every frame that lies inside the file
  (MP4/MOV and AVI written whole, constant frame rate);
- otherwise the packets are demuxed, not decoded, and counted: WebM/Matroska (no count in the header), a variable
  frame rate (each frame's time is needed), an index that points past the end of the file (truncated).

PyAV is imported when called; NumPy at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DECODABLE_CODECS", "VIDEO_EXTS", "VideoFacts", "inspect_video", "is_video_name"]

#: File name extensions indexed as videos.
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
#: Codecs some decoder here reads (DALI's GPU decoder: all; its CPU decoder: vp9, mjpeg; PyAV: all), FFmpeg's names.
DECODABLE_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg4"})
#: Containers whose header count is trusted when their index covers every frame inside the file.
_INDEXED_FORMATS = ("mov", "mp4", "avi")


@dataclass(frozen=True)
class VideoFacts:
    """One video, as the manifest records it.

    Attributes:
        width, height: display size (rotation applied, as EXIF orientation is for images).
        frames: number of frames.
        fps: average frame rate (frames per second of presentation time).
        duration: seconds of presentation.
        codec: FFmpeg's codec name (``"h264"``, ``"vp9"``, ``"mjpeg"``...).
        vfr: the frame rate varies.
        frame_times: float32 ``[frames]``, presentation time of each frame in seconds from the first, in presentation
            order; only when ``vfr`` (None otherwise: frame ``k`` is at ``k / fps``).
        rotation: display rotation, counter-clockwise degrees (0, 90, 180, 270).
        counted: the frames were counted by demuxing (the header alone did not give them).
        bytes_read: bytes of the file read to learn this (about the header and first frame, or all of it).
    """

    width: int
    height: int
    frames: int
    fps: float
    duration: float
    codec: str
    vfr: bool
    frame_times: np.ndarray | None
    rotation: int = 0
    counted: bool = False
    bytes_read: int = 0


def is_video_name(name: str) -> bool:
    """Whether a file name's extension is one :data:`VIDEO_EXTS` indexes."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTS


def inspect_video(source: Any, *, max_pixels: int | None = None) -> VideoFacts | str:
    """The :class:`VideoFacts` of a video file, or why it cannot be used (one line, as rejects record it).

    ``source``: a path, or a seekable binary file object with a ``size`` attribute or a known length (a tar member,
    an object read in blocks). ``max_pixels``: refuse frames with more pixels.
    """
    import av

    counter = _CountingReader(source)
    if counter.size == 0:
        return "empty file (0 bytes)"
    try:
        with av.open(counter, "r", format=None) as container:
            return _facts(container, counter, max_pixels)
    except av.error.FFmpegError as exc:
        return f"unreadable video ({_short(exc)})"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    finally:
        counter.close()


def _facts(container, counter: _CountingReader, max_pixels: int | None) -> VideoFacts | str:

    if not container.streams.video:
        return "no video stream (audio or data only)"
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in DECODABLE_CODECS:
        return f"video codec {codec!r}: no decoder here reads it (re-encode to H.264, HEVC, VP9 or AV1)"
    stored_w, stored_h = stream.codec_context.width, stream.codec_context.height
    if stored_w < 1 or stored_h < 1:
        return f"invalid video size {stored_w}x{stored_h}"
    if max_pixels is not None and stored_w * stored_h > max_pixels:
        return f"too large: {stored_w}x{stored_h} frames are over --max-pixels {max_pixels}"
    packets = container.demux(stream)
    stamps: list[int] = []
    first = _first_frame(stream, packets, stamps)
    if isinstance(first, str):
        return first
    if first is None:
        return "zero frames (the video stream holds no picture)"
    rotation = round((first.rotation or 0) / 90) * 90 % 360
    width, height = (stored_h, stored_w) if rotation in (90, 270) else (stored_w, stored_h)
    header_frames = int(stream.frames or 0)
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    header_read = counter.read_bytes
    if _header_is_enough(container, stream, header_frames, counter.size):
        times = None
        frames = header_frames
        counted = False
    else:
        times = _demux_times(stream, packets, stamps)
        if isinstance(times, str):
            return times
        frames, counted = len(times), True
        if frames == 0:
            return "zero frames (no video packets)"
        if header_frames > frames:
            return f"truncated video (its header promises {header_frames} frames, the file holds {frames})"
        problem = _short_of_duration(container, times, frames)
        if problem:
            return problem
    vfr, fps, duration = _timing(stream, times, frames, rate)
    if not fps > 0 or not np.isfinite(fps):
        return "frame rate unknowable (no timestamps nor rate in the container)"
    return VideoFacts(
        width=int(width),
        height=int(height),
        frames=int(frames),
        fps=float(fps),
        duration=float(duration),
        codec=codec,
        vfr=vfr,
        frame_times=times.astype(np.float32) if vfr else None,
        rotation=int(rotation),
        counted=counted,
        bytes_read=counter.read_bytes if counted else header_read,
    )


def _header_is_enough(container, stream, header_frames: int, size: int) -> bool:
    """Whether the header's frame count can be trusted as it is: an indexed container (MP4/MOV/AVI) whose index
    holds every frame, the last of them inside the file, at a constant rate (same step between timestamps)."""
    if header_frames < 1 or not any(f in container.format.name.split(",") for f in _INDEXED_FORMATS):
        return False
    entries = stream.index_entries
    if len(entries) != header_frames:
        return False
    end = max(e.pos + e.size for e in entries)
    if end > size:
        return False
    stamps = np.sort(np.fromiter((e.timestamp for e in entries), np.int64, len(entries)))
    return not _varies(np.diff(stamps).astype(np.float64), tick=1.0)


def _first_frame(stream, packets, stamps: list[int]):
    """Demux and decode until the first frame comes out (its rotation; the proof that the codec decodes): the
    frame, None when the stream ends first, or the reason it fails. The packets' timestamps go into ``stamps``."""
    import av

    try:
        for packet in packets:
            if packet.size:
                stamps.append(packet.pts)
            for frame in stream.decode(packet):
                return frame
    except av.error.FFmpegError as exc:
        return f"first frame does not decode ({_short(exc)})"
    return None


def _demux_times(stream, packets, stamps: list[int]) -> np.ndarray | str:
    """float64 ``[frames]``: the presentation times of every packet of ``stream``, sorted, from the first, by
    demuxing the rest of ``packets`` (no decoding) after those already read (``stamps``); or why the file cannot be
    read to its end."""
    import av

    try:
        for packet in packets:
            if packet.size:  # (size 0: the flush packet at the end)
                stamps.append(packet.pts)
    except av.error.FFmpegError as exc:
        return f"truncated or damaged video (demuxing stopped after {len(stamps)} frames: {_short(exc)})"
    if any(s is None for s in stamps):
        return "frame count unknowable (packets without timestamps)"
    times = np.sort(np.asarray(stamps, np.int64))
    if len(np.unique(times)) != len(times):
        return "frame count unknowable (several frames share a timestamp)"
    return (times - (times[0] if len(times) else 0)).astype(np.float64) * float(stream.time_base)


def _short_of_duration(container, times: np.ndarray, frames: int) -> str | None:
    """Why counted frames fall short of the duration the container states (a cut-off file), or None."""
    if container.duration is None or frames < 2:
        return None
    stated = container.duration / 1_000_000
    step = float(np.median(np.diff(times)))
    covered = float(times[-1]) + step
    if covered < stated - 2 * step - 0.05:
        return f"truncated video (its header says {stated:.2f} s, the file holds {covered:.2f} s)"
    return None


def _timing(stream, times: np.ndarray | None, frames: int, rate: float) -> tuple[bool, float, float]:
    """``(vfr, average fps, duration in seconds)``."""
    if times is None or frames < 2:
        fps = rate
        return False, fps, frames / fps if fps > 0 else 0.0
    steps = np.diff(times)
    tick = float(stream.time_base)
    vfr = _varies(steps, tick=tick)
    step = float(np.mean(steps))
    duration = float(times[-1]) + (step if vfr else float(np.median(steps)))
    fps = frames / duration if vfr else (rate if rate > 0 else 1.0 / float(np.median(steps)))
    return vfr, fps, (frames / fps if not vfr else duration)


def _varies(steps: np.ndarray, *, tick: float) -> bool:
    """Whether steps between frame times differ by more than rounding (1.5 ticks or 5% of the usual step)."""
    if len(steps) == 0:
        return False
    usual = float(np.median(steps))
    return bool(np.max(np.abs(steps - usual)) > max(1.5 * tick, 0.05 * usual))


def _short(exc: Exception) -> str:
    return str(getattr(exc, "strerror", None) or exc).split(": '", 1)[0][:100]


class _CountingReader:
    """A binary file (a path opened here, or a given file object) that counts the bytes read through it."""

    def __init__(self, source: Any) -> None:
        if hasattr(source, "read"):
            self._fh, self._own = source, False
            size = getattr(source, "size", None)
            if size is None:
                position = source.tell()
                size = source.seek(0, os.SEEK_END)
                source.seek(position)
            self.size = int(size)
        else:
            self._fh, self._own = open(source, "rb"), True
            self.size = os.fstat(self._fh.fileno()).st_size
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.read_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if self._own:
            self._fh.close()
