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
                ratio += f"; DALI CPU takes {timings['dali_cpu'] / timings['pyav_seek']:.2f}x as long"
            out[f"  {codec} ({path.stat().st_size // 1024} KiB)"] = f"{row}; {ratio}"
    out["raw"] = raw
    return out


class PeerClips:
    """The peer a user writes: a map-style dataset of planned batches (picklable), each clip decoded in a
    ``DataLoader`` worker with PyAV, seeking to the keyframe before its first frame (``container.seek``), counting
    frames by timestamp, every wanted frame resized to cover the bucket with Pillow (antialiased bilinear) and
    centre-cropped: ``uint8 [B, F, 3, H, W]``."""

    def __init__(self, batches: list[list[tuple[str, list[int], float]]], size: tuple[int, int]) -> None:
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        import torch

        return torch.from_numpy(np.stack([self._clip(*clip) for clip in self.batches[i]]))

    def _clip(self, path: str, wanted: list[int], fps: float) -> np.ndarray:
        import av
        from PIL import Image

        bh, bw = self.size
        out = []
        with av.open(path) as container:
            stream = container.streams.video[0]
            base = stream.time_base
            start = float(stream.start_time * base) if stream.start_time is not None else 0.0
            container.seek(int((start + max(0.0, (wanted[0] - 0.5) / fps)) / base), stream=stream, backward=True)
            for frame in container.decode(stream):
                number = round((float(frame.pts * base) - start) * fps)
                while out.__len__() < len(wanted) and wanted[len(out)] == number:
                    image = frame.to_image()
                    scale = max(bh / image.height, bw / image.width)
                    rw, rh = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
                    top, left = (rh - bh) // 2, (rw - bw) // 2
                    image = image.resize((rw, rh), Image.BILINEAR).crop((left, top, left + bw, top + bh))
                    out.append(np.asarray(image).transpose(2, 0, 1))
                if len(out) == len(wanted) or number >= wanted[-1]:
                    break
        return np.stack(out)


def _time_epoch(batches, *, skip_first: bool = True) -> tuple[float, int, list]:
    """Seconds, frames served and the batches of one pass (``skip_first``: timed after the first batch)."""
    iterator = iter(batches)
    start, frames, kept = time.perf_counter(), 0, []
    if skip_first:
        kept.append(next(iterator))
        start = time.perf_counter()
    for batch in iterator:
        video = batch["video"] if isinstance(batch, dict) else batch
        frames += int(video.shape[0] * video.shape[1])
        kept.append(batch)
    return time.perf_counter() - start, frames, kept


