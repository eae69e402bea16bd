"""The video decoders: a sample is a clip of ``F`` frames (an image is a 1-frame clip), and what comes out of a
decoder's part of the graph is ``uint8 FHWC`` at the bucket size, every frame cut alike (the pipeline then flips
and normalises every frame of a sample alike, ``FCHW``).

=============  ==============================================  ==============================================
decoder        the workers                                     the DALI graph
=============  ==============================================  ==============================================
``pyav``       read the bytes; decode the clip's frames with   nothing: the finished clip goes on (to the
               PyAV (seeking to the keyframe before the first  GPU, if there is one)
               wanted frame), each frame's crop window
               resized to the bucket (Pillow); images: Pillow
``dali_video`` read the bytes; the frame indices and the crop  ``decoders.video(frames=...)`` (NVDEC on the
               window in source pixels                         GPU: H.264, HEVC, VP8, VP9, AV1, MJPEG; on the
                                                               CPU only VP9 and MJPEG), ``resize`` of the
                                                               window to the bucket
=============  ==============================================  ==============================================

``pyav`` is the CPU decoder: measured on one core it serves 17 frames of a 720p clip 1.6-2.8x faster than DALI's
CPU ``decoders.video`` for VP9 and MJPEG (which indexes the whole file first), and it reads H.264/HEVC/AV1, which
DALI's CPU variant refuses (``python -m benchmarks video_decode``; benchmarks/RESULTS.md). ``dali_video`` is the
GPU decoder: it needs whole encoded files in the pipeline, and it does not apply a display rotation.

Imports NumPy and the decoder base; PyAV and Pillow in the workers, DALI only inside :meth:`graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...plan.geometry import Geometry
from ..contracts import Failure, Output
from .base import Decoder
from .pillow import PillowDecoder
from .videoframes import ClipFrames, decode_clip

__all__ = ["DaliVideoDecoder", "PyAVDecoder", "VideoDecoder"]


@dataclass(frozen=True)
class VideoDecoder(Decoder):
    """What every video decoder is: it serves clips (``prepare_clip``) and images as 1-frame clips."""

    video: ClassVar[bool] = True

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """An image as a 1-frame clip: ``{"video": uint8 [1, bh, bw, 3]}`` (Pillow, as the ``pillow`` decoder)."""
        sample, failure = PillowDecoder().prepare(data, geometry, channels=channels)
        if sample is None:
            return None, failure
        return self._clip_outputs(sample["image"][None], geometry, np.zeros(1, np.int64)), Failure.NONE

    def prepare_clip(
        self, data: np.ndarray, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """A clip's outputs from its encoded bytes ``uint8 (n,)``, or ``(None, failure)``. Runs in the workers."""
        raise NotImplementedError

    def _clip_outputs(self, frames: np.ndarray, geometry: Geometry, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def default_workers(self, cores: int) -> int:
        return cores

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return max(1, cores // 4)


@dataclass(frozen=True)
class PyAVDecoder(VideoDecoder):
    """The workers decode each clip with PyAV (FFmpeg) and finish it at the bucket size; images with Pillow."""

    name: ClassVar[str] = "pyav"
    summary: ClassVar[str] = "the workers decode video clips with PyAV (seeking to the nearest keyframe)"
    part_outputs: ClassVar[tuple[Output, ...]] = (Output("video", "UINT8", "FHWC"),)

    def prepare_clip(
        self, data: np.ndarray, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        frames, failure = decode_clip(data, clip, geometry)
        if frames is None:
            return None, failure
        return {"video": frames}, Failure.NONE

    def _clip_outputs(self, frames: np.ndarray, geometry: Geometry, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"video": frames}

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        return {"images": feeds["video"].gpu() if gpu else feeds["video"]}

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        return int(bucket_pixels) * 3 + 64  # per frame: the source's chunks grow to the largest clip


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
    )
    shared_outputs: ClassVar[tuple[Output, ...]] = (Output("size", "FLOAT"),)

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        return None, Failure.UNDECODABLE  # images go to a 1-frame bucket decoded by the workers' decoder

    def prepare_clip(
        self, data: np.ndarray, clip: ClipFrames, geometry: Geometry
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        top, left, bottom, right = geometry.source_window()
        return {
            "encoded": data,
            "frames": np.asarray(clip.indices, np.int32),
            "roi_start": np.array([top, left], np.float32),
            "roi_end": np.array([bottom, right], np.float32),
            "size": np.array([geometry.bucket_h, geometry.bucket_w], np.float32),
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
        return {"images": resized}

    def default_workers(self, cores: int) -> int:
        return max(1, min(4, cores // 4))  # the workers only read bytes

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return 4 if gpu else max(1, cores)

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        return int(encoded_bytes) + 256
