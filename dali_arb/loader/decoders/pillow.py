"""The ``pillow`` decoder: the worker processes read, decode (Pillow's libjpeg-turbo, at a reduced DCT scale where
``jpeg_scaling`` allows), resize to the bucket and crop; the DALI graph only moves the finished crop on (to
the GPU, if there is one). Imports NumPy, ``data.imagefacts`` and the decoder base; Pillow when it decodes."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...data.imagefacts import displayed_size, swaps_sides
from ...plan.geometry import Geometry
from ..contracts import Failure, Output
from .base import Decoder, reduction_margin

__all__ = ["PillowDecoder"]


@dataclass(frozen=True)
class PillowDecoder(Decoder):
    """The worker processes decode with libjpeg-turbo at a reduced DCT scale (1/8..1) where
    ``jpeg_scaling`` allows it (``"quality"``: while the decoded image stays :data:`QUALITY_MARGIN` times
    the resize; ``"fast"``: the smallest scale that still covers it), EXIF-upright, and resize only the
    crop window (bilinear, antialiased)."""

    name: ClassVar[str] = "pillow"
    summary: ClassVar[str] = "the workers decode with Pillow at reduced DCT scale"
    settings: ClassVar[tuple[str, ...]] = ("jpeg_scaling",)
    refusals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("hw_decoder_load", "hw_decoder_load applies to decoder='dali' on the GPU, not to decoder={name!r}"),
    )
    part_outputs: ClassVar[tuple[Output, ...]] = (Output("image", "UINT8", "HWC"),)
    jpeg_scaling: str = "quality"

    def __post_init__(self) -> None:
        reduction_margin(self.jpeg_scaling)

    @property
    def margin(self) -> float:
        """How many times the resize a reduced JPEG decode must keep on both sides."""
        return reduction_margin(self.jpeg_scaling)

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        from PIL import Image, ImageOps

        h, w, rh, rw, top, left, bucket_h, bucket_w = geometry
        Image.MAX_IMAGE_PIXELS = None  # the indexer accepted this image under its own --max-pixels
        try:
            with Image.open(io.BytesIO(data.tobytes())) as img:
                if displayed_size(img) != (w, h):
                    return None, Failure.RESIZED
                if img.format == "JPEG":  # draft: the largest DCT reduction keeping at least the requested size
                    need_h, need_w = math.ceil(rh * self.margin), math.ceil(rw * self.margin)
                    img.draft(
                        "L" if channels == 1 else "RGB", (need_h, need_w) if swaps_sides(img) else (need_w, need_h)
                    )
                upright = _eight_bit(ImageOps.exif_transpose(img), "L" if channels == 1 else "RGB")
                y_scale, x_scale = upright.height / rh, upright.width / rw
                box = (left * x_scale, top * y_scale, (left + bucket_w) * x_scale, (top + bucket_h) * y_scale)
                out = np.asarray(upright.resize((bucket_w, bucket_h), Image.BILINEAR, box=box))
                return {"image": out[:, :, None] if out.ndim == 2 else out}, Failure.NONE
        except Exception:  # Pillow raises many kinds on broken files
            return None, Failure.UNDECODABLE

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        nodes = {key: feeds[f"{prefix}image"] for key, prefix, _ in self.parts}
        return {key: node.gpu() for key, node in nodes.items()} if gpu else nodes

    def default_workers(self, cores: int) -> int:
        return cores  # the workers do the decoding

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return max(1, cores // 4)  # DALI only flips and normalises

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        return int(bucket_pixels) * 3 + 64

    def options(self) -> dict[str, Any]:
        return {"decoder": self.name, "jpeg_scaling": self.jpeg_scaling, "pairs": [name for name, _ in self.pairs]}


def _eight_bit(img, mode: str = "RGB"):
    """An 8-bit image in ``mode`` (``"RGB"`` or ``"L"``): 16-bit and 32-bit integer modes are scaled to 8 bits
    (``convert`` would clip them, turning a 16-bit grayscale PNG white), everything else converted by Pillow."""
    from PIL import Image

    if img.mode == mode:
        return img
    if img.mode.startswith("I"):  # I, I;16, I;16B, ...: 16-bit samples (DALI scales them the same way)
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((np.minimum(wide, 65535) * 255 + 32767) // 65535).astype(np.uint8)).convert(mode)
    return img.convert(mode)