@case("video")
def video(args) -> dict:
    """The CPU loader (``frames=``, ``pyav`` workers) against DataLoader workers decoding the same clips with PyAV,
    resizing and cropping to the same bucket; frames per second side by side, and the PSNR between them."""
    import torch

    from dali_arb import BucketSpec, DALIBucketIterator
    from dali_arb.tools.photos import psnr
    from support.videomanifest import video_manifest

    quick = args.quick
    count, size, frames = (6, (640, 360), 48) if quick else (24, (1280, 720), 96)
    bucket, length, batch, workers = (288, 512), 17, 4, max(1, min(16, _cores()))
    codecs = [("h264", 24.0), ("vp9", 30.0), ("mjpeg", 60.0), ("h264", 30.0)]
    with tempfile.TemporaryDirectory() as tmp:
        clips = [{"codec": c, "fps": f, "frames": frames, "gop": 24} for c, f in (codecs * count)[:count]]
        manifest = video_manifest(Path(tmp), clips, size=size)
        options = {"batch_size": batch, "frames": [length], "device": "cpu", "dtype": "uint8", "crop": "center",
                   "workers": workers, "seed": 0, "images": "exclude", "clip": "chunk",
                   "buckets": BucketSpec(bucket_sizes=[(bucket[1], bucket[0])])}  # fmt: skip
        with DALIBucketIterator(manifest, **options, worker_kind="process") as loader:
            list(loader)  # warm-up epoch: workers started, files in the page cache
            loader.set_epoch(1)
            processes_s, processes_frames, _ = _time_epoch(loader)
        with DALIBucketIterator(manifest, **options) as loader:
            list(loader)
            loader.set_epoch(1)
            ours_s, ours_frames, ours = _time_epoch(loader)
            source = loader._source
            plan = source.planner.epoch(1)
            planned = []
            for step in range(len(plan)):
                planned.append([(manifest.table.column("source")[source.row_of(s)].as_py(),
                                 source.clip_frames(s).indices.tolist(), source.clip_frames(s).fps)
                                for s in plan.rows_at(step).tolist()])  # fmt: skip
        peer = torch.utils.data.DataLoader(PeerClips(planned, bucket), batch_size=None, num_workers=workers,
                                           multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=4)  # fmt: skip
        list(peer)  # warm-up: workers spawned
        peer_s, peer_frames, theirs = _time_epoch(peer)
    worst = min(psnr(a["video"][i, k].numpy().transpose(1, 2, 0), b[i, k].numpy().transpose(1, 2, 0))
                for a, b in zip(ours, theirs) for i in range(b.shape[0]) for k in range(b.shape[1]))  # fmt: skip
    ours_fps, peer_fps = ours_frames / ours_s, peer_frames / peer_s
    head = (f"{count} clips {size[0]}x{size[1]} ({', '.join(sorted({c for c, _ in codecs}))}; 24/30/60 fps) x "
            f"{frames} frames, chunks of {length} to {bucket[1]}x{bucket[0]}, batch {batch}, {workers} workers, "
            f"{_cores()} cores")  # fmt: skip
    return {
        head: "",
        "  dali_arb (pyav, worker threads) frames/s": round(ours_fps, 1),
        "  dali_arb (pyav, worker processes) frames/s": round(processes_frames / processes_s, 1),
        "  DataLoader + PyAV seek + Pillow frames/s": round(peer_fps, 1),
        "  speed-up vs the peer (threads / processes)": (
            f"{ours_fps / peer_fps:.2f}x / {processes_frames / processes_s / peer_fps:.2f}x"
        ),
        "  worst frame PSNR dali_arb vs peer (dB)": round(worst, 1),
        "raw": {
            "ours_s": ours_s,
            "ours_frames": ours_frames,
            "processes_s": processes_s,
            "processes_frames": processes_frames,
            "peer_s": peer_s,
            "peer_frames": peer_frames,
        },
    }


def _cores() -> int:
    from dali_arb.loader.decoders import cpu_count

    return cpu_count()


def _planned(loader, manifest) -> list[list[tuple[str, list[int], float]]]:
    """The loader's current epoch as the peers read it: per step, ``(path, frame indices, fps)`` of each clip."""
    source = loader._source
    plan = source.planner.epoch(loader.epoch)
    sources = manifest.table.column("source")
    out = []
    for step in range(len(plan)):
        clips = [(sources[source.row_of(s)].as_py(), source.clip_frames(s)) for s in plan.rows_at(step).tolist()]
        out.append([(path, clip.indices.tolist(), clip.fps) for path, clip in clips])
    return out


def _torchcodec_cuda(planned, bucket: tuple[int, int]) -> tuple[float, int] | None:
    """Seconds and frames for torchcodec's CUDA decoder on the same clips (``get_frames_at``, then an antialiased
    bilinear resize to cover and a centre crop on the GPU), one clip at a time; None without torchcodec."""
    try:
        import torch
        from torchcodec.decoders import VideoDecoder
    except Exception:
        return None
    bh, bw = bucket
    start, frames = time.perf_counter(), 0
    for batch in planned:
        for path, indices, _ in batch:
            decoded = VideoDecoder(path, device="cuda").get_frames_at(indices).data  # [F, 3, H, W] uint8
            h, w = decoded.shape[-2:]
            scale = max(bh / h, bw / w)
            rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
            resized = torch.nn.functional.interpolate(decoded.float(), size=(rh, rw), mode="bilinear", antialias=True)
            top, left = (rh - bh) // 2, (rw - bw) // 2
            resized[:, :, top : top + bh, left : left + bw].to(torch.uint8)
            frames += len(indices)
    torch.cuda.synchronize()
    return time.perf_counter() - start, frames


