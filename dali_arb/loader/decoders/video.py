"""The video decoders: a sample is a clip of ``F`` frames (an image is a 1-frame clip), and what comes out of a
decoder's part of the graph is ``uint8 FHWC`` at the bucket size, every frame cut alike (the pipeline then flips
and normalises every frame of a sample alike, ``FCHW``).

=============  ==============================================  ==============================================
decoder        the workers                                     the DALI graph
=============  ==============================================  ==============================================
``pyav``       open the file; decode the clip's frames with    nothing: the finished clip goes on (to the
               PyAV (seeking to the keyframe before the first  GPU, if there is one)
               wanted frame), each frame's crop window
               resized to the bucket (Pillow); images: Pillow
``dali_video`` open the file; remux the clip's packets (from  ``decoders.video(frames=...)`` (NVDEC on the
               the keyframe before its first frame) into a     GPU: H.264, HEVC, VP8, VP9, AV1, MJPEG; on the
               small container; the frame indices from that    CPU only VP9 and MJPEG), ``resize`` of the
               keyframe; the crop window in coded pixels and   window to the bucket, ``rotate`` by the video's
               the display rotation                            quarter turns (the decoder serves coded frames)
=============  ==============================================  ==============================================

``pyav`` is the CPU decoder: measured on one core it serves 17 frames of a 720p clip in 1/1.7 (VP9) to 1/3.5 (MJPEG)
of the time DALI's CPU ``decoders.video`` takes (which indexes the whole file first), and it reads H.264/HEVC/AV1,
which DALI's CPU variant refuses (``python -m benchmarks video_decode``; benchmarks/RESULTS.md). ``dali_video`` is
for the GPU (NVDEC): the pipeline carries each clip's packets only (:func:`~.videoframes.clip_bytes`; 4x to 14x fewer
bytes than the file, ``python -m benchmarks video_remux``); whether NVDEC serves coded (unturned) frames as DALI's CPU
decoder does is not checked yet (no GPU run so far). :func:`refuse_large_clips` caps what one clip may hold
(``max_clip_mb``), from the manifest, when the loader is built.

"Open the file": the workers never read a video whole; they hand PyAV a read-only, seekable file over it
(``BatchSource.open_video``: ``pread`` of a local file or tar member, ranged GETs of a few cached blocks of an
object), which holds at most :data:`VIEW_BYTES` of it.

Imports NumPy and the decoder base; PyAV and Pillow in the workers, DALI only inside :meth:`graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...data.storage.ranged import BLOCK_BYTES, CACHED_BLOCKS, MAX_RUN_BYTES
from ...plan.geometry import Geometry
from ..contracts import Failure, Output
from .base import Decoder
from .pillow import PillowDecoder
from .videoframes import READ_BUFFER_BYTES, ClipFrames, Source, clip_bytes, decode_clip

__all__ = [
    "ASSUMED_GOP",
    "VIDEO_AUTO",
    "VIDEO_DECODERS",
    "VIEW_BYTES",
    "DaliVideoDecoder",
    "PyAVDecoder",
    "VideoDecoder",
    "choose_video_decoder",
    "clip_packet_bytes",
    "refuse_large_clips",
    "video_file_bytes",
]

#: What a worker holds of a video's file while it reads a clip from it: the workers never read a video whole, but
#: through a file (:meth:`~dali_arb.loader.source.BatchSource.open_video`) whose reads keep at most this much: a
#: ranged object's blocks (``data.storage.ranged``: 16 x 1 MiB kept, one 8 MiB GET besides) and PyAV's read buffer
#: (a local file keeps less: ``pread``, the page cache is the kernel's).
VIEW_BYTES = CACHED_BLOCKS * BLOCK_BYTES + MAX_RUN_BYTES + READ_BUFFER_BYTES
#: Frames between keyframes assumed where the manifest does not say (FFmpeg's libx264 default, ``keyint=250``): a
#: clip's packets start at the keyframe at or before its first frame.
ASSUMED_GOP = 250


def clip_packet_bytes(encoded: np.ndarray, frames: np.ndarray, video_frames: np.ndarray) -> np.ndarray:
    """``int64 (n,)`` an estimate of a clip's packets (what ``dali_video``'s workers remux and feed the pipeline):
    the file's ``encoded`` bytes in proportion to the clip's ``frames`` and a keyframe interval
    (:data:`ASSUMED_GOP`) before them, of the video's ``video_frames`` (all ``int64 (n,)``; 0 or less: unknown, the
    whole file)."""
    encoded = np.asarray(encoded, np.int64)
    total = np.asarray(video_frames, np.int64)
    share = np.minimum(1.0, (np.asarray(frames, np.float64) + ASSUMED_GOP) / np.maximum(total, 1))
    return np.where(total > 0, np.ceil(encoded * share), encoded).astype(np.int64)


@dataclass(frozen=True)
class VideoDecoder(Decoder):
    """What every video decoder is: it serves clips (``prepare_clip``) and images as 1-frame clips."""

    video: ClassVar[bool] = True
    #: whether it serves images (as 1-frame clips) besides videos
    serves_images: ClassVar[bool] = True
    #: outputs the pipeline hands on as they are, after the pixels: the source frame numbers and the clip's rate
    passed_outputs: ClassVar[tuple[Output, ...]] = (Output("frame_index", "INT64"), Output("fps", "FLOAT"))

    @property
    def outputs(self) -> tuple[Output, ...]:
        """As :attr:`Decoder.outputs`, with :attr:`passed_outputs` after the shared ones (no pairs for video)."""
        return (*self.part_outputs, *self.shared_outputs, *self.passed_outputs, *super().outputs[-2:])

    def prepare_clip(
        self, data: Source, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """A clip's outputs from its video (a read-only seekable file read in pieces, as the workers give it, or its
        encoded bytes ``uint8 (n,)``), or ``(None, failure)``. Runs in the workers."""
        raise NotImplementedError

    def default_workers(self, cores: int) -> int:
        return cores

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return max(1, cores // 4)

    def clip_memory(
        self,
        frames: np.ndarray,
        height: np.ndarray,
        width: np.ndarray,
        bucket_pixels: np.ndarray,
        encoded: np.ndarray,
        video_frames: np.ndarray,
    ) -> np.ndarray:
        """``int64 (n,)`` bytes one clip holds while it is decoded: what a worker holds of its file while reading it
        (at most :data:`VIEW_BYTES`, never the whole file) and its frames as the decoder holds them, for clips of
        ``frames`` frames of videos of ``video_frames`` frames, ``height x width`` (display size), ``encoded`` bytes,
        in buckets of ``bucket_pixels`` (all ``int64 (n,)``). What FFmpeg's or NVDEC's own frame pools add is not
        counted (measured: docs/video-decode.md)."""
        raise NotImplementedError

    @staticmethod
    def file_bytes_held(encoded: np.ndarray) -> np.ndarray:
        """``int64 (n,)`` what a worker holds of files of ``encoded`` bytes while reading a clip: at most
        :data:`VIEW_BYTES`."""
        return np.minimum(np.asarray(encoded, np.int64), VIEW_BYTES)


@dataclass(frozen=True)
class PyAVDecoder(VideoDecoder):
    """The workers decode each clip with PyAV (FFmpeg) and finish it at the bucket size; images with Pillow."""

    name: ClassVar[str] = "pyav"
    summary: ClassVar[str] = "the workers decode video clips with PyAV (seeking to the nearest keyframe)"
    part_outputs: ClassVar[tuple[Output, ...]] = (Output("video", "UINT8", "FHWC"),)

    def prepare_clip(
        self, data: Source, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        frames, failure = decode_clip(data, clip, geometry)
        if frames is None:
            return None, failure
        return {"video": frames}, Failure.NONE

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """An image as a 1-frame clip: ``{"video": uint8 [1, bh, bw, 3]}`` (Pillow, as the ``pillow`` decoder)."""
        sample, failure = PillowDecoder().prepare(data, geometry, channels=channels)
        if sample is None:
            return None, failure
        return {"video": sample["image"][None]}, Failure.NONE

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        return {"images": feeds["video"].gpu() if gpu else feeds["video"]}

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        return int(bucket_pixels) * 3 + 64  # per frame: the source's chunks grow to the largest clip

    def clip_memory(self, frames, height, width, bucket_pixels, encoded, video_frames) -> np.ndarray:
        """The finished clip ``F x bucket pixels x 3`` and one upright RGB source frame ``H x W x 3`` (each frame is
        cut as soon as it is decoded), with what is held of the file (:meth:`file_bytes_held`)."""
        return self.file_bytes_held(encoded) + frames * bucket_pixels * 3 + height * width * 3


@dataclass(frozen=True)
class DaliVideoDecoder(VideoDecoder):
    """DALI decodes: ``fn.decoders.video`` fed each clip's encoded bytes and frame indices (NVDEC on the GPU;
    VP9 and MJPEG only on the CPU), then resizes the crop window of every frame to the bucket."""

    name: ClassVar[str] = "dali_video"
    summary: ClassVar[str] = "DALI decodes video clips (NVDEC on GPU; VP9/MJPEG only on CPU)"
    part_outputs: ClassVar[tuple[Output, ...]] = (
        Output("encoded", "UINT8"),
        Output("frames", "INT32"),
        Output("roi_start", "FLOAT"),
        Output("roi_end", "FLOAT"),
        Output("rotation", "FLOAT"),
    )
    shared_outputs: ClassVar[tuple[Output, ...]] = (Output("size", "FLOAT"),)

    serves_images: ClassVar[bool] = False  # the loader refuses it for a plan with images (images="exclude")

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        return None, Failure.NOT_IMAGE  # never planned: the loader refuses images with this decoder

    def prepare_clip(
        self, data: Source, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """The clip's packets alone (:func:`~.videoframes.clip_bytes`: remuxed from the keyframe at or before its
        first frame), the frame numbers in them, and the crop window and output size in the decoder's (coded,
        unturned) orientation, with the quarter turns that make it upright after the resize."""
        cut, failure = clip_bytes(data, clip)
        if cut is None:
            return None, failure
        top, left, bottom, right = geometry.source_window()
        h, w = geometry.height, geometry.width  # upright
        size = [geometry.bucket_h, geometry.bucket_w]
        turns = cut.rotation // 90 % 4
        # the upright window in the coded frame (upright = np.rot90(coded, turns)): coded is w x h for odd turns
        if turns == 1:
            top, left, bottom, right = left, h - bottom, right, h - top
        elif turns == 2:
            top, left, bottom, right = h - bottom, w - right, h - top, w - left
        elif turns == 3:
            top, left, bottom, right = w - right, top, w - left, bottom
        if turns % 2:
            size.reverse()
        return {
            "encoded": cut.data,
            "frames": np.asarray(np.asarray(clip.indices) - cut.first, np.int32),
            "roi_start": np.array([top, left], np.float32),
            "roi_end": np.array([bottom, right], np.float32),
            "rotation": np.array(turns * 90, np.float32),
            "size": np.array(size, np.float32),
        }, Failure.NONE

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        from nvidia.dali import fn, types

        frames = fn.decoders.video(feeds["encoded"], device="mixed" if gpu else "cpu", frames=feeds["frames"])
        resized = fn.resize(
            frames,
            size=feeds["size"],
            roi_start=feeds["roi_start"],
            roi_end=feeds["roi_end"],
            roi_relative=False,
            antialias=True,
            interp_type=types.INTERP_LINEAR,
        )
        # quarter turns are exact with nearest-neighbour sampling; a turn of 0 is a copy of the bucket-size clip
        upright = fn.rotate(resized, angle=feeds["rotation"], interp_type=types.INTERP_NN, keep_size=False)
        return {"images": upright}

    def default_workers(self, cores: int) -> int:
        return max(1, min(4, cores // 4))  # the workers only read bytes

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return 4 if gpu else max(1, cores)

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        """A clip's packets (``encoded_bytes``: for a plan over clips, the estimate of
        :func:`clip_packet_bytes`, not the file's size) and the container's few bytes."""
        return int(encoded_bytes) + 256

    def clip_memory(self, frames, height, width, bucket_pixels, encoded, video_frames) -> np.ndarray:
        """The clip decoded at the source size before the resize, ``F x H x W x 3`` (on the GPU with NVDEC), with what
        the worker holds of the file (:meth:`file_bytes_held`) and the clip's packets it remuxes
        (:func:`clip_packet_bytes`, an estimate)."""
        return (self.file_bytes_held(encoded) + clip_packet_bytes(encoded, frames, video_frames)
                + frames * height * width * 3)  # fmt: skip


#: The video decoders, by the name ``video_decoder=`` takes (apart from the image decoders: a loader with
#: ``frames=`` decodes every sample, images too, with one of these).
VIDEO_DECODERS: dict[str, type[VideoDecoder]] = {"pyav": PyAVDecoder, "dali_video": DaliVideoDecoder}
#: What ``video_decoder="auto"`` picks on each device. ``pyav`` on both: it serves images beside clips and every
#: codec; ``dali_video`` (NVDEC) is chosen by name for video-only plans on a GPU (no GPU measurement yet).
VIDEO_AUTO: dict[str, str] = {"cpu": "pyav", "gpu": "pyav"}


def choose_video_decoder(name: str | VideoDecoder, device: str) -> VideoDecoder:
    """The video decoder ``name`` (a key of :data:`VIDEO_DECODERS` or ``"auto"``) for ``device``; an instance as
    it is. A ConfigError naming the choices for any other value."""
    if isinstance(name, VideoDecoder):
        return name
    if name == "auto":
        name = VIDEO_AUTO["gpu" if device == "gpu" else "cpu"]
    if name not in VIDEO_DECODERS:
        from ...errors import ConfigError

        raise ConfigError(f"video_decoder must be 'auto', {', '.join(map(repr, VIDEO_DECODERS))}, got {name!r}")
    return VIDEO_DECODERS[name]()


def video_file_bytes(data: Any, rows: np.ndarray) -> np.ndarray:
    """``int64 (n,)`` the encoded bytes of the videos of ``rows`` (``int64 (n,)``) of the loader's ``data``: a row's
    ``length`` (a tar member's own bytes: its ``source_size`` is the whole shard's), else its file's size (a whole
    file has no ``length``); -1 where neither is known."""
    length = data.ints_at("length", rows, -1)
    return np.where(length > 0, length, data.ints_at("source_size", rows, -1))


def refuse_large_clips(decoder: VideoDecoder, planner: Any, data: Any, cap_mb: float | None) -> None:
    """A ConfigError naming the clip that holds the most memory (:meth:`VideoDecoder.clip_memory`) when it is over
    ``cap_mb`` MiB, with what to do; nothing when every clip fits or ``cap_mb`` is None. ``planner`` plans clips
    (:attr:`~dali_arb.plan.planner.Planner.clips`, its index's buckets), ``data`` is the loader's
    :class:`~dali_arb.data.manifest.ManifestSet`. Vectorised over the clips, from the manifest's columns: no file
    is read (a million clips: a fraction of a second)."""
    clips = getattr(planner, "clips", None)
    if cap_mb is None or clips is None or len(clips) == 0:
        return
    index = planner.index
    bucket = np.asarray(index.bucket_of(np.arange(len(clips), dtype=np.int64)), np.int64)
    planned = np.flatnonzero(bucket >= 0)  # the clips of rows the buckets reject are never served
    if len(planned) == 0:
        return
    sizes = np.asarray(index.sizes, np.int64)
    bucket_pixels = sizes[bucket[planned], 0] * sizes[bucket[planned], 1]  # (C,): each clip's own bucket
    rows = np.asarray(clips.row, np.int64)[planned]
    frames = np.asarray(clips.length, np.int64)[planned]
    height, width = data.ints_at("heights", rows, 0), data.ints_at("widths", rows, 0)
    encoded = np.maximum(video_file_bytes(data, rows), 0)
    video_frames = data.ints_at("frames", rows, -1)
    held = decoder.clip_memory(frames, height, width, bucket_pixels, encoded, video_frames)
    worst = int(np.argmax(held))
    cap = float(cap_mb) * 2**20
    if held[worst] <= cap:
        return
    from ...errors import ConfigError

    over = int(np.count_nonzero(held > cap))
    f, h, w = int(frames[worst]), int(height[worst]), int(width[worst])
    source = data.column_at("source", rows[worst : worst + 1])[0] or data.keys_at(rows[worst : worst + 1])[0]
    if decoder.name == "dali_video":
        what = f"{f} frames x {w}x{h} x 3 decoded at the source size before the resize"
        fix = "fewer frames (frames=), videos of a lower resolution, video_decoder='pyav' (it holds the bucket size)"
    else:
        what = f"{f} frames at the bucket size and one {w}x{h} source frame"
        fix = "fewer frames (frames=) or smaller buckets"
    one = slice(worst, worst + 1)
    read = f"{_mib(decoder.file_bytes_held(encoded[one])[0])} of its {_mib(encoded[worst])} file held while read"
    if decoder.name == "dali_video":
        read += f", about {_mib(clip_packet_bytes(encoded[one], frames[one], video_frames[one])[0])} of packets"
    raise ConfigError(
        f"{over} clip(s) would hold more than max_clip_mb={cap_mb:g} MiB each while decoded by "
        f"video_decoder={decoder.name!r}; the largest, of {source}, holds {_mib(held[worst])} ({what}, with "
        f"{read}); use {fix}, or raise max_clip_mb"
    )


def _mib(count: int) -> str:
    mib = float(count) / 2**20
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.2f} MiB"
