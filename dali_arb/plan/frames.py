"""Which frames of a video make a training sample: :class:`FrameSpec` (the frame buckets, the target frame rate,
how clips are cut from a video), :func:`clip_table` (every clip the planner plans, an image being a 1-frame clip)
and :func:`frame_indices` (the source frame numbers of one clip). Pure functions of the manifest's columns and the
spec: every rank and a resume agree, with nothing random.

The timeline: a clip is cut on the **target-rate timeline**, where frame ``j`` is shown at time ``j / fps`` (the
spec's ``fps``, or the video's own rate when None). Its source frame is the one on screen at that time: frame
``floor(t * source_fps)`` for a constant rate, the last frame whose timestamp is not after ``t`` for a variable
rate. So a 60 fps video at ``fps=24`` takes frames 0, 2, 5, 7, 10... (every 2.5th by time), and a 15 fps video at
``fps=30`` shows each frame twice. A video's **usable length** is the number of target-rate frames shown before
its end; it goes to the **largest frame bucket its usable length fills** (smaller videos than the smallest bucket
give no clip), and ``clip`` cuts windows of that many frames (musubi-tuner's ``frame_extraction``):

- ``head``: one clip from frame 0;
- ``chunk``: consecutive clips that do not overlap (``0, F, 2F...`` while they fit);
- ``slide``: a window every ``stride`` frames (``0, stride, 2*stride...`` while it fits);
- ``uniform``: ``count`` windows evenly spaced from the first to the last that fits (``linspace(0, n - F, count)``,
  rounded down, as musubi-tuner's ``frame_sample``).

Imports NumPy and the standard library (and ``errors``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["CLIP_MODES", "ClipTable", "FrameSpec", "clip_table", "frame_indices", "usable_frames"]

CLIP_MODES = ("head", "uniform", "slide", "chunk")


def _positive_int(value, name: str) -> int:
    """``value`` as a frame count from 1 to ``2**31 - 1`` (the manifest's ``frames`` is int32: no video holds more);
    a ConfigError echoing it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value > 2**31 - 1:
        raise ConfigError(f"{name} must be at most 2**31 - 1 (2147483647), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class FrameSpec:
    """How videos become samples (issue 21). Keyword options, validated; ``frames`` may be given in any order.

    Attributes:
        frames: frame buckets, ascending and distinct (e.g. ``(1, 17, 33, 49, 81)``: 4k+1 as video VAEs want).
        fps: target frame rate (None: each video's own).
        clip: ``"head"``, ``"uniform"``, ``"slide"`` or ``"chunk"`` (see the module's text).
        stride: ``slide``'s step between windows, in target-rate frames (musubi-tuner's ``frame_stride``).
        count: ``uniform``'s clips per video (musubi-tuner's ``frame_sample``).
        images: images are 1-frame samples (``frames`` must hold 1); False: images are left out.
    """

    frames: tuple[int, ...]
    fps: float | None = None
    clip: str = "head"
    stride: int = 1
    count: int = 1
    images: bool = True

    def __post_init__(self) -> None:
        frames = self.frames
        if isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
            frames = (frames,)
        try:
            values = [_positive_int(f, "every frame bucket") for f in frames]
        except TypeError:
            raise ConfigError(f"frames must be a list of frame counts such as 1,17,33, got {self.frames!r}") from None
        if not values:
            raise ConfigError("frames must name at least one frame bucket, e.g. frames=(1, 17, 33)")
        object.__setattr__(self, "frames", tuple(sorted(set(values))))
        if self.fps is not None:
            if (
                isinstance(self.fps, bool)
                or not isinstance(self.fps, (int, float))
                or not (math.isfinite(self.fps) and self.fps > 0)
            ):
                raise ConfigError(f"fps must be a positive frame rate or None (each video's own), got {self.fps!r}")
            object.__setattr__(self, "fps", float(self.fps))
        if self.clip not in CLIP_MODES:
            raise ConfigError(f"clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        object.__setattr__(self, "stride", _positive_int(self.stride, "stride"))
        object.__setattr__(self, "count", _positive_int(self.count, "count (clips per video for clip='uniform')"))
        if not isinstance(self.images, bool):
            raise ConfigError(f"images must be True (1-frame samples) or False (left out), got {self.images!r}")

    def to_dict(self) -> dict:
        return {"frames": list(self.frames), "fps": self.fps, "clip": self.clip, "stride": self.stride,
                "count": self.count, "images": self.images}  # fmt: skip

    def fingerprint(self) -> str:
        """A short digest of every field: the loader state records it, so a resume with other frame options is
        refused rather than served other clips."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClipTable:
    """Every sample the planner plans: one entry per clip, in row order then start order (an image is a 1-frame
    clip at start 0).

    Attributes:
        row: int64 ``[C]`` manifest row (global row across datasets).
        length: int32 ``[C]`` the clip's frame bucket ``F`` (1 for images).
        start: int32 ``[C]`` first frame of the clip on the target-rate timeline.
    """

    row: np.ndarray
    length: np.ndarray
    start: np.ndarray

    def __len__(self) -> int:
        return len(self.row)


def usable_frames(frames: np.ndarray, fps: np.ndarray, duration: np.ndarray, spec: FrameSpec) -> np.ndarray:
    """int64 ``[N]``: how many target-rate frames each video shows before its end (0 for images: ``frames`` <= 0 or
    NaN). At its own rate, its frame count; at ``spec.fps``, ``ceil(seconds * spec.fps)``, ``seconds`` the smaller of
    the duration and ``frames / fps``."""
    frames = np.nan_to_num(np.asarray(frames, np.float64), nan=0.0)
    videos = frames > 0
    out = np.zeros(len(frames), np.int64)
    if spec.fps is None:
        out[videos] = frames[videos].astype(np.int64)
        return out
    fps = np.asarray(fps, np.float64)
    duration = np.asarray(duration, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_rate = frames / fps  # (a duration longer than the frames last, as metadata may say, is not trusted)
        seconds = np.where(np.isfinite(duration) & (duration > 0), np.fmin(duration, by_rate), by_rate)
    good = videos & np.isfinite(seconds) & (seconds > 0)
    out[good] = np.ceil(seconds[good] * spec.fps - 1e-6).astype(np.int64)
    return out


def clip_table(frames, fps, duration, spec: FrameSpec) -> ClipTable:
    """The clips of every row (see the module's text). ``frames`` int64 ``[N]`` (-1, 0, NaN or a masked value for
    images), ``fps`` and ``duration`` float64 ``[N]`` (anything for images). Rows give clips in order; a video
    shorter than the smallest bucket gives none, an image one 1-frame clip (or none with ``images=False``).

    Raises:
        ConfigError: the rows hold images, ``spec.images`` and 1 is not a frame bucket.
    """
    frames = np.ma.filled(np.ma.asarray(frames, np.float64), np.nan)
    n = len(frames)
    usable = usable_frames(frames, fps, duration, spec)
    is_image = ~(np.nan_to_num(frames, nan=0.0) > 0)
    buckets = np.asarray(spec.frames, np.int64)
    # the largest bucket each video fills (-1: none)
    slot = np.searchsorted(buckets, usable, side="right") - 1
    length = np.where(slot >= 0, buckets[np.maximum(slot, 0)], 0)
    length[is_image] = 0
    if spec.images and is_image.any():
        if 1 not in spec.frames:
            raise ConfigError(
                f"the data holds {int(is_image.sum())} images, which are 1-frame samples, but frames={spec.frames} "
                "has no 1: add 1 to the frame buckets or leave images out (images=False / --images exclude)"
            )
        length[is_image] = 1
        usable = np.where(is_image, 1, usable)
    counts = _clip_counts(usable, length, spec)
    counts[is_image & (length == 1)] = 1  # an image is one sample, whatever the clip mode
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    i = np.arange(len(rows), dtype=np.int64) - first  # the clip's number within its video
    clip_len = length[rows]
    if spec.clip == "chunk":
        start = i * clip_len
    elif spec.clip == "slide":
        start = i * spec.stride
    elif spec.clip == "uniform" and spec.count > 1:
        start = (i * (usable[rows] - clip_len)) // (spec.count - 1)
    else:
        start = np.zeros(len(rows), np.int64)
    return ClipTable(row=rows, length=clip_len.astype(np.int32), start=start.astype(np.int32))


def _clip_counts(usable: np.ndarray, length: np.ndarray, spec: FrameSpec) -> np.ndarray:
    """int64 ``[N]``: clips of each row (0 where ``length`` is 0)."""
    has = length > 0
    safe = np.maximum(length, 1)
    if spec.clip == "chunk":
        counts = usable // safe
    elif spec.clip == "slide":
        counts = (usable - safe) // spec.stride + 1
    elif spec.clip == "uniform":
        counts = np.full(len(usable), spec.count, np.int64)
    else:
        counts = np.ones(len(usable), np.int64)
    return np.where(has, counts, 0).astype(np.int64)


def frame_indices(
    spec: FrameSpec,
    *,
    start: int,
    length: int,
    n_frames: int,
    fps: float,
    frame_times: np.ndarray | None = None,
) -> np.ndarray:
    """int64 ``[length]``: the source frame numbers of the clip ``(start, length)`` of a video of ``n_frames``
    frames at ``fps`` (its average rate); ``frame_times`` float ``[n_frames]``, a variable-rate video's frame times
    (seconds from the first, ascending), sampled by timestamp. Ascending (not strictly: a video slower than
    ``spec.fps`` shows a frame several times), each in ``[0, n_frames)``."""
    if length < 1 or start < 0 or n_frames < 1:
        raise ValueError(f"a clip needs length >= 1, start >= 0 and frames, got {length=}, {start=}, {n_frames=}")
    k = np.arange(start, start + length, dtype=np.int64)
    if spec.fps is None:
        index = k
    else:
        t = k / spec.fps
        if frame_times is not None:
            times = np.asarray(frame_times, np.float64)
            if len(times) != n_frames:
                raise ValueError(f"frame_times holds {len(times)} times for a video of {n_frames} frames")
            tolerance = np.maximum(1e-6, np.abs(t) * 2.0**-22)  # (the manifest keeps times as float32)
            index = np.searchsorted(times, t + tolerance, side="right") - 1
        else:
            if not (math.isfinite(fps) and fps > 0):
                raise ValueError(f"fps must be a positive frame rate, got {fps!r}")
            index = np.floor(t * fps + 1e-9).astype(np.int64)
    if index[-1] >= n_frames:
        raise ValueError(
            f"clip (start {start}, length {length}) at {spec.fps or fps} fps runs past the video's {n_frames} frames"
        )
    return np.clip(index, 0, n_frames - 1).astype(np.int64)
