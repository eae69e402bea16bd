"""The loader's settings as small frozen objects, each validated once, with ``to_dict()``.

``DALIBucketIterator(datasets, options=LoaderOptions(...))`` is the grouped spelling; the keyword arguments of
earlier versions build the same objects (:meth:`LoaderOptions.from_keywords`), and so does the CLI. Imports the
plan layer, ``data.manifest`` and the loader's registries (decoders, worker kinds); no DALI, no torch.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data.manifest import Manifest
from ..errors import ConfigError
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec
from ..plan.captions import CaptionPolicy
from ..plan.mixture import check_repeats
from ..plan.planner import LeftoverPolicy
from .decoders import JPEG_SCALINGS, Decoder
from .decoders.registry import check_decoder_name
from .workers import check_worker_kind

__all__ = [
    "DTYPES",
    "Augment",
    "Dataset",
    "Decode",
    "LoaderOptions",
    "Remote",
    "Video",
    "Workers",
    "datasets_from",
    "loader_options",
]

DTYPES = ("float16", "bfloat16", "float32", "uint8")
DEVICES = ("auto", "gpu", "cpu")


def _count(name: str, value: Any, *, least: int, what: str = "") -> int:
    """``value`` as an int, or a ConfigError echoing it unless it is an integer (NumPy's too, not a bool) of at
    least ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        kind = "non-negative" if least == 0 else "positive"
        raise ConfigError(f"{name} must be a {kind} integer{what}, got {value!r}")
    return int(value)


def _share(name: str, value: Any, *, what: str = "a share in [0, 1]", top: float = 1.0) -> float:
    """``value`` as a float, or a ConfigError echoing it unless it is a finite number in ``[0, top]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= top:
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _path(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
        raise ConfigError(f"{name} must be a folder path, got {value!r}")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class Augment:
    """How each sample is cut and flipped. ``crop``: ``"random"`` (seeded by seed, epoch, step and sample) or
    ``"center"``; ``flip``: probability of a horizontal flip."""

    crop: str = "random"
    flip: float = 0.0

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise ConfigError(f"crop must be 'random' or 'center', got {self.crop!r}")
        _set(self, "flip", _share("flip", self.flip, what="a probability in [0, 1]"))

    def to_dict(self) -> dict[str, Any]:
        return {"crop": self.crop, "flip": float(self.flip)}


@dataclass(frozen=True)
class Decode:
    """Where and how samples are decoded: ``device`` (``"gpu"``, ``"cpu"``, ``"auto"``; torch's ``"cuda"`` is
    ``"gpu"`` and ``"cuda:N"`` is ``"gpu"`` with ``device_id=N``), ``decoder`` (a name in
    :data:`~dali_arb.loader.decoders.DECODERS`, ``"auto"``, or a :class:`~dali_arb.loader.decoders.Decoder`),
    the output ``dtype`` (a name in :data:`DTYPES`, or ``torch.float16`` and the like, kept as its name),
    ``jpeg_scaling`` and ``hw_decoder_load`` (see the decoders), DALI's ``num_threads`` and the GPU ``device_id``
    (``None``: defaults chosen at start-up)."""

    device: str = "auto"
    decoder: str | Decoder = "auto"
    dtype: str = "float16"
    jpeg_scaling: str | None = None
    hw_decoder_load: float | None = None
    num_threads: int | None = None
    device_id: int | None = None

    def __post_init__(self) -> None:
        _set(self, "dtype", _dtype_name(self.dtype))
        device, device_id = _device_name(self.device, self.device_id)
        _set(self, "device", device)
        _set(self, "device_id", device_id)
        if self.num_threads is not None:
            _set(self, "num_threads", _count("num_threads", self.num_threads, least=1))
        if self.jpeg_scaling is not None and self.jpeg_scaling not in JPEG_SCALINGS:
            raise ConfigError(
                f"jpeg_scaling must be one of {', '.join(map(repr, JPEG_SCALINGS))}, got {self.jpeg_scaling!r}"
            )
        if self.hw_decoder_load is not None:
            _set(self, "hw_decoder_load", _share("hw_decoder_load", self.hw_decoder_load))
        if not isinstance(self.decoder, Decoder):
            check_decoder_name(self.decoder)
        if self.device_id is not None:
            _set(self, "device_id", _count("device_id", self.device_id, least=0))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["decoder"] = self.decoder if isinstance(self.decoder, str) else type(self.decoder).__name__
        return out


def _dtype_name(dtype: Any) -> str:
    """``dtype`` as one of :data:`DTYPES`: a name (``"float16"``), or torch's or NumPy's dtype, read by name
    (``str(torch.float16)`` is ``"torch.float16"``: torch is never imported here)."""
    name = dtype if isinstance(dtype, str) else str(dtype)
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(
            f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r} (torch.float16 and the other three are taken too)"
        )
    return name


def _device_name(device: Any, device_id: Any) -> tuple[str, Any]:
    """``(device, device_id)`` in our words: torch's spelling is taken too, ``"cuda"`` (or ``torch.device("cuda")``)
    is ``"gpu"`` and ``"cuda:N"`` is ``"gpu"`` on GPU ``N`` (a ``device_id`` given beside it must agree)."""
    name = device if isinstance(device, str) else str(device)
    if name in DEVICES:
        return name, device_id
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ConfigError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r} (torch's 'cuda', 'cuda:N' are too)")
    if match.group(1) is None:
        return "gpu", device_id
    index = int(match.group(1))
    if device_id is not None and device_id != index:
        raise ConfigError(f"device {name!r} names GPU {index} but device_id is {device_id!r}; give one of them")
    return "gpu", index


@dataclass(frozen=True)
class Workers:
    """Who runs the external source: ``count`` threads or processes (``kind``; ``None``: the decoder's default
    for this rank's share of the cores, 0: the loader's own thread) and ``prefetch``, batches DALI prepares
    ahead."""

    count: int | None = None
    kind: str = "thread"
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.count is not None:
            _set(self, "count", _count("workers", self.count, least=0))
        check_worker_kind(self.kind)
        _set(self, "prefetch", _count("prefetch", self.prefetch, least=1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Remote:
    """Reading samples from object storage: ``read_ahead`` steps fetched ahead from the plan (``None``: what
    the pipeline and its workers prepare ahead, plus one), a kept ``sample_cache`` folder and its size bound in
    GiB (``sample_cache_gb``)."""

    read_ahead: int | None = None
    sample_cache: str | os.PathLike | None = None
    sample_cache_gb: float = 50.0

    def __post_init__(self) -> None:
        if self.read_ahead is not None:
            _set(self, "read_ahead", _count("read_ahead", self.read_ahead, least=0, what=" (steps)"))
        gb = self.sample_cache_gb
        if isinstance(gb, bool) or not isinstance(gb, numbers.Real) or not math.isfinite(gb) or gb <= 0:
            raise ConfigError(f"sample_cache_gb must be a positive number, got {gb!r}")
        _set(self, "sample_cache_gb", float(gb))
        _path("sample_cache", self.sample_cache)

    def to_dict(self) -> dict[str, Any]:
        cache = None if self.sample_cache is None else os.fspath(self.sample_cache)
        return {"read_ahead": self.read_ahead, "sample_cache": cache, "sample_cache_gb": float(self.sample_cache_gb)}


CLIP_MODES = ("head", "uniform", "slide", "chunk")
#: What one clip may hold by default, MiB (:attr:`Video.max_clip_mb`): 81 frames of 4K decoded at the source size
#: (``dali_video``) are 1,922 MiB; a clip over 4 GiB is a mistake of frames or resolution more often than a wish.
DEFAULT_MAX_CLIP_MB = 4096.0
LAYOUTS = ("BFCHW", "BCFHW")


@dataclass(frozen=True)
class Video:
    """Clips: ``frames`` the frame buckets (ascending frame counts, e.g. ``(1, 17, 33, 49, 81)``; ``None``: no video,
    the loader serves images as always); ``fps`` a target frame rate (``None``: each clip's own); ``clip`` which
    windows of a video are clips (``"head"``, ``"uniform"``, ``"slide"``, ``"chunk"``, musubi-tuner's meanings),
    ``stride`` the step of ``slide`` windows and ``clip_count`` the windows of ``uniform``; ``images``
    (``"include"``: images are 1-frame clips; ``"exclude"``); ``layout`` of ``batch["video"]`` (``"BFCHW"`` or
    ``"BCFHW"``); ``decoder`` (``"auto"``, ``"pyav"``, ``"dali_video"``: :mod:`dali_arb.loader.decoders.video`);
    ``max_clip_mb`` the most memory one clip may hold, MiB: what a worker holds of its file while reading it (never the
    whole file) and its frames as its decoder holds them (:meth:`~dali_arb.loader.decoders.video.VideoDecoder.clip_memory`: ``dali_video`` decodes at the source
    size, ``F x H x W x 3``); a plan with a clip over it is refused when the loader is built (``None``: no cap)."""

    frames: tuple[int, ...] | None = None
    fps: float | None = None
    clip: str = "head"
    stride: int = 1
    clip_count: int = 1
    images: str = "include"
    layout: str = "BFCHW"
    decoder: str = "auto"
    max_clip_mb: float | None = DEFAULT_MAX_CLIP_MB

    def __post_init__(self) -> None:
        cap = self.max_clip_mb
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not math.isfinite(cap) or cap <= 0:
                raise ConfigError(f"max_clip_mb must be a positive number of MiB (e.g. 4096), or None for no cap, got {cap!r}")  # fmt: skip
            _set(self, "max_clip_mb", float(cap))
        if self.frames is not None:
            given = self.frames
            values = (given,) if isinstance(given, numbers.Integral) else tuple(given) if isinstance(given, (list, tuple)) else None  # fmt: skip
            if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in values):
                raise ConfigError(f"frames must be frame counts of at least 1 (e.g. [1, 17, 33]), got {given!r}")
            _set(self, "frames", tuple(sorted({int(v) for v in values})))
        if self.fps is not None:
            if isinstance(self.fps, bool) or not isinstance(self.fps, numbers.Real) or not 0 < self.fps < 1000:
                raise ConfigError(f"fps must be a frame rate above 0 (e.g. 24), or None for each clip's own, got {self.fps!r}")  # fmt: skip
            _set(self, "fps", float(self.fps))
        for name, value, choices in (("clip", self.clip, CLIP_MODES), ("images", self.images, ("include", "exclude")),
                                     ("layout", self.layout, LAYOUTS)):  # fmt: skip
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        _set(self, "stride", _count("stride", self.stride, least=1, what=" (frames)"))
        _set(self, "clip_count", _count("clip_count", self.clip_count, least=1))
        defaults = {f.name: f.default for f in fields(self)}
        if self.frames is None and any(getattr(self, n) != v for n, v in defaults.items() if n != "decoder"):
            raise ConfigError("the video options (fps, clip, stride, clip_count, images, layout, max_clip_mb) need frames=[...], "
                              "the frame buckets; without it the loader serves images only")  # fmt: skip
        from .decoders.video import VIDEO_DECODERS

        if not isinstance(self.decoder, str) or self.decoder not in ("auto", *VIDEO_DECODERS):
            raise ConfigError(f"video_decoder must be 'auto', {', '.join(map(repr, VIDEO_DECODERS))}, got {self.decoder!r}")  # fmt: skip

    @property
    def on(self) -> bool:
        """Whether the loader serves clips."""
        return self.frames is not None

    def spec(self):
        """The plan's :class:`~dali_arb.plan.frames.FrameSpec`, or None without ``frames``."""
        if self.frames is None:
            return None
        from ..plan.frames import FrameSpec

        return FrameSpec(frames=self.frames, fps=self.fps, clip=self.clip, stride=self.stride, count=self.clip_count,
                         images=self.images == "include")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["frames"] = None if self.frames is None else list(self.frames)
        return out


@dataclass(frozen=True)
class Dataset:
    """One dataset of a loader: its ``manifest`` (a path or a :class:`Manifest`), its ``buckets`` (``None``:
    NovelAI's) and ``repeats``, the times each image is served per epoch (a fraction serves that share, another
    subset each epoch; ``None``: once), and its own ``captions`` (``None``: the loader's
    :attr:`LoaderOptions.captions`; kohya's and SimpleTuner's caption options are per subset)."""

    manifest: str | os.PathLike | Manifest
    buckets: BucketSpec | None = None
    repeats: float | None = None
    captions: CaptionPolicy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, (str, os.PathLike, Manifest)) or self.manifest == "":
            raise ConfigError(f"a dataset's manifest must be a path or a Manifest, got {self.manifest!r:.80}")
        if self.buckets is not None and not isinstance(self.buckets, BucketSpec):
            raise ConfigError(f"buckets must be a BucketSpec, got {type(self.buckets).__name__}")
        r = self.repeats
        if r is not None and (isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r < 0):
            raise ConfigError(f"repeats must be a non-negative number (3, 0.5), got {r!r}")
        if self.captions is not None and not isinstance(self.captions, CaptionPolicy):
            raise ConfigError(f"a dataset's captions must be a CaptionPolicy, got {self.captions!r:.80}")

    def to_dict(self) -> dict[str, Any]:
        manifest = self.manifest.path if isinstance(self.manifest, Manifest) else os.fspath(self.manifest)
        return {
            "manifest": None if manifest is None else os.fspath(manifest),
            "buckets": None if self.buckets is None else self.buckets.to_dict(),
            "repeats": self.repeats,
            "captions": None if self.captions is None else self.captions.to_dict(),
        }


@dataclass(frozen=True)
class LoaderOptions:
    """Every setting of a loader but its datasets. ``rank``/``world_size`` ``None`` read ``torch.distributed``
    / torchrun's environment; ``leftover`` and ``sync_ranks`` are the :class:`~dali_arb.plan.planner.Planner`'s;
    ``cache_dir`` is where the node cache of a manifest is kept (default: beside it)."""

    batch_size: int | BatchSizing
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    leftover: LeftoverPolicy | str = LeftoverPolicy.AUTO
    sync_ranks: bool = True
    augment: Augment = field(default_factory=Augment)
    decode: Decode = field(default_factory=Decode)
    workers: Workers = field(default_factory=Workers)
    remote: Remote = field(default_factory=Remote)
    captions: CaptionPolicy = field(default_factory=CaptionPolicy)
    cache_dir: str | os.PathLike | None = None
    video: Video = field(default_factory=Video)

    def __post_init__(self) -> None:
        for name, kind in (("augment", Augment), ("decode", Decode), ("workers", Workers), ("remote", Remote),
                           ("captions", CaptionPolicy), ("video", Video)):  # fmt: skip
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r:.80}")
        if not isinstance(self.batch_size, BatchSizing):
            _set(self, "batch_size", _count("batch_size", self.batch_size, least=1))
        _set(self, "seed", _count("seed", self.seed, least=0))
        for name in ("rank", "world_size"):
            if getattr(self, name) is not None:
                _set(self, name, _count(name, getattr(self, name), least=0 if name == "rank" else 1))
        if not isinstance(self.sync_ranks, bool):
            raise ConfigError(f"sync_ranks must be True or False, got {self.sync_ranks!r}")
        _path("cache_dir", self.cache_dir)
        _set(self, "leftover", LeftoverPolicy.parse(self.leftover))

    @classmethod
    def from_keywords(cls, **keywords: Any) -> LoaderOptions:
        """The options from the flat keyword arguments ``DALIBucketIterator`` has always taken (all but the
        manifest, ``buckets`` and ``repeats``); an unknown keyword is a ConfigError naming it."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPED}
        top: dict[str, Any] = {}
        for key, value in keywords.items():
            if key in _KEYWORD_TO_FIELD:
                group, name = _KEYWORD_TO_FIELD[key]
                groups[group][name] = value
            elif key in _TOP_LEVEL:
                top[key] = value
            else:  # as Python says of any other unknown keyword (a TypeError), with what the loader takes
                raise TypeError(
                    f"DALIBucketIterator() got an unexpected keyword argument {key!r}; it takes "
                    f"{', '.join(sorted([*_KEYWORD_TO_FIELD, *_TOP_LEVEL, 'buckets', 'repeats', 'options']))}"
                )
        sizing = {k: v for k in _SIZING if (v := top.pop(k, None)) is not None}  # None: not given
        if sizing:  # batch sizes by bucket: a pixel budget or a table (the flat batch_size is then not given)
            if "batch_size" in top:
                raise ConfigError(f"give batch_size or {' and '.join(sizing)}, not both")
            top["batch_size"] = BatchSizing(**sizing)
        if "batch_size" not in top:
            raise ConfigError(
                "batch_size is required (samples per batch on this rank), or batch_pixels, or batch_sizes"
            )
        built = {name: kind(**groups[name]) for name, kind in _GROUPED.items()}
        return cls(**top, **built)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        out["leftover"] = self.leftover.value
        out["cache_dir"] = None if self.cache_dir is None else os.fspath(self.cache_dir)
        return out


_GROUPED = {"augment": Augment, "decode": Decode, "workers": Workers, "remote": Remote, "captions": CaptionPolicy,
            "video": Video}  # fmt: skip
#: Earlier versions' flat keywords -> (group, field).
_KEYWORD_TO_FIELD = {
    "crop": ("augment", "crop"), "flip": ("augment", "flip"),
    "device": ("decode", "device"), "decoder": ("decode", "decoder"), "dtype": ("decode", "dtype"),
    "jpeg_scaling": ("decode", "jpeg_scaling"), "hw_decoder_load": ("decode", "hw_decoder_load"),
    "num_threads": ("decode", "num_threads"), "device_id": ("decode", "device_id"),
    "workers": ("workers", "count"), "worker_kind": ("workers", "kind"), "prefetch": ("workers", "prefetch"),
    "read_ahead": ("remote", "read_ahead"), "sample_cache": ("remote", "sample_cache"),
    "sample_cache_gb": ("remote", "sample_cache_gb"),
    "caption_dropout": ("captions", "dropout"), "shuffle_tags": ("captions", "shuffle_tags"),
    "keep_tags": ("captions", "keep_tags"), "tag_separator": ("captions", "separator"),
    "caption_prefix": ("captions", "prefix"), "caption_suffix": ("captions", "suffix"),
    "instance_prompt": ("captions", "instance_prompt"), "tag_dropout": ("captions", "tag_dropout"),
    "keep_tags_separator": ("captions", "keep_separator"),
    "frames": ("video", "frames"), "fps": ("video", "fps"), "clip": ("video", "clip"), "stride": ("video", "stride"),
    "clip_count": ("video", "clip_count"), "images": ("video", "images"), "layout": ("video", "layout"),
    "video_decoder": ("video", "decoder"), "max_clip_mb": ("video", "max_clip_mb"),
}  # fmt: skip
#: Keywords that size batches by bucket (:class:`~dali_arb.plan.batching.BatchSizing`).
_SIZING = ("batch_pixels", "max_batch", "batch_multiple", "batch_sizes")
_TOP_LEVEL = ("batch_size", "seed", "rank", "world_size", "leftover", "sync_ranks", "cache_dir", *_SIZING)


def datasets_from(manifest: Any, buckets: Any = None, repeats: Any = None) -> list[Dataset]:
    """The datasets of the earlier spelling: one manifest or a list, ``buckets`` one spec or one per manifest,
    ``repeats`` one count per manifest; or a list of :class:`Dataset` as it is (then ``buckets`` and ``repeats``
    must be ``None``)."""
    given = list(manifest) if isinstance(manifest, (list, tuple)) else [manifest]
    if not given:
        raise ConfigError("give at least one manifest")
    if any(isinstance(g, Dataset) for g in given):
        if not all(isinstance(g, Dataset) for g in given):
            raise ConfigError("give every dataset as a Dataset, or every one as a manifest, not a mix")
        if buckets is not None or repeats is not None:
            raise ConfigError("give buckets and repeats inside each Dataset, not beside them")
        return given
    if isinstance(buckets, (list, tuple)):
        if len(buckets) != len(given) or not all(isinstance(b, BucketSpec) for b in buckets):
            raise ConfigError(f"buckets must be a BucketSpec or one per manifest ({len(given)}), got {buckets!r}")
        per_dataset = list(buckets)
    elif buckets is not None and not isinstance(buckets, BucketSpec):
        raise ConfigError(f"buckets must be a BucketSpec, got {type(buckets).__name__}")
    else:
        per_dataset = [buckets] * len(given)
    counts = check_repeats(repeats, len(given)) if repeats is not None else (None,) * len(given)
    return [Dataset(m, buckets=b, repeats=r) for m, b, r in zip(given, per_dataset, counts)]


def loader_options(options: LoaderOptions | None, keywords: dict[str, Any]) -> LoaderOptions:
    """``options``, or the options the flat keyword arguments of earlier versions build; not both."""
    if options is None:
        return LoaderOptions.from_keywords(**keywords)
    if not isinstance(options, LoaderOptions):
        raise ConfigError(f"options must be a LoaderOptions, got {type(options).__name__}")
    if keywords:
        raise ConfigError(
            f"give the loader's settings in options= or as keyword arguments, not both (got options and "
            f"{', '.join(sorted(keywords))})"
        )
    return options
