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

:func:`clip_bytes` is the ``dali_video`` decoder's half in the workers: it copies (remuxes, no decoding) the packets
from the keyframe at or before the first wanted frame to the last wanted frame into a small container of their own,
so the decoder in the DALI graph is fed the clip's bytes, not the whole file, and numbers frames from that keyframe.

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

__all__ = [
    "REMUX_FORMATS",
    "ClipBytes",
    "ClipFrames",
    "clip_bytes",
    "decode_clip",
    "frame_number",
    "mp4_rotation",
    "upright",
]


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


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (``io.BytesIO`` copies any buffer but ``bytes``:
    a worker would hold a long video's bytes twice)."""

    def __init__(self, buffer: Any) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        target = memoryview(out).cast("B")
        chunk = self._view[self._at : self._at + len(target)]
        target[: len(chunk)] = chunk
        self._at += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(0, base + int(offset))
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        self._view.release()
        super().close()


#: PyAV's read size from a file object (its default is 32 KiB: a long 4K video's packets in fewer Python calls).
READ_BUFFER_BYTES = 256 << 10

#: What a clip can be read from: a path, its encoded bytes, or a read-only seekable file (a
#: :class:`~dali_arb.data.localfiles.LocalRange` or :class:`~dali_arb.data.storage.ranged.RangedObject`, read in
#: pieces: the file is never in memory whole).
Source = str | os.PathLike | bytes | np.ndarray | io.RawIOBase


def _open(source: Source) -> Any:
    import av

    if isinstance(source, (bytes, np.ndarray, memoryview)):
        return av.open(_BufferReader(source), "r")
    if hasattr(source, "read"):
        source.seek(0)
        return av.open(source, "r", buffer_size=READ_BUFFER_BYTES)
    return av.open(os.fspath(source), "r")


def decode_clip(
    source: Source,
    clip: ClipFrames,
    geometry: Geometry,
    *,
    threads: int = 1,
) -> tuple[np.ndarray | None, Failure]:
    """The frames ``clip.indices`` of the video in ``source`` (a path, its encoded bytes or a file), each display-upright
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


#: The container a clip's packets are remuxed into, by codec (FFmpeg's names), for DALI's demuxer: MP4 for the codecs
#: NVDEC reads from MP4, WebM for VP8/VP9, AVI for MJPEG; any other codec: Matroska.
REMUX_FORMATS: dict[str, str] = {"h264": "mp4", "hevc": "mp4", "av1": "mp4", "mpeg4": "mp4", "vp8": "webm",
                                 "vp9": "webm", "mjpeg": "avi"}  # fmt: skip


@dataclass(frozen=True)
class ClipBytes:
    """A clip's packets in a container of their own (what ``dali_video`` feeds DALI's decoder).

    Attributes:
        data: ``uint8 (n,)`` the small container's bytes.
        first: the source frame number of its frame 0 (the keyframe at or before the first wanted frame): DALI's
            frame ``k`` of it is source frame ``first + k``.
        rotation: the display rotation, counter-clockwise degrees (0, 90, 180, 270), read from the source's MP4/MOV
            track header (0 for other containers); the decoder's frames are the coded, unturned ones.
    """

    data: np.ndarray
    first: int
    rotation: int


def clip_bytes(source: Source, clip: ClipFrames) -> tuple[ClipBytes | None, Failure]:
    """The packets of ``source`` that decode ``clip.indices``, remuxed (stream copy: never decoded) into a small
    container: ``(ClipBytes, Failure.NONE)``, or ``(None, failure)``: ``TRUNCATED`` when the stream ends before the
    last wanted frame, ``UNDECODABLE`` when FFmpeg cannot demux the file or it has no timestamps to find frames by.

    The packets run from the keyframe at or before the first wanted frame (found by seeking, else by demuxing from
    the start) until every frame up to the last wanted one is in (in decode order: the references a B-frame needs
    come before it), or the next keyframe after it. Memory: the source (bytes, shared, not copied; or a file read in
    pieces) and the clip's packets, twice at most (the packets and the container being written).
    """
    import av

    wanted = np.asarray(clip.indices, np.int64)
    if wanted.ndim != 1 or len(wanted) == 0 or wanted[0] < 0 or np.any(np.diff(wanted) < 0):
        raise ValueError(f"frame indices must be a non-empty, non-decreasing int64 [F], got {wanted!r}")
    first, last = int(wanted[0]), int(wanted[-1])
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            found = None
            if first > 0:
                base = stream.time_base
                start = float(stream.start_time * base) if stream.start_time is not None else 0.0
                target = start + clip.time_of(first) - 0.5 / clip.fps
                container.seek(max(0, int(target / base)), stream=stream, backward=True, any_frame=False)
                found = _clip_packets(container.demux(stream), stream, clip, first, last, after_seek=True)
            if found is None:  # at the start, or the seek did not land on a keyframe before the first wanted frame
                container.seek(0, stream=stream)
                found = _clip_packets(container.demux(stream), stream, clip, first, last, after_seek=False)
            if found is None:
                return None, Failure.UNDECODABLE  # no keyframe at or before the first wanted frame
            packets, key, reached = found
            if reached < last:
                return None, Failure.TRUNCATED
            data = _remux(packets, stream)
        rotation = mp4_rotation(source)
    except _NoTimestamps:
        return None, Failure.UNDECODABLE
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None, Failure.UNDECODABLE
    return ClipBytes(data, key, rotation), Failure.NONE


class _NoTimestamps(Exception):
    """A packet has neither a presentation nor a decoding time stamp."""


def _clip_packets(demux, stream, clip: ClipFrames, first: int, last: int, *, after_seek: bool):
    """``(packets, key, reached)`` from a demuxer: the packets from the last keyframe at or before frame ``first`` up to
    the frames through ``last`` (with an open GOP, through the next keyframe and the leading frames after it that are
    shown before it), the keyframe's frame number, and the highest frame number seen; or None when the demuxer
    (``after_seek``: its first packet) holds no keyframe at or before ``first``."""
    base = stream.time_base
    start = stream.start_time if stream.start_time is not None else 0
    kept: list = []
    key: int | None = None
    seen: set[int] = set()
    reached = -1
    following: int | None = None  # the first keyframe after the last wanted frame, once met
    for packet in demux:
        if packet.size == 0:  # the demuxer's flush packet
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None:
            raise _NoTimestamps
        number = frame_number(float((stamp - start) * base), clip)
        if packet.is_keyframe and number <= first:
            kept, key, seen = [], number, set()  # a later keyframe still at or before the first wanted frame
        elif key is None:
            if after_seek:
                return None
            continue
        elif packet.is_keyframe and number > last:
            if following is not None:
                break
            following = number  # the next keyframe: an open GOP's frames shown before it are decoded after it
        elif following is not None and number > following:
            break  # past the next keyframe's leading frames: every wanted frame is before them
        elif number < key:
            continue  # a leading frame of an open GOP: it refers to the GOP before and is shown before the keyframe
        kept.append(packet)
        reached = max(reached, number)
        if key <= number <= last:
            seen.add(number)
            if len(seen) == last - key + 1:
                break
    if key is None:
        return None
    return kept, key, reached


def _remux(packets: list, stream) -> np.ndarray:
    """``packets`` of ``stream`` in a new container (:data:`REMUX_FORMATS`), times shifted to start at 0:
    ``uint8 (n,)``."""
    import av

    fmt = REMUX_FORMATS.get(stream.codec_context.name, "matroska")
    buffer = io.BytesIO()
    offset = min(p.dts if p.dts is not None else p.pts for p in packets)
    with av.open(buffer, "w", format=fmt) as out:
        copy = out.add_stream_from_template(stream)
        if fmt == "avi":
            copy.codec_context.codec_tag = "MJPG"  # an MJPEG stream from a MOV carries MOV's tag ('jpeg')
        for packet in packets:
            if packet.pts is not None:
                packet.pts -= offset
            if packet.dts is not None:
                packet.dts -= offset
            packet.stream = copy
            out.mux(packet)
    return np.frombuffer(buffer.getvalue(), np.uint8)


_ISO_TOP = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")


def mp4_rotation(source: Source) -> int:
    """The display rotation (counter-clockwise degrees: 0, 90, 180, 270, as PyAV's ``VideoFrame.rotation`` modulo
    360) of the first video track of an MP4/MOV file, read from its track header's matrix; 0 for any other file
    or a matrix that is not a quarter turn. Reads box headers only (the ``moov`` box, wherever it is; from a file
    object, only the box headers and the track headers it walks through)."""
    if hasattr(source, "read"):
        return _iso_rotation(_FileBytes(source))  # type: ignore[arg-type]
    if isinstance(source, (str, os.PathLike)):
        import mmap

        if os.path.getsize(source) < 8:
            return 0
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _iso_rotation(view)
            finally:
                view.release()
    return _iso_rotation(memoryview(source).cast("B"))


class _FileBytes:
    """A seekable file read as the box walk reads a buffer: ``len()``, ``[i]`` and ``[a:b]``, each a seek and a
    read (the walk reads a few bytes per box)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._size = file.seek(0, io.SEEK_END)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self._size)
            self._file.seek(start)
            return self._file.read(max(0, stop - start))
        self._file.seek(key)
        got = self._file.read(1)
        if not got:
            raise IndexError(key)
        return got[0]


