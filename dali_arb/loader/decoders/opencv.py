"""The ``opencv`` decoder: as ``pillow`` (the workers decode, resize and crop), with OpenCV's libjpeg-turbo for
JPEGs (straight to RGB, at a reduced DCT scale where ``jpeg_scaling`` allows). Imports NumPy, the decoder
base, the ``pillow`` decoder it extends, ``contracts`` and ``plan.geometry``; OpenCV when it decodes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...plan.geometry import Geometry
from ..contracts import Failure
from .base import jpeg_reduction
from .pillow import PillowDecoder

__all__ = ["ANTIALIAS_SIGMA", "OpenCVDecoder", "opencv_flags", "opencv_gray_flags"]

#: Gaussian antialiasing before a bilinear shrink by r: sigma = ANTIALIAS_SIGMA * sqrt(r^2 - 1), chosen by
#: PSNR against a full-resolution antialiased reference (0.5-0.7 within 0.4 dB; benchmarks/RESULTS.md).
ANTIALIAS_SIGMA = 0.6


@dataclass(frozen=True)
class OpenCVDecoder(PillowDecoder):
    """The worker processes decode JPEGs with OpenCV (libjpeg-turbo, straight to RGB) at a reduced DCT
    scale (1/2, 1/4, 1/8) where ``jpeg_scaling`` allows it (as :class:`PillowDecoder`), EXIF-upright,
    resize to cover the bucket (area averaging when shrinking 2x or more, else a Gaussian low-pass
    matched to the scale, then bilinear) and crop at the planned corner. Other formats take the Pillow
    path."""

    name: ClassVar[str] = "opencv"
    summary: ClassVar[str] = "the workers decode with OpenCV at reduced DCT scale"

    def enter_worker(self) -> None:
        # one OpenCV thread per worker (as DataLoader does for torch), or 16 workers on 16 cores would start 16
        # thread pools of 16 threads each; with worker threads this is OpenCV's setting for the whole process
        import cv2

        cv2.setNumThreads(1)

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        if data[:3].tobytes() != b"\xff\xd8\xff":
            return super().prepare(data, geometry, channels=channels)
        import cv2

        h, w, rh, rw, top, left, bucket_h, bucket_w = geometry
        factor = jpeg_reduction(h, w, rh, rw, margin=self.margin)
        if channels == 1:
            flags, decodes_rgb = opencv_gray_flags(), True
        else:
            flags, decodes_rgb = opencv_flags(rgb=True)
        image = cv2.imdecode(data, flags[factor])  # RGB (or gray), EXIF-upright, sides ceil(side / factor)
        if image is None:
            return None, Failure.UNDECODABLE
        if image.shape[0] != -(-h // factor) or image.shape[1] != -(-w // factor):
            return None, Failure.RESIZED
        # resize the decoded image to cover the bucket, then crop at the planned corner: exactly aligned with
        # the geometry. A shrink by 2x or more is area-averaged (cheaper than a wide Gaussian at full
        # resolution, as good: RESULTS.md); a smaller shrink by r is antialiased by a Gaussian low-pass of
        # sigma 0.6 * sqrt(r^2 - 1) before bilinear: as close to the reference as INTER_AREA, at under half its cost
        sy, sx = image.shape[0] / rh, image.shape[1] / rw
        if min(sy, sx) >= 2:
            resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
        else:
            sigma_y, sigma_x = (ANTIALIAS_SIGMA * math.sqrt(max(r * r - 1, 0.0)) for r in (sy, sx))
            if max(sigma_y, sigma_x) > 0.05:
                image = cv2.GaussianBlur(image, (0, 0), sigmaX=max(sigma_x, 0.01), sigmaY=max(sigma_y, 0.01))
            resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR)
        out = np.ascontiguousarray(resized[top : top + bucket_h, left : left + bucket_w])
        if channels == 1:
            return {"image": out[:, :, None]}, Failure.NONE
        return {"image": out if decodes_rgb else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)}, Failure.NONE


@functools.cache
def opencv_flags(*, rgb: bool) -> tuple[dict[int, int], bool]:
    """``cv2.imdecode`` flags per JPEG reduction (1, 2, 4, 8) and whether they decode to RGB: with ``rgb``,
    libjpeg-turbo writes RGB directly where OpenCV can (4.10+: ``IMREAD_COLOR_RGB``), else BGR."""
    import cv2

    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if not rgb or rgb_flag is None:
        return reduced, False
    return {f: (flag & ~cv2.IMREAD_COLOR) | rgb_flag for f, flag in reduced.items()}, True


@functools.cache
def opencv_gray_flags() -> dict[int, int]:
    """``cv2.imdecode`` flags per JPEG reduction (1, 2, 4, 8) for one-channel output (masks), EXIF-upright."""
    import cv2

    return {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # fmt: skip
