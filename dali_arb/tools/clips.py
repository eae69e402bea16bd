"""Test clips made of real photographs: :func:`make_clip` writes an H.264 (.mp4), VP9 (.webm) or MJPEG (.avi)
video whose every frame is a pan or zoom crop of one of the photos shipped in ``dali_arb/samples`` (so each
frame differs from its neighbours and is recognisable), at any frame rate, with a display rotation the decoders
honour (a display matrix, as phones write it) and optionally a variable frame rate. :func:`truncate_clip` cuts a
file short; :func:`expected_frame` and :func:`clip_times` give what was written (the frames before encoding and
their presentation times), :func:`reference_frames` decodes a clip with PyAV as the reference decoder.

Conventions, shared with the indexer and the decoders:

- ``size=(W, H)`` is the **display** size, upright, what the manifest reports as ``width``, ``height``. With
  ``rotation`` 90 or 270 the stored (coded) frames are ``H x W``, turned so that applying the rotation shows the
  photo upright.
- ``rotation`` is counter-clockwise degrees, the value FFmpeg's display matrix and PyAV's ``VideoFrame.rotation``
  report (PyAV gives -180..180: take it modulo 360): to display a decoded frame, turn it ``rotation`` degrees counter-clockwise (``np.rot90(frame,
  rotation // 90)``, :func:`upright`).

Imports NumPy at import time; PyAV and Pillow when called (``tools/`` may import anything).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "CODECS",
    "clip_times",
    "expected_frame",
    "make_clip",
    "reference_frames",
    "truncate_clip",
    "upright",
]

# codec -> (PyAV encoder, pixel format, containers it may be written in; the first is the default)
CODECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "h264": ("libx264", "yuv420p", (".mp4", ".mov", ".mkv")),
    "vp9": ("libvpx-vp9", "yuv420p", (".webm", ".mkv")),
    "mjpeg": ("mjpeg", "yuvj420p", (".avi", ".mkv", ".mov")),
}
_ENCODER_OPTIONS = {
    "h264": {"preset": "veryfast", "crf": "16"},
    "vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
    "mjpeg": {"qmin": "1", "qmax": "3"},
}
_SAMPLES = Path(__file__).parent.parent / "samples"
# a variable-frame-rate clip's frame durations, in units of 1/fps, repeated: a phone's stutter
_VFR_PATTERN = (1.0, 1.0, 2.0, 1.0, 0.5, 0.5, 3.0, 1.0)
_VFR_CONTAINERS = (".mp4", ".mov", ".mkv", ".webm")


def clip_times(*, fps: float = 24.0, frames: int = 48, vfr: bool = False) -> np.ndarray:
    """float64 ``[frames]``: each written frame's presentation time in seconds from the first frame. Constant
    ``k / fps``, or with ``vfr`` frame durations cycling through ``(1, 1, 2, 1, 0.5, 0.5, 3, 1) / fps``."""
    _check_count(frames, fps)
    if not vfr:
        return np.arange(frames, dtype=np.float64) / float(fps)
    steps = np.resize(np.asarray(_VFR_PATTERN), max(frames - 1, 0)) / float(fps)
    return np.concatenate([[0.0], np.cumsum(steps)])


def expected_frame(
    k: int,
    *,
    frames: int = 48,
    size: tuple[int, int] = (256, 144),
    photo: str | os.PathLike | None = None,
    motion: str = "pan",
) -> np.ndarray:
    """uint8 ``[H, W, 3]``: frame ``k`` of a clip as :func:`make_clip` rendered it before encoding, upright
    (display orientation, ``size=(W, H)``). ``pan`` slides a window of 70% of the photo from its top-left to its
    bottom-right corner; ``zoom`` shrinks a centred window from the whole photo to 50% of it."""
    from PIL import Image

    if not 0 <= k < frames:
        raise ValueError(f"frame {k} is outside the clip's {frames} frames")
    width, height = _check_size(size)
    image = _photo(photo)
    box = _window(k, frames, image.width, image.height, width / height, motion)
    return np.asarray(image.resize((width, height), Image.BILINEAR, box=box, reducing_gap=None))


def make_clip(
    path: str | os.PathLike,
    *,
    codec: str = "h264",
    fps: float = 24.0,
    frames: int = 48,
    size: tuple[int, int] = (256, 144),
    photo: str | os.PathLike | None = None,
    motion: str = "pan",
    rotation: int = 0,
    vfr: bool = False,
    gop: int = 12,
) -> Path:
    """Write a clip of ``frames`` frames (:func:`expected_frame` ``0..frames-1``) at ``fps`` and return its path.

    ``path`` without a suffix gets the codec's container (.mp4 for h264, .webm for vp9, .avi for mjpeg); a
    suffix must be one the codec can be written in (``CODECS``). ``photo``: a sample's name (``"coffee"``), a
    path, or None (``astronaut``). ``rotation`` (0, 90, 180, 270, counter-clockwise) is written as a display
    matrix (MP4/MOV only: the rotation survives muxing there and PyAV reads it back as ``VideoFrame.rotation``).
    ``vfr`` gives the frames the presentation times of :func:`clip_times` (not in .avi, which has no timestamps).
    ``gop``: frames between keyframes, so seeking has something to find. H.264 is written with B-frames (decode
    order differs from presentation order, as in real files) and the index at the front (``faststart``)."""
    import av

    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: make_clip writes {', '.join(CODECS)}")
    encoder, pix_fmt, containers = CODECS[codec]
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(containers[0])
    if path.suffix.lower() not in containers:
        raise ValueError(f"{path.name}: a {codec} clip is written as {', '.join(containers)}")
    width, height = _check_size(size)
    times = clip_times(fps=fps, frames=frames, vfr=vfr)
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation={rotation!r}: use 0, 90, 180 or 270 (degrees counter-clockwise)")
    if rotation and path.suffix.lower() not in (".mp4", ".mov"):
        raise ValueError(f"rotation={rotation}: only .mp4/.mov keep a display matrix, not {path.suffix}")
    if vfr and path.suffix.lower() not in _VFR_CONTAINERS:
        raise ValueError(f"vfr=True: {path.suffix} has no timestamps; use one of {', '.join(_VFR_CONTAINERS)}")
    if not isinstance(gop, int) or gop < 1:
        raise ValueError(f"gop={gop!r}: frames between keyframes must be a positive integer")
    coded_w, coded_h = (height, width) if rotation in (90, 270) else (width, height)
    if codec != "mjpeg" and (coded_w % 2 or coded_h % 2):
        raise ValueError(f"size={size!r}: {codec} with 4:2:0 chroma needs an even width and height")

    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(_ENCODER_OPTIONS[codec]))
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, pix_fmt
        stream.codec_context.gop_size = gop
        # a fine clock so variable frame times are exact to 1/90000 s (Matroska keeps milliseconds)
        tick = Fraction(1, 90000) if vfr else 1 / rate
        stream.codec_context.time_base = tick
        if vfr:
            stream.time_base = tick
        if rotation:
            stream.set_display_rotation(rotation)
        for k in range(frames):
            rgb = expected_frame(k, frames=frames, size=(width, height), photo=photo, motion=motion)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(rgb, -rotation // 90)), format="rgb24")
            frame.pts = round(Fraction(times[k]) / tick) if vfr else k
            frame.time_base = tick
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def truncate_clip(path: str | os.PathLike, keep: float = 0.5) -> Path:
    """Cut the file at ``path`` to its first ``keep`` fraction of bytes, in place (a download that stopped):
    the header still promises every frame, the data ends early. Returns the path."""
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep={keep!r}: the fraction of bytes kept must be between 0 and 1")
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(max(1, int(size * keep)))
    return path


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """``frame`` ``[H, W, C]`` as displayed: turned ``rotation`` degrees counter-clockwise (a display matrix's
    rotation, PyAV's ``VideoFrame.rotation``)."""
    return np.rot90(frame, (int(rotation) // 90) % 4)


def reference_frames(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The reference decode (PyAV, every frame, presentation order, display rotation applied): uint8
    ``[N, H, W, 3]`` frames and float64 ``[N]`` presentation times in seconds from the first frame."""
    import av

    images, stamps = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            images.append(np.ascontiguousarray(upright(frame.to_ndarray(format="rgb24"), frame.rotation)))
            stamps.append(float(frame.pts * frame.time_base) if frame.pts is not None else np.nan)
    times = np.asarray(stamps, np.float64)
    order = np.argsort(times, kind="stable")
    return np.stack(images)[order], times[order] - (times[order[0]] if len(times) else 0.0)


def _check_count(frames: int, fps: float) -> None:
    if not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames={frames!r}: a clip needs a positive whole number of frames")
    if not float(fps) > 0:
        raise ValueError(f"fps={fps!r}: the frame rate must be positive")


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size={size!r}: give (width, height) in pixels") from None
    if width < 16 or height < 16:
        raise ValueError(f"size={size!r}: width and height must be at least 16 pixels")
    return width, height


def _photo(photo: str | os.PathLike | None):
    from PIL import Image, ImageOps

    if photo is None:
        photo = "astronaut"
    candidate = Path(photo)
    if not candidate.suffix and not candidate.exists():
        candidate = _SAMPLES / f"{photo}.jpg"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in _SAMPLES.glob("*.jpg")))
        raise ValueError(f"photo={photo!r}: not a file nor a bundled sample ({names})")
    with Image.open(candidate) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _window(k: int, frames: int, pw: int, ph: int, aspect: float, motion: str) -> tuple[float, float, float, float]:
    """The photo window ``(left, top, right, bottom)`` of frame ``k``: the largest window of the clip's aspect
    inside the photo, scaled and moved by ``motion``."""
    if motion not in ("pan", "zoom"):
        raise ValueError(f"motion={motion!r}: use 'pan' or 'zoom'")
    full_w, full_h = (pw, pw / aspect) if pw / ph <= aspect else (ph * aspect, ph)
    t = k / max(frames - 1, 1)
    if motion == "pan":
        w, h = 0.7 * full_w, 0.7 * full_h
        left, top = t * (pw - w), t * (ph - h)
    else:
        scale = 1.0 - 0.5 * t
        w, h = scale * full_w, scale * full_h
        left, top = (pw - w) / 2, (ph - h) / 2
    return (left, top, left + w, top + h)
