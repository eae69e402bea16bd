"""Decoders: chosen once per loader, each holding its external-source outputs, its part of the DALI
graph and its defaults.

=========  ==========================================  ===========================================
decoder    the worker processes                        the DALI graph
=========  ==========================================  ===========================================
``dali``   read encoded bytes; compute the crop        ``decoders.image`` (nvJPEG / the hardware
           window in source pixels                     JPEG decoder on GPU, libjpeg-turbo on CPU),
                                                       then ``resize`` of the window to the bucket
``pillow`` read, decode (libjpeg-turbo; at a reduced   nothing: the finished crop goes on (to the
``opencv`` DCT scale where ``jpeg_scaling`` allows),   GPU, if there is one)
           resize to the bucket, crop
=========  ==========================================  ===========================================

Both then share ``crop_mirror_normalize`` (flip, scale, NCHW) in ``pipeline.py``. Decoder objects
are small and picklable: they travel to the worker processes inside the source. DALI is imported
only inside :meth:`Decoder.graph`.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..data.imagefacts import displayed_size, header_size, swaps_sides
from ..errors import ConfigError
from ..plan.geometry import Geometry
from .contracts import Failure, Output

__all__ = [
    "DECODERS",
    "JPEG_SCALINGS",
    "QUALITY_MARGIN",
    "DaliDecoder",
    "Decoder",
    "OpenCVDecoder",
    "PillowDecoder",
    "choose_decoder",
    "jpeg_reduction",
    "opencv_flags",
    "reduction_margin",
]

_MIRROR = Output("mirror", "INT32")
#: Gaussian antialiasing before a bilinear shrink by r: sigma = ANTIALIAS_SIGMA * sqrt(r^2 - 1), chosen by
#: PSNR against a full-resolution antialiased reference (0.5-0.7 within 0.4 dB; benchmarks/RESULTS.md).
ANTIALIAS_SIGMA = 0.6
#: ``jpeg_scaling="quality"`` decodes a JPEG at a reduced DCT scale only while the decoded image stays at least
#: this many times the resize on both sides. libjpeg-turbo's reduced decode truncates each 8x8 block's DCT on its
#: own; on detailed photos it lands 29-31 dB from any full-resolution antialiased resize, and a further shrink
#: of 3x or more filters that difference away (worst 36.7 dB against 28.6 at a margin of 1 on 4-12 MP photos;
#: `python -m benchmarks jpeg_scaling`, RESULTS.md).
QUALITY_MARGIN = 3.0
#: the values of ``jpeg_scaling``: ``"quality"`` (the default) or ``"fast"`` (the largest reduction that covers
#: the resize, as the fastest peers decode: about 2.7x less decoding on large photos, 28-30 dB worst).
JPEG_SCALINGS = ("quality", "fast")


def reduction_margin(jpeg_scaling: str) -> float:
    """How many times the resize a reduced JPEG decode must keep on both sides under ``jpeg_scaling``
    (validated: a ConfigError echoing any other value)."""
    if jpeg_scaling not in JPEG_SCALINGS:
        raise ConfigError(f"jpeg_scaling must be 'quality' or 'fast', got {jpeg_scaling!r}")
    return QUALITY_MARGIN if jpeg_scaling == "quality" else 1.0


_META = Output("meta", "INT64")


@dataclass(frozen=True)
class Decoder:
    """What turns a planned sample into pixels at its bucket size (``uint8 HWC``) inside the pipeline.

    A sample has parts: its image, then each of its paired images (``pairs``: ``(name, kind)``, kind
    ``"pair"`` for 3 channels or ``"mask"`` for 1, in the manifest's order). Each part has the outputs
    :attr:`part_outputs` (a pair's named ``NAME.<output>``); :attr:`shared_outputs` are given once per
    sample (the bucket size), ``mirror`` and ``meta`` come last.

    Attributes:
        name: the value of ``decoder=`` that picks it.
        part_outputs: the external-source outputs of one part, unprefixed.
        shared_outputs: outputs given once per sample.
        pairs: ``((name, kind), ...)`` of the manifest the loader serves.
    """

    name: ClassVar[str]
    part_outputs: ClassVar[tuple[Output, ...]]
    shared_outputs: ClassVar[tuple[Output, ...]] = ()
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def outputs(self) -> tuple[Output, ...]:
        """The external source's outputs, in order: the image's, the shared ones, each pair's, mirror, meta."""
        paired = tuple(o._replace(name=f"{name}.{o.name}") for name, _ in self.pairs for o in self.part_outputs)
        return (*self.part_outputs, *self.shared_outputs, *paired, _MIRROR, _META)

    @property
    def parts(self) -> tuple[tuple[str, str, int], ...]:
        """``(output key, output prefix, channels)`` of the image and of each pair."""
        return (("images", "", 3), *((name, f"{name}.", 1 if kind == "mask" else 3) for name, kind in self.pairs))

    def with_pairs(self, pairs: tuple[tuple[str, str], ...]) -> Decoder:
        """This decoder serving a manifest with ``pairs`` (a copy; decoders are values)."""
        import copy

        chosen = copy.copy(self)
        object.__setattr__(chosen, "pairs", tuple((str(n), str(k)) for n, k in pairs))
        return chosen

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """One part's outputs (:attr:`part_outputs`, plus :attr:`shared_outputs` for the image), from its
        encoded bytes ``uint8 (n,)`` and its geometry (a pair's: its own size, the image's crop), or
        ``(None, failure)`` when it cannot be served. Runs in the worker processes."""
        raise NotImplementedError

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        """DALI nodes from the external source's ``feeds`` (by output name) to ``uint8 HWC`` images at
        the bucket size, on the GPU when ``gpu``: ``{"images": node, pair name: node, ...}``."""
        raise NotImplementedError

    def default_workers(self, cores: int) -> int:
        """Worker processes when the user gives none."""
        raise NotImplementedError

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        """DALI threads when the user gives none."""
        raise NotImplementedError

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        """Shared-memory bytes one sample takes between a worker and the pipeline."""
        raise NotImplementedError

    def enter_worker(self) -> None:
        """Called once in each worker process, and for each worker thread, before it serves a batch."""

    def options(self) -> dict[str, Any]:
        """The decoder's settings, for logs and benchmark records."""
        return {"decoder": self.name}


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


@dataclass(frozen=True)
class PillowDecoder(Decoder):
    """The worker processes decode with libjpeg-turbo at a reduced DCT scale (1/8..1) where
    ``jpeg_scaling`` allows it (``"quality"``: while the decoded image stays :data:`QUALITY_MARGIN` times
    the resize; ``"fast"``: the smallest scale that still covers it), EXIF-upright, and resize only the
    crop window (bilinear, antialiased)."""

    name: ClassVar[str] = "pillow"
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


@dataclass(frozen=True)
class OpenCVDecoder(PillowDecoder):
    """The worker processes decode JPEGs with OpenCV (libjpeg-turbo, straight to RGB) at a reduced DCT
    scale (1/2, 1/4, 1/8) where ``jpeg_scaling`` allows it (as :class:`PillowDecoder`), EXIF-upright,
    resize to cover the bucket (area averaging when shrinking 2x or more, else a Gaussian low-pass
    matched to the scale, then bilinear) and crop at the planned corner. Other formats take the Pillow
    path."""

    name: ClassVar[str] = "opencv"

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


def jpeg_reduction(height: int, width: int, cover_h: int, cover_w: int, *, margin: float = 1.0) -> int:
    """The largest JPEG DCT reduction (8, 4, 2; else 1) whose output keeps at least ``margin`` times
    ``(cover_h, cover_w)`` on both sides."""
    return next((f for f in (8, 4, 2) if height // f >= margin * cover_h and width // f >= margin * cover_w), 1)


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


DECODERS: dict[str, type[Decoder]] = {"dali": DaliDecoder, "pillow": PillowDecoder, "opencv": OpenCVDecoder}


def choose_decoder(
    name: str | Decoder, device: str, *, pairs: tuple[tuple[str, str], ...] = (), **settings: Any
) -> Decoder:
    """The decoder for ``name`` (``"auto"``: ``dali`` on GPU, ``opencv`` on CPU, where it is the fastest at
    the same quality: ``benchmarks/RESULTS.md``); a :class:`Decoder` instance is used as it is.

    ``settings`` go to :class:`DaliDecoder` (``hw_decoder_load``, ``preallocate``) or, ``jpeg_scaling``, to
    the worker decoders (with ``"auto"`` on a GPU, where DALI decodes at full resolution, it has nothing to
    do); ``None`` values are ignored, so callers can pass their options through. ``pairs`` are the manifest's paired images.
    """
    if isinstance(name, Decoder):
        for setting in ("hw_decoder_load", "jpeg_scaling"):
            if settings.get(setting) is not None:
                raise ConfigError(f"{setting} is a setting of the decoder by name; give it to the Decoder instance")
        return name.with_pairs(pairs)
    if name not in ("auto", *DECODERS):
        raise ConfigError(f"decoder must be 'auto', 'dali', 'pillow' or 'opencv', got {name!r}")
    explicit = name != "auto"
    if name == "auto":
        name = "dali" if device == "gpu" else "opencv"
    given = {k: v for k, v in settings.items() if v is not None}
    scaling = given.pop("jpeg_scaling", None)
    if scaling is not None:
        reduction_margin(scaling)  # validated whichever decoder it reaches
    if name in ("pillow", "opencv"):
        if given.get("hw_decoder_load") is not None:
            raise ConfigError(f"hw_decoder_load applies to decoder='dali' on the GPU, not to decoder={name!r}")
        return DECODERS[name](pairs=tuple(pairs), jpeg_scaling=scaling or "quality")
    if scaling is not None and explicit:
        raise ConfigError(
            f"jpeg_scaling applies where the workers decode (decoder 'opencv' or 'pillow'); decoder 'dali' always "
            f"decodes at full resolution, so drop jpeg_scaling={scaling!r} or choose another decoder"
        )
    return DaliDecoder(pairs=tuple(pairs), **given)


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