def _iso_rotation(data: memoryview) -> int:
    if len(data) < 8 or bytes(data[4:8]) not in _ISO_TOP:
        return 0
    moov = _box(data, 0, len(data), b"moov")
    if moov is None:
        return 0
    for trak in _boxes(data, *moov, b"trak"):
        mdia = _box(data, *trak, b"mdia")
        hdlr = _box(data, *mdia, b"hdlr") if mdia else None
        tkhd = _box(data, *trak, b"tkhd")
        if hdlr is None or tkhd is None or bytes(data[hdlr[0] + 8 : hdlr[0] + 12]) != b"vide":
            continue
        if tkhd[1] - tkhd[0] < 84:  # version 0's fields through the matrix (version 1: 96)
            return 0
        at = tkhd[0] + (4 + 8 + 8 + 4 + 4 + 8 if data[tkhd[0]] == 1 else 4 + 4 + 4 + 4 + 4 + 4) + 8 + 8
        if at + 8 > tkhd[1]:
            return 0
        a, b = (int.from_bytes(data[at + 4 * i : at + 4 * i + 4], "big", signed=True) for i in (0, 1))
        if a == 0 and b != 0:
            return 270 if b > 0 else 90
        return 180 if a < 0 and b == 0 else 0
    return 0


def _boxes(data: memoryview, begin: int, end: int, kind: bytes):
    """``(payload start, payload end)`` of each box ``kind`` among the boxes in ``data[begin:end]``."""
    at = begin
    while at + 8 <= end:
        size = int.from_bytes(data[at : at + 4], "big")
        head = 8
        if size == 1 and at + 16 <= end:
            size, head = int.from_bytes(data[at + 8 : at + 16], "big"), 16
        elif size == 0:
            size = end - at
        if size < head:
            return
        if bytes(data[at + 4 : at + 8]) == kind:
            yield at + head, min(at + size, end)
        at += size


def _box(data: memoryview, begin: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(_boxes(data, begin, end, kind), None)