@case("video_gpu")
def video_gpu(args) -> dict:
    """On a GPU: the loader with NVDEC (``video_decoder="dali_video"``) against torchcodec's CUDA decoder and the
    CPU peer (DataLoader + PyAV on every core) and the CPU loader, on the same H.264 clips and plan; frames/s."""
    import torch

    from dali_arb import BucketSpec, DALIBucketIterator
    from dali_arb.loader.pipeline import gpu_count
    from support.videomanifest import video_manifest

    count, size, frames = (8, (640, 360), 99) if args.quick else (24, (1920, 1080), 99)
    bucket, length, batch, cores = (480, 848), 33, 4, _cores()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips = [{"codec": "h264", "fps": (24.0, 30.0, 60.0)[i % 3], "frames": frames, "gop": 48} for i in range(count)]
        manifest = video_manifest(Path(tmp), clips, size=size)
        options = {"batch_size": batch, "frames": [length], "dtype": "uint8", "crop": "center", "seed": 0,
                   "images": "exclude", "clip": "chunk", "buckets": BucketSpec(bucket_sizes=[(bucket[1], bucket[0])])}  # fmt: skip
        figures = {}
        runs = [("dali_arb CPU pyav workers", {"device": "cpu", "workers": cores})]
        if gpu_count() > 0:  # without a GPU (a rehearsal on the CPU) the rest still runs
            runs.insert(0, ("dali_arb NVDEC (dali_video)", {"device": "gpu", "video_decoder": "dali_video"}))
        for name, extra in runs:
            with DALIBucketIterator(manifest, **options, **extra) as loader:
                list(loader)
                loader.set_epoch(1)
                seconds, served, _ = _time_epoch(loader, skip_first=False)
                planned = _planned(loader, manifest)
            figures[name] = served / seconds
        peer = torch.utils.data.DataLoader(PeerClips(planned, bucket), batch_size=None, num_workers=cores,
                                           multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=4)  # fmt: skip
        list(peer)
        seconds, served, _ = _time_epoch(peer, skip_first=False)
        figures[f"DataLoader + PyAV, {cores} workers"] = served / seconds
        codec = _torchcodec_cuda(planned, bucket)
        if codec is not None:
            figures["torchcodec CUDA, one clip at a time"] = codec[1] / codec[0]
    out[f"{count} H.264 clips {size[0]}x{size[1]}, chunks of {length} to {bucket[1]}x{bucket[0]}, batch {batch}, "
        f"{cores} cores"] = ""  # fmt: skip
    nvdec = figures.get("dali_arb NVDEC (dali_video)")
    for name, value in figures.items():
        out[f"  {name} frames/s"] = f"{value:.1f}" + (f" (NVDEC {nvdec / value:.2f}x)" if nvdec else " (no GPU)")
    if codec is None:
        out["  torchcodec CUDA"] = "not installed"
    out["raw"] = figures
    return out


_MEMORY_PROBE = r"""
import re, sys, numpy as np
from dali_arb.loader.decoders.videoframes import ClipFrames, clip_bytes, decode_clip
from dali_arb.loader.assembly import place
import av, PIL.Image
path, mode, first, length, fps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
before = status("VmRSS")
with av.open(path) as c:
    s = c.streams.video[0]
    h, w = s.height, s.width
g = place(h, w, bucket_h=480, bucket_w=848, u_y=0.5, u_x=0.5, center=True)
wanted = np.arange(first, first + length, dtype=np.int64)
if mode == "bytes":
    data = np.fromfile(path, np.uint8)
    out, failure = decode_clip(data, ClipFrames(wanted, fps), g)
elif mode == "path":
    out, failure = decode_clip(path, ClipFrames(wanted, fps), g)
elif mode == "remux":  # dali_video's worker: the file's bytes and the clip's packets in a small container
    data = np.fromfile(path, np.uint8)
    cut, failure = clip_bytes(data, ClipFrames(wanted, fps))
    out = cut.data
else:  # the whole clip decoded, as a loader that decodes every frame and picks holds it
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = np.stack(frames)[wanted]
print(status("VmHWM") - before, out.nbytes)
"""


