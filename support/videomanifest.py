"""Manifests of test clips for the video tests and benchmarks: :func:`video_manifest` makes clips with
``dali_arb.tools.clips.make_clip`` and writes the columns the video indexer writes (frames, fps, duration, codec, vfr,
frame_times), without indexing, so a test states exactly what the manifest says (and can then change the files
behind it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dali_arb.data.manifest import Manifest
from dali_arb.tools.clips import make_clip, reference_frames

__all__ = ["video_manifest"]


def video_manifest(
    folder: Path, clips: list[dict], images: int = 0, *, size: tuple[int, int], identity: bool = False
) -> Manifest:
    """A manifest of the clips ``make_clip(**clip)`` writes (with the columns the indexer writes: frames, fps,
    duration, codec, vfr, frame_times) and ``images`` JPEGs, all of displayed ``size`` ``(W, H)``; with ``identity``
    each file's size and modification time as indexed (``source_size``, ``mtime_ns``)."""
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
    table = pa.Table.from_pylist(rows, schema=schema)
    if identity:
        stats = [Path(p).stat() for p in table.column("source").to_pylist()]
        table = table.append_column("source_size", pa.array([st.st_size for st in stats], pa.int64()))
        table = table.append_column("mtime_ns", pa.array([st.st_mtime_ns for st in stats], pa.int64()))
    return Manifest(table)
