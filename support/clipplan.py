"""Stand-ins for video-plan's half of issue 21 while the package lacks it (``dali_arb.plan.frames`` and the clip
planner), following the interface's words (``/work/briefs/video-interface.md`` sections 3-4): ``FrameSpec``,
``frame_indices`` (by time; by timestamp for variable-rate videos), and a planner of ``chunk`` clips (images:
1-frame clips), one bucket per frame count at one spatial size, full batches only, a keyed order per epoch. Also
:func:`video_manifest`, a manifest of made clips with the columns the video indexer writes. Tests and the video
benchmark use them; :func:`install` puts them in place only where the package has no ``plan.frames``.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dali_arb.data.manifest import Manifest
from dali_arb.tools.clips import make_clip, reference_frames


@dataclass(frozen=True)
class StandInSpec:
    frames: tuple[int, ...]
    fps: float | None = None
    clip: str = "head"
    stride: int = 1
    count: int = 1
    images: bool = True

    def fingerprint(self) -> str:
        return json.dumps([list(self.frames), self.fps, self.clip, self.stride, self.count, self.images])


@dataclass(frozen=True)
class StandInClips:
    row: np.ndarray
    length: np.ndarray
    start: np.ndarray


def stand_in_frame_indices(spec, *, start, length, n_frames, fps, frame_times=None) -> np.ndarray:
    target = spec.fps or fps
    times = (start + np.arange(length)) / target
    if frame_times is not None:
        index = np.searchsorted(np.asarray(frame_times, np.float64), times + 1e-6, side="right") - 1
    else:
        index = np.floor(times * fps + 1e-6).astype(np.int64)
    return np.clip(index, 0, n_frames - 1).astype(np.int64)


def _module(name: str, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class StandInIndex:
    def __init__(self, clip_buckets: np.ndarray, sizes: np.ndarray) -> None:
        order = np.argsort(clip_buckets, kind="stable")
        self.members = order.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(clip_buckets, minlength=len(sizes)))]).astype(np.int64)
        self.sizes = sizes

    def member_rows(self, positions, epoch):
        return self.members[np.asarray(positions)]


class StandInPlan:
    def __init__(self, steps: list[tuple[int, np.ndarray]], frames: list[int], sizes: np.ndarray) -> None:
        self.steps, self.frames, self.sizes = steps, frames, sizes

    def __len__(self) -> int:
        return len(self.steps)

    def rows_at(self, step: int) -> np.ndarray:
        return self.steps[step][1]

    def bucket_at(self, step: int) -> int:
        return self.steps[step][0]

    def frames_at(self, step: int) -> int:
        return self.frames[self.steps[step][0]]

    def offset_at(self, step: int) -> int:
        return 0


class StandInPlanner:
    """Clips by ``chunk`` of each video (images: 1-frame clips), one bucket per frame count, full batches of
    ``batch`` clips in a keyed order per epoch."""

    def __init__(
        self, manifest: Manifest, spec: StandInSpec, *, batch: int, seed: int, bucket: tuple[int, int]
    ) -> None:
        n = manifest.int_column("frames", -1)
        rates = np.asarray(manifest.table.column("fps").fill_null(1.0).to_numpy(), np.float64)
        rows, lengths, starts = [], [], []
        for r, count in enumerate(n.tolist()):
            if count >= 0 and spec.fps:  # the usable length on the target-rate timeline
                count = int(count * spec.fps / rates[r])
            if count < 0:
                if spec.images:
                    rows.append(r), lengths.append(1), starts.append(0)
                continue
            fit = [f for f in spec.frames if f <= count]
            if not fit:
                continue
            f = max(fit)
            for s in range(0, count - f + 1, f):
                rows.append(r), lengths.append(f), starts.append(s)
        self.clips = StandInClips(np.array(rows, np.int64), np.array(lengths, np.int32), np.array(starts, np.int32))
        self.frame_buckets = sorted(set(lengths))
        clip_buckets = np.array([self.frame_buckets.index(f) for f in lengths], np.int64)
        sizes = np.array([bucket] * len(self.frame_buckets), np.int64)
        self.index = StandInIndex(clip_buckets, sizes)
        self.batch = np.full(len(sizes), batch, np.int64)
        self.max_batch = batch
        self._seed, self._clip_buckets, self._sizes = seed, clip_buckets, sizes

    def epoch(self, epoch: int) -> StandInPlan:
        rng = np.random.default_rng([self._seed, epoch])
        steps = []
        for k in range(len(self.frame_buckets)):
            members = rng.permutation(np.flatnonzero(self._clip_buckets == k))
            steps += [(k, members[i : i + self.max_batch]) for i in range(0, len(members) - self.max_batch + 1,
                                                                          self.max_batch)]  # fmt: skip
        order = rng.permutation(len(steps))
        return StandInPlan([steps[i] for i in order], self.frame_buckets, self._sizes)

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.epoch(epoch))


def install(monkeypatch, *, bucket: tuple[int, int]) -> str:
    """The package's clip planning (``"package"``), or stand-ins put in place with ``monkeypatch`` (a pytest
    MonkeyPatch) where the package lacks it: ``plan.frames`` (only while it is missing) and the clip planner
    (while ``make_planner`` takes no ``frames``), serving every clip at ``bucket`` ``(H, W)`` (``"stand-in"``)."""
    import inspect

    from dali_arb.plan.planner import make_planner

    if "frames" in inspect.signature(make_planner).parameters:
        return "package"
    try:
        importlib.import_module("dali_arb.plan.frames")
    except ImportError:
        frames = _module("dali_arb.plan.frames", FrameSpec=StandInSpec, frame_indices=stand_in_frame_indices)
        monkeypatch.setitem(sys.modules, "dali_arb.plan.frames", frames)
    from dali_arb.loader import session, source

    def build(config, manifests):
        manifests = [manifests] if isinstance(manifests, Manifest) else manifests
        return StandInPlanner(manifests[0], config.frames, batch=int(config.batch_size), seed=config.seed,
                              bucket=bucket)  # fmt: skip

    monkeypatch.setattr(session, "build_planner", build)
    monkeypatch.setattr(source, "build_planner", build)
    return "stand-in"


def video_manifest(folder: Path, clips: list[dict], images: int = 0, *, size: tuple[int, int]) -> Manifest:
    """A manifest of the clips ``make_clip(**clip)`` writes (with the columns the indexer writes: frames, fps,
    duration, codec, vfr, frame_times) and ``images`` JPEGs, all of displayed ``size`` ``(W, H)``."""
    from PIL import Image

    from dali_arb.tools.clips import expected_frame

    rows = []
    for i, clip in enumerate(clips):
        ext = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}[clip.get("codec", "h264")]
        path = make_clip(folder / f"v{i}{ext}", size=size, **clip)
        _, times = reference_frames(path)
        fps = float(clip.get("fps", 24.0))
        vfr = bool(clip.get("vfr", False))
        rows.append({"key": f"v{i}", "source": str(path), "width": size[0], "height": size[1], "frames": len(times),
                     "fps": fps, "duration": float(times[-1] + 1 / fps), "codec": clip.get("codec", "h264"),
                     "vfr": vfr, "frame_times": times.astype(np.float32).tolist() if vfr else None})  # fmt: skip
    for j in range(images):
        path = folder / f"i{j}.jpg"
        Image.fromarray(expected_frame(j, size=size)).save(path, quality=95)
        rows.append({"key": f"i{j}", "source": str(path), "width": size[0], "height": size[1], "frames": None,
                     "fps": None, "duration": None, "codec": None, "vfr": None, "frame_times": None})  # fmt: skip
    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("frames", pa.int32()), ("fps", pa.float64()), ("duration", pa.float64()),
                        ("codec", pa.string()), ("vfr", pa.bool_()), ("frame_times", pa.list_(pa.float32()))])  # fmt: skip
    return Manifest(pa.Table.from_pylist(rows, schema=schema))
