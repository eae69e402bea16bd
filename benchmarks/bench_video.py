"""Video decoding on the CPU, side by side in one run.

``video_decode``: the ways to get ``F`` chosen frames of a clip at a bucket size on one core: PyAV seeking to the
keyframe before the first wanted frame (``decode_clip``, what the workers do), PyAV decoding from the first frame (what
a peer that counts frames does), and DALI's CPU ``fn.decoders.video`` with ``frames=`` (VP9 and MJPEG only: the
PyPI wheel's CPU variant refuses H.264), each followed by the same cover resize and crop.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from . import case

CODECS = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}


def _clips(folder: Path, *, size: tuple[int, int], frames: int, fps: float, gop: int) -> dict[str, Path]:
    from dali_arb.tools.clips import make_clip

    return {
        codec: make_clip(folder / f"clip{ext}", codec=codec, fps=fps, frames=frames, size=size, gop=gop)
        for codec, ext in CODECS.items()
    }


def _pyav_from_start(path: Path, wanted: np.ndarray, geometry) -> np.ndarray:
    """The peer's way: decode from the first frame, counting, and finish the wanted ones."""
    import av

    from dali_arb.loader.decoders.videoframes import _finish, upright

    out = np.empty((len(wanted), geometry.bucket_h, geometry.bucket_w, 3), np.uint8)
    position = 0
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            while position < len(wanted) and wanted[position] == number:
                out[position] = _finish(upright(frame.to_ndarray(format="rgb24"), frame.rotation), geometry)
                position += 1
            if position == len(wanted):
                break
    return out


def _dali_cpu(paths: list[Path], wanted: np.ndarray, geometry, *, repeats: int) -> float:
    """Seconds per clip for DALI's CPU video decoder (one thread) + resize of the crop window, batch 1."""
    from nvidia.dali import fn, pipeline_def, types

    data = [np.fromfile(p, np.uint8) for p in paths]
    top, left, bottom, right = geometry.source_window()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(source=lambda info: data[info.iteration % len(data)], batch=False,
                                     dtype=types.UINT8)  # fmt: skip
        frames = fn.decoders.video(encoded, device="cpu", frames=[int(i) for i in wanted])
        return fn.resize(frames, size=[geometry.bucket_h, geometry.bucket_w], roi_start=[top, left],
                         roi_end=[bottom, right], roi_relative=False, antialias=True)  # fmt: skip

    p = pipe()
    p.build()
    p.run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        p.run()
    return (time.perf_counter() - start) / repeats


@case("video_decode")
def video_decode(args) -> dict:
    from dali_arb.loader.assembly import place
    from dali_arb.loader.decoders.videoframes import ClipFrames, decode_clip

    quick = args.quick
    size, frames, fps, gop = ((640, 360), 96, 24.0, 24) if quick else ((1280, 720), 240, 24.0, 48)
    repeats = 2 if quick else 5
    first = frames * 5 // 8  # a window deep in the clip, not on a keyframe
    wanted = np.arange(first, first + 17, dtype=np.int64)
    geometry = place(size[1], size[0], bucket_h=288, bucket_w=512, u_y=0.5, u_x=0.5, center=True)
    out = {f"{size[0]}x{size[1]} {frames} frames at {fps:g} fps, keyframe every {gop}; 17 frames from {first} "
           "to 512x288, one core, ms per clip": ""}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        clips = _clips(Path(tmp), size=size, frames=frames, fps=fps, gop=gop)
        raw = {}
        for codec, path in clips.items():
            clip = ClipFrames(wanted, fps)
            timings = {}
            start = time.perf_counter()
            for _ in range(repeats):
                served, failure = decode_clip(path, clip, geometry)
                assert served is not None, failure
            timings["pyav_seek"] = (time.perf_counter() - start) / repeats
            start = time.perf_counter()
            for _ in range(repeats):
                _pyav_from_start(path, wanted, geometry)
            timings["pyav_from_start"] = (time.perf_counter() - start) / repeats
            if codec != "h264":
                timings["dali_cpu"] = _dali_cpu([path], wanted, geometry, repeats=repeats)
            raw[codec] = timings
            row = ", ".join(f"{k} {1000 * v:.0f}" for k, v in timings.items())
            ratio = f"seek {timings['pyav_from_start'] / timings['pyav_seek']:.1f}x faster than from start"
            if "dali_cpu" in timings:
                ratio += f", {timings['dali_cpu'] / timings['pyav_seek']:.2f}x DALI CPU's time"
            out[f"  {codec} ({path.stat().st_size // 1024} KiB)"] = f"{row}; {ratio}"
    out["raw"] = raw
    return out