@case("video_memory")
def video_memory(args) -> dict:
    """Peak resident memory a worker adds to decode one clip of a 4K video (``decode_clip`` from bytes and from a
    path; ``dali_video``'s remux of the clip's packets, ``clip_bytes``) against decoding every frame and picking, each
    in a fresh process (Linux ``VmHWM`` reset just before, minus ``VmRSS`` then); then :func:`video_long` (a long
    video read through a file view, local and on S3)."""
    import subprocess
    import sys

    from dali_arb.tools.clips import make_clip

    size, frames, length = ((1920, 1080), 48, 17) if args.quick else ((3840, 2160), 72, 33)
    out = {f"{size[0]}x{size[1]} H.264, {frames} frames, {length} frames from 30 to 848x480, MB": ""}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_clip(Path(tmp) / "big.mp4", codec="h264", fps=24.0, frames=frames, size=size, gop=24)
        out["  encoded file"] = round(path.stat().st_size / 1e6, 1)
        raw, finished = {}, 0
        for mode in ("bytes", "path", "remux", "whole"):
            probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), mode, "30", str(length), "24"],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            peak, served = (int(v) for v in probe.stdout.split())
            finished = served if mode == "bytes" else finished
            if mode == "remux":
                out["  the clip's packets (remux), MB"] = round(served / 1e6, 2)
            raw[mode] = peak
            out[f"  peak RSS added, {mode}"] = round(peak / 1e6, 1)
        out["  the finished clip"] = round(finished / 1e6, 1)
        out["  one decoded source frame (RGB)"] = round(size[0] * size[1] * 3 / 1e6, 1)
    longer = video_long(args)  # a long video, read through a file view: local and S3 (also alone: video_long)
    raw["long"] = longer.pop("raw")
    out.update(longer)
    out["raw"] = raw
    return out


def _dali_cpu_fed(samples: list[tuple[np.ndarray, np.ndarray]], geometry, *, repeats: int) -> float:
    """Seconds per clip for DALI's CPU video decoder (one thread) + resize of the crop window, batch 1, fed
    ``(encoded bytes, frame indices)`` per clip in turn."""
    from nvidia.dali import fn, pipeline_def, types

    top, left, bottom, right = geometry.source_window()

    def feed(info):
        data, frames = samples[info.iteration % len(samples)]
        return data, np.asarray(frames, np.int32)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        encoded, frames = fn.external_source(source=feed, batch=False, num_outputs=2,
                                             dtype=[types.UINT8, types.INT32])  # fmt: skip
        decoded = fn.decoders.video(encoded, device="cpu", frames=frames)
        return fn.resize(decoded, size=[geometry.bucket_h, geometry.bucket_w], roi_start=[top, left],
                         roi_end=[bottom, right], roi_relative=False, antialias=True)  # fmt: skip

    p = pipe()
    p.build()
    p.run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats * len(samples)):
        p.run()
    return (time.perf_counter() - start) / (repeats * len(samples))


@case("video_remux")
def video_remux(args) -> dict:
    """What ``dali_video`` feeds DALI's decoder per clip: the clip's packets remuxed in the worker
    (``clip_bytes``: from the keyframe before the clip's first frame) against the whole file, in bytes and, for the
    codecs DALI's CPU decoder reads, in decode time; and what the remux costs a worker."""
    from dali_arb.loader.assembly import place
    from dali_arb.loader.decoders.videoframes import ClipFrames, clip_bytes

    quick = args.quick
    size, frames, fps, gop = ((640, 360), 96, 24.0, 24) if quick else ((1280, 720), 240, 24.0, 48)
    repeats = 1 if quick else 3
    length = 17
    starts = np.linspace(0, frames - length, 6).astype(np.int64)  # six clips spread over the video
    geometry = place(size[1], size[0], bucket_h=288, bucket_w=512, u_y=0.5, u_x=0.5, center=True)
    out = {f"{size[0]}x{size[1]} {frames} frames at {fps:g} fps, keyframe every {gop}; clips of {length} frames "
           f"from {starts.tolist()} to 512x288, one core": ""}  # fmt: skip
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec, path in _clips(Path(tmp), size=size, frames=frames, fps=fps, gop=gop).items():
            data = np.fromfile(path, np.uint8)
            clips = [ClipFrames(np.arange(s, s + length, dtype=np.int64), fps) for s in starts]
            start = time.perf_counter()
            for _ in range(repeats):
                cuts = [clip_bytes(data, clip)[0] for clip in clips]
            remux = (time.perf_counter() - start) / (repeats * len(clips))
            fed = float(np.mean([len(c.data) for c in cuts]))
            figures = {"file_bytes": len(data), "clip_bytes_mean": fed, "remux_s": remux}
            row = (f"file {len(data) / 2**20:.2f} MiB, clip {fed / 2**20:.3f} MiB ({len(data) / fed:.1f}x fewer "
                   f"bytes), remux {1000 * remux:.1f} ms")  # fmt: skip
            if codec != "h264":  # the CPU decoder refuses H.264
                whole = _dali_cpu_fed([(data, c.indices) for c in clips], geometry, repeats=repeats)
                cut = _dali_cpu_fed([(c.data, clip.indices - c.first) for c, clip in zip(cuts, clips)], geometry,
                                    repeats=repeats)  # fmt: skip
                figures |= {"dali_cpu_whole_s": whole, "dali_cpu_clip_s": cut}
                row += (f"; DALI CPU decode+resize {1000 * whole:.0f} ms fed the file, {1000 * cut:.0f} ms fed the "
                        f"clip ({whole / (cut + remux):.2f}x with the remux)")  # fmt: skip
            raw[codec] = figures
            out[f"  {codec}"] = row
    out["raw"] = raw
    return out


