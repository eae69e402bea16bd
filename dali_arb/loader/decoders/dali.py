"""The ``dali`` decoder: the workers read encoded bytes and compute the crop window in source pixels; the DALI
graph decodes (``fn.decoders.image``: nvJPEG and the A100/H100 hardware JPEG decoder on GPU, libjpeg-turbo on
CPU) and resizes the window to the bucket. Imports NumPy, ``data.imagefacts`` and the decoder base; DALI only
inside :meth:`DaliDecoder.graph`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...data.imagefacts import header_size
from ...errors import ConfigError
from ...plan.geometry import Geometry
from ..contracts import Failure, Output
from .base import Decoder

__all__ = ["DaliDecoder"]


@dataclass(frozen=True)
class DaliDecoder(Decoder):
    """DALI decodes and resizes: nvJPEG (and the A100/H100 hardware JPEG decoder) on GPU, libjpeg-turbo on CPU.

    Args:
        hw_decoder_load: share of each batch sent to the hardware JPEG decoder (DALI's default 0.65
            when ``None``); only on GPU.
        preallocate: ``(height, width)`` the GPU decoder preallocates for per sample (the hardware
            decoder reserves batch x H x W x 3 at build time); ``None`` preallocates nothing.
    """

    hw_decoder_load: float | None = None
    preallocate: tuple[int, int] | None = None

    name: ClassVar[str] = "dali"
    summary: ClassVar[str] = "DALI decodes and resizes (nvJPEG on GPU, libjpeg-turbo on CPU)"
    settings: ClassVar[tuple[str, ...]] = ("hw_decoder_load", "preallocate")
    ignored_under_auto: ClassVar[tuple[str, ...]] = ("jpeg_scaling",)  # DALI decodes at full resolution
    refusals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("jpeg_scaling", "jpeg_scaling applies where the workers decode (decoder {owners}); decoder 'dali' "
         "always decodes at full resolution, so drop jpeg_scaling={value!r} or choose another decoder"),
    )  # fmt: skip
    part_outputs: ClassVar[tuple[Output, ...]] = (
        Output("encoded", "UINT8"),
        Output("roi_start", "FLOAT"),
        Output("roi_end", "FLOAT"),
    )
    shared_outputs: ClassVar[tuple[Output, ...]] = (Output("size", "FLOAT"),)

    def __post_init__(self) -> None:
        load = self.hw_decoder_load
        if load is not None and (isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 <= load <= 1):
            raise ConfigError(f"hw_decoder_load must be a share in [0, 1], got {load!r}")

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        # the header's size must be the indexed one (a file re-encoded at another size with the same byte
        # length would otherwise get the old crop window and original_size)
        size = header_size(data.tobytes())  # None: Pillow cannot parse it; DALI decides
        if size is not None and size != (geometry.width, geometry.height):
            return None, Failure.RESIZED
        top, left, bottom, right = geometry.source_window()
        return {
            "encoded": data,
            "roi_start": np.array([top, left], np.float32),
            "roi_end": np.array([bottom, right], np.float32),
            "size": np.array([geometry.bucket_h, geometry.bucket_w], np.float32),
        }, Failure.NONE

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        from nvidia.dali import fn, types

        decode_args: dict[str, Any] = {"device": "mixed" if gpu else "cpu"}
        if gpu and self.hw_decoder_load is not None:
            decode_args["hw_decoder_load"] = float(self.hw_decoder_load)
        if gpu and self.preallocate is not None:
            decode_args["preallocate_height_hint"] = int(self.preallocate[0])
            decode_args["preallocate_width_hint"] = int(self.preallocate[1])
        nodes = {}
        for key, prefix, channels in self.parts:
            decoded = fn.decoders.image(
                feeds[f"{prefix}encoded"], output_type=types.GRAY if channels == 1 else types.RGB, **decode_args
            )
            # Resize the crop window (in the part's own pixels, (y, x)) straight to the bucket size: the same
            # pixels as resizing the whole image to cover the bucket and cropping, without the discarded work.
            nodes[key] = fn.resize(
                decoded,
                size=feeds["size"],
                roi_start=feeds[f"{prefix}roi_start"],
                roi_end=feeds[f"{prefix}roi_end"],
                roi_relative=False,
                antialias=True,
                interp_type=types.INTERP_LINEAR,
            )
        return nodes

    def default_workers(self, cores: int) -> int:
        return max(1, min(4, cores // 4))  # the workers only read bytes

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        return 4 if gpu else max(1, cores)

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        return int(encoded_bytes) + 64

    def options(self) -> dict[str, Any]:
        return {"decoder": self.name, "hw_decoder_load": self.hw_decoder_load, "preallocate": self.preallocate,
                "pairs": [name for name, _ in self.pairs]}  # fmt: skip