def _grainy_clip(path: Path, *, size: tuple[int, int], frames: int, gop: int, grain: float) -> Path:
    """An H.264 MP4 of ``make_clip``'s pan with Gaussian film grain (``grain``: its standard deviation in 8-bit
    levels): the high bitrate of camera footage (grain does not compress)."""
    import av

    from dali_arb.tools.clips import expected_frame

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"preset": "veryfast", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = gop
        for k in range(frames):
            rgb = expected_frame(k, frames=frames, size=size).astype(np.float32)
            rgb += rng.normal(0.0, grain, rgb.shape).astype(np.float32)
            frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def long_video(
    path: Path, *, size: tuple[int, int], target_bytes: int, gop: int = 24, base_frames: int = 96, grain: float = 0.0
) -> int:
    """Write a long H.264 MP4 at ``path`` (index at the front) of at least ``target_bytes``: ``base_frames`` frames
    encoded once (``make_clip``, a keyframe every ``gop``; with ``grain``, film grain: a high bitrate), their packets
    repeated with shifted timestamps (stream copy: minutes of video in seconds). Returns its frame count."""
    import av

    from dali_arb.tools.clips import make_clip

    if grain:
        base = _grainy_clip(path.with_name("base.mp4"), size=size, frames=base_frames, gop=gop, grain=grain)
    else:
        base = make_clip(path.with_name("base.mp4"), codec="h264", fps=24.0, frames=base_frames, size=size, gop=gop)
    with av.open(str(base)) as source:
        stream = source.streams.video[0]
        packets = [(p.pts, p.dts, p.is_keyframe, bytes(p)) for p in source.demux(stream) if p.size]
        step = max(p[0] for p in packets) - min(p[0] for p in packets) + (packets[1][0] - packets[0][0] or 1)
        repeats = max(1, -(-target_bytes // base.stat().st_size))
        with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
            copy = out.add_stream_from_template(stream)
            for r in range(repeats):
                for pts, dts, key, data in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts = pts + r * step, dts + r * step
                    packet.time_base = stream.time_base
                    packet.is_keyframe = key
                    packet.stream = copy
                    out.mux(packet)
    base.unlink()
    return repeats * base_frames


_LONG_PROBE = r"""
import re, sys, time, numpy as np
from dali_arb.loader.decoders.videoframes import ClipFrames, clip_bytes, decode_clip
from dali_arb.loader.assembly import place
from dali_arb.data.localfiles import UNKNOWN, open_local
from dali_arb.data.storage import IOStats, get_bytes
from dali_arb.data.storage.ranged import RangedObject
import av, PIL.Image, obstore
where, mode, first, length, height, width, size, etag, block, ahead = sys.argv[1:11]
first, length, height, width, size, block, ahead = (int(v) for v in (first, length, height, width, size, block, ahead))
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
g = place(height, width, bucket_h=480, bucket_w=848, u_y=0.5, u_x=0.5, center=True)
clip = ClipFrames(np.arange(first, first + length, dtype=np.int64), 24.0)
stats = IOStats()
if where.startswith("s3://"):  # connect once, so the store's client is not counted
    RangedObject(where, size=size, version=etag, block_bytes=4096).read(1)
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
before = status("VmRSS")
start = time.perf_counter()
if mode.endswith("bytes"):  # before: the whole file in memory (a local read, or the object fetched whole)
    source = get_bytes(where, stats) if where.startswith("s3://") else np.fromfile(where, np.uint8)
    reads, read = (stats.requests, stats.bytes_read) if where.startswith("s3://") else (1, size)
else:  # after: a file view, read in pieces
    source = (RangedObject(where, size=size, version=etag, stats=stats, block_bytes=block, read_ahead_bytes=ahead)
              if where.startswith("s3://") else open_local(where, 0, -1, UNKNOWN))
if mode.startswith("remux"):
    out, failure = clip_bytes(source, clip)
    out = out.data
else:
    out, failure = decode_clip(source, clip, g)
seconds = time.perf_counter() - start
if not mode.endswith("bytes"):
    reads, read = source.requests, source.bytes_read
assert failure.name == "NONE", failure
print(status("VmHWM") - before, reads, read, seconds, out.nbytes)
"""


#: The S3 read policies compared: (label, block bytes, most one GET reads ahead); the last is the default.
POLICIES = [(f"{mib} MiB blocks", mib << 20, mib << 20) for mib in (1, 2, 4, 8)] + [
    ("1 MiB blocks, read-ahead doubling to 8 MiB (default)", 1 << 20, 8 << 20)
]


@case("video_long")
def video_long(args) -> dict:
    """A 33-frame clip from the middle of a long 1080p H.264 video (a few hundred MB, made on the spot; a smooth pan,
    and the same with film grain: a camera's high bitrate): peak RSS a worker adds, requests and bytes read, before
    (the whole file in memory: a local read, or the object fetched whole) and after (a file view: ``pread``, or
    ranged GETs by the policies of :data:`POLICIES` against moto's S3), for ``decode_clip`` (``pyav``) and
    ``clip_bytes`` (``dali_video``'s remux). Each probe in a fresh process."""
    import os
    import subprocess
    import sys

    from support.loopback import moto_bucket

    size, target, length = ((1280, 720), 40 << 20, 17) if args.quick else ((1920, 1080), 300 << 20, 33)
    policies = POLICIES[-2:] if args.quick else POLICIES
    out: dict = {}
    raw: dict = {}

    def probe(where, mode, first, nbytes, etag="", block=0, ahead=0) -> tuple[int, int, int, float]:
        argv = [where, mode, str(first), str(length), str(size[1]), str(size[0]), str(nbytes), etag, str(block),
                str(ahead)]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", _LONG_PROBE, *argv], capture_output=True, text=True, check=True,
                              env=os.environ.copy())  # fmt: skip
        peak, reads, read, seconds, _ = done.stdout.split()
        return int(peak), int(reads), int(read), float(seconds)

    for content, grain in (("pan", 0.0), ("grain", 12.0)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "long.mp4"
            frames = long_video(path, size=size, target_bytes=target, grain=grain)
            nbytes = path.stat().st_size
            first = frames // 2 + 5  # mid-GOP: the clip starts after its keyframe
            rate = nbytes * 8 / (frames / 24) / 1e6
            out[f"{content}: {size[0]}x{size[1]} H.264, {frames} frames ({frames / 24 / 60:.1f} min), "
                f"{nbytes / 1e6:.0f} MB ({rate:.0f} Mbit/s); {length} frames from {first} to 848x480"] = ""  # fmt: skip

            def row(label: str, figures: tuple[int, int, int, float], content=content, nbytes=nbytes) -> None:
                peak, reads, read, seconds = figures
                raw[f"{content}, {label}"] = {"peak_rss": peak, "requests": reads, "bytes_read": read,
                                              "seconds": seconds, "file_bytes": nbytes}  # fmt: skip
                out[f"  {content}, {label}"] = (f"peak RSS +{peak / 1e6:.1f} MB, {reads} reads, {read / 1e6:.2f} MB read "
                                     f"({nbytes / max(read, 1):.0f}x less than the file), {seconds * 1000:.0f} ms")  # fmt: skip

            for mode in ("decode", "remux"):
                row(f"local, {mode}, before (whole file in memory)", probe(str(path), f"{mode}-bytes", first, nbytes))
                row(f"local, {mode}, after (file view)", probe(str(path), f"{mode}-view", first, nbytes))
            with moto_bucket("longvideo"):
                from dali_arb.data.storage import head, upload

                url = "s3://longvideo/long.mp4"
                upload(path, url)
                etag = head(url).etag or ""
                for mode in ("decode", "remux"):
                    row(f"S3, {mode}, before (object fetched whole)", probe(url, f"{mode}-bytes", first, nbytes, etag))
                    for label, block, ahead in policies:
                        row(
                            f"S3, {mode}, after ({label})",
                            probe(url, f"{mode}-view", first, nbytes, etag, block, ahead),
                        )
    out["raw"] = raw
    return out
