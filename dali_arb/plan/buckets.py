"""Bucket resolutions (NovelAI's algorithm, a resolution preset, or an explicit list) and vectorised assignment of
images to buckets.

Sizes are ``(height, width)`` in the arrays of this module; human-facing text writes ``WxH``, and explicit bucket
lists (:meth:`BucketSpec.from_sizes`, like :class:`~dali_arb.plan.batching.BatchSizing`'s table) are written
``(width, height)`` as people write them. This module imports only the standard library, NumPy and ``errors``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["BucketAssignment", "BucketIndex", "BucketSpec", "format_size", "parse_area", "parse_size", "parse_sizes"]

#: Reject codes in :attr:`BucketAssignment.reject_code`: kept, too far in aspect from every bucket, smaller than the
#: smallest bucket with ``no_upscale``, smaller than ``min_size`` / ``min_area``.
REJECT_NONE, REJECT_ASPECT, REJECT_TOO_SMALL, REJECT_MIN_SIZE = 0, 1, 2, 3
#: What each reject code means, in words (reports and rejects lists).
REJECT_REASONS = {
    REJECT_ASPECT: "aspect error: further than max_aspect_error from every bucket",
    REJECT_TOO_SMALL: "too small: smaller than every bucket with no_upscale",
    REJECT_MIN_SIZE: "below min_size: short side under min_size or area under min_area",
}

#: NovelAI's bucket options: what a spec with neither ``resolution`` nor ``bucket_sizes`` starts from.
NOVELAI = {"max_area": 512 * 768, "min_dim": 256, "max_dim": 1024, "step": 64, "base": (512, 512)}
#: The options that decide which buckets exist (``resolution`` and ``bucket_sizes`` decide them too).
_GEOMETRY = ("max_area", "min_dim", "max_dim", "step", "base")
#: Bucket sides a generated spec may try per orientation; more means a step far too small for the range.
_MAX_SIDES = 100_000


def index_dtype(count: int) -> type:
    """The smallest signed integer type that numbers ``count`` buckets and still holds -1 (rejected)."""
    return np.int16 if count < 2**15 else np.int32


def parse_size(text: str, *, what: str = "size") -> tuple[int, int]:
    """Parse ``"WxH"`` (e.g. ``"768x512"``) into ``(height, width)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"{what} must be WIDTHxHEIGHT such as 512x512, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ConfigError(f"{what} must have positive sides, got {text!r}")
    return height, width


def parse_sizes(text: str, *, what: str = "bucket sizes") -> list[tuple[int, int]]:
    """Parse a list of ``WxH`` sizes (``"1024x1024, 896x1152"``; separated by commas, blanks or new lines; ``#``
    starts a comment) into ``(width, height)`` pairs, in the order given."""
    lines = [line.partition("#")[0] for line in str(text).splitlines()]
    tokens = [t for t in re.split(r"[\s,;]+", "\n".join(lines)) if t]
    if not tokens:
        raise ConfigError(f"{what} names no size; give WxH sizes such as 1024x1024, one per line or comma-separated")
    out = []
    for token in tokens:
        height, width = parse_size(token, what=f"{what} entry")
        out.append((width, height))
    return out


def parse_area(value: Any, *, what: str = "max_area") -> int:
    """An area in pixels from an int or from text: ``"393216"``, ``"512*768"`` or ``"1024x1024"``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[*xX×]\s*(\d+)\s*)?", value)
        if match:
            area = int(match.group(1)) * int(match.group(2) or 1)
            if area >= 1:
                return area
    raise ConfigError(
        f"{what} must be a positive number of pixels such as 1048576, 1024*1024 or 1024x1024, got {value!r}"
    )


def format_size(height: int, width: int) -> str:
    """``(height, width)`` as the human-facing ``"WxH"``."""
    return f"{int(width)}x{int(height)}"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _base(value: Any) -> tuple[int, int]:
    """``base`` as ``(height, width)`` from a pair or a ``"WxH"`` string."""
    if isinstance(value, str):
        return parse_size(value, what="base")
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(
        isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1 for v in pair
    ):
        raise ConfigError(f"base must be (height, width) with positive integer sides or 'WxH', got {value!r}")
    return int(pair[0]), int(pair[1])


def _geometry_given(spec: BucketSpec) -> dict[str, Any]:
    """The geometry options given to ``spec`` (not ``None``), type-checked."""
    given: dict[str, Any] = {}
    for name in _GEOMETRY:
        value = getattr(spec, name)
        if value is None:
            continue
        if name == "base":
            given[name] = _base(value)
        elif name == "max_area":
            given[name] = parse_area(value, what="max_area")
        else:
            given[name] = _positive_int(name, value)
    return given


def _preset(resolution: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The geometry of ``BucketSpec(resolution=r)``: see :class:`BucketSpec`."""
    r = _positive_int("resolution", resolution)
    clash = [name for name in ("max_area", "min_dim", "max_dim", "base") if name in given]
    if clash:
        raise ConfigError(
            f"resolution={r} sets max_area, min_dim, max_dim and base itself; give either resolution or "
            f"{', '.join(f'{n}={given[n]!r}' for n in clash)}, not both"
        )
    step = given.get("step", NOVELAI["step"])
    if r % step:
        lower = r // step * step
        raise ConfigError(
            f"resolution ({r}) must be a multiple of step ({step}); use resolution {max(step, lower)} or {lower + step}"
        )
    return {"max_area": r * r, "min_dim": max(step, r // 2 // step * step), "max_dim": 2 * r, "step": step,
            "base": (r, r)}  # fmt: skip


def _size_list(sizes: Any) -> tuple[tuple[int, int], ...]:
    """``bucket_sizes`` as ``(width, height)`` pairs in NovelAI's order (width up, then height down)."""
    if isinstance(sizes, str):
        pairs = parse_sizes(sizes, what="bucket_sizes")
    else:
        if isinstance(sizes, dict) or not isinstance(sizes, Iterable):
            raise ConfigError(
                f"bucket_sizes must be a list of (width, height) pairs or 'WxH' strings, got {sizes!r:.120}"
            )
        pairs = []
        for entry in sizes:
            if isinstance(entry, str):
                height, width = parse_size(entry, what="bucket_sizes entry")
            elif isinstance(entry, dict) and set(entry) == {"width", "height"}:
                height, width = _base((entry["height"], entry["width"]))
            else:
                try:
                    height, width = _base(tuple(entry)[::-1])
                except (ConfigError, TypeError):
                    raise ConfigError(
                        f"bucket_sizes entries must be (width, height) with positive integer sides or 'WxH', "
                        f"got {entry!r:.80}"
                    ) from None
            pairs.append((width, height))
    if not pairs:
        raise ConfigError("bucket_sizes must name at least one bucket, got an empty list")
    twice = sorted({f"{w}x{h}" for w, h in pairs if pairs.count((w, h)) > 1})
    if twice:
        raise ConfigError(f"bucket_sizes names {', '.join(twice)} twice; give each bucket once")
    return tuple(sorted(pairs, key=lambda wh: (wh[0], -wh[1])))


def _explicit(sizes: tuple[tuple[int, int], ...], given: dict[str, Any], resolution: Any) -> dict[str, Any]:
    """The geometry an explicit list implies; the options given must agree with it."""
    if resolution is not None:
        raise ConfigError(f"give either resolution={resolution!r} or bucket_sizes, not both")
    sides = [side for pair in sizes for side in pair]
    square = min(sizes, key=lambda wh: (abs(math.log(wh[0] / wh[1])), -wh[0] * wh[1]))
    derived = {"max_area": max(w * h for w, h in sizes), "min_dim": min(sides), "max_dim": max(sides),
               "step": math.gcd(NOVELAI["step"], *sides), "base": (square[1], square[0])}  # fmt: skip
    clash = [name for name, value in given.items() if value != derived[name]]
    if clash:
        said = ", ".join(f"{n}={given[n]!r} (the list gives {derived[n]!r})" for n in clash)
        raise ConfigError(
            f"bucket_sizes decides the buckets itself; it conflicts with {said}: leave {'it' if len(clash) == 1 else 'them'} out"
        )
    return derived


def _check_generated(spec: BucketSpec) -> None:
    """The generated (NovelAI or preset) geometry can make buckets whose sides are multiples of ``step``."""
    if spec.min_dim > spec.max_dim:
        raise ConfigError(f"min_dim ({spec.min_dim}) must not exceed max_dim ({spec.max_dim})")
    if spec.max_area < spec.min_dim**2:
        raise ConfigError(
            f"max_area ({spec.max_area}) is smaller than min_dim**2 ({spec.min_dim**2}): "
            "no bucket fits; raise --max-area or lower --min-dim"
        )
    if spec.step > spec.min_dim:
        raise ConfigError(f"step ({spec.step}) must not exceed min_dim ({spec.min_dim})")
    if spec.min_dim % spec.step:
        lower = spec.min_dim // spec.step * spec.step
        raise ConfigError(
            f"min_dim ({spec.min_dim}) must be a multiple of step ({spec.step}), or bucket sides are not multiples "
            f"of step; use --min-dim {lower} or {lower + spec.step}"
        )
    if (spec.max_dim - spec.min_dim) // spec.step > _MAX_SIDES:
        raise ConfigError(
            f"step ({spec.step}) is too small for sides {spec.min_dim}..{spec.max_dim}: more than {_MAX_SIDES} "
            "bucket sides to try; raise --step"
        )
    if spec.base[0] % spec.step or spec.base[1] % spec.step:
        near = [max(spec.step, round(v / spec.step) * spec.step) for v in spec.base]
        raise ConfigError(
            f"base {format_size(*spec.base)} must have sides that are multiples of step ({spec.step}); "
            f"use --base {format_size(*near)}"
        )


def _check_filters(spec: BucketSpec) -> None:
    """``no_upscale``, ``max_aspect_error``, ``min_size`` and ``min_area`` (normalised in place)."""
    if not isinstance(spec.no_upscale, (bool, np.bool_)):
        raise ConfigError(f"no_upscale must be True or False, got {spec.no_upscale!r}")
    object.__setattr__(spec, "no_upscale", bool(spec.no_upscale))
    err = spec.max_aspect_error
    if isinstance(err, (bool, np.bool_)) or not isinstance(err, (int, float, np.integer, np.floating)):
        raise ConfigError(f"max_aspect_error must be a positive number (or math.inf), got {err!r}")
    if math.isnan(err) or err <= 0:
        raise ConfigError(f"max_aspect_error must be a positive number, got {err!r}")
    object.__setattr__(spec, "max_aspect_error", float(err))
    if spec.min_size is not None:
        object.__setattr__(spec, "min_size", _positive_int("min_size", spec.min_size))
    if spec.min_area is not None:
        object.__setattr__(spec, "min_area", parse_area(spec.min_area, what="min_area"))


@dataclass(frozen=True, kw_only=True)
class BucketSpec:
    """Which bucket resolutions exist and how images are assigned to them.

    The buckets come from one of three places:

    - **NovelAI's rule** (the default): for every side ``s`` from ``min_dim`` to ``max_dim`` in steps of ``step``,
      the bucket ``s`` x (the largest multiple of ``step`` up to ``max_dim`` with area at most ``max_area``), both
      ways round, plus ``base``. Defaults reproduce NovelAI's nineteen buckets (``max_area`` 512*768, sides
      256..1024 in steps of 64, plus the 512x512 base).
    - **A resolution preset**, ``BucketSpec(resolution=r)``: NovelAI's rule with ``max_area = r*r``, sides from
      ``r/2`` (rounded down to ``step``) to ``2r``, base ``r x r``: NovelAI's sides, 256..1024 around its 512 base,
      scaled to ``r``, and its area made exactly the square's, as SDXL (``r=1024``) and SD 1.5/2 (512, 768)
      were trained. ``resolution=1024`` gives 33 buckets from 512x2048 to 2048x512 (aspect 1:4 to 4:1), every
      side a multiple of 64, every area at most 1024*1024; all 33 are in SDXL's published list of 41 training
      buckets, which also has 8 that are not the largest of their width (1344x704, 1152x832, 1088x896, 1024x960
      and their transposes): pass that list to :meth:`from_sizes` to train on exactly it. ``r`` must be a
      multiple of ``step``; ``step`` may be given (16 for models whose latents are patched by 2 of 8 pixels);
      ``max_area``, ``min_dim``, ``max_dim`` and ``base`` may not.
    - **An explicit list**, :meth:`from_sizes` (``bucket_sizes``): exactly those buckets; ``max_area``,
      ``min_dim``, ``max_dim`` and ``base`` are read off the list (largest area, shortest and longest side, the
      entry nearest square) and ``step`` is the largest of 1, 2, 4, ..., 64 dividing every side (it rounds the
      ``no_upscale`` copies); giving any of them with other values is an error.

    Images go to the bucket nearest in log aspect ratio, whichever the source.

    Args:
        max_area: largest bucket area in pixels (also ``"512*768"`` or ``"1024x1024"``).
        min_dim: smallest bucket side.
        max_dim: largest bucket side.
        step: every bucket side is a multiple of this (64 suits SD/SDXL latents).
        base: the base bucket, ``(height, width)``, always present (a ``"WxH"`` string is accepted).
        resolution: the preset above, an init-only shorthand: the spec stores the options it sets, and
            ``spec.resolution`` reads ``None`` (``dataclasses.replace`` keeps the preset's options).
        bucket_sizes: the explicit list above, ``(width, height)`` pairs or ``"WxH"`` strings; stored as
            ``(width, height)`` pairs, width up then height down.
        no_upscale: never enlarge an image to cover its bucket. An image smaller than its
            nearest-aspect bucket goes to a scaled-down copy of that bucket instead: the copies
            halve the area per level (sides rounded down to ``step``), so there are at most a few
            extra buckets per aspect ratio, not one per distinct image size (kohya's
            ``bucket_no_upscale``). An image smaller than the smallest copy is rejected.
        max_aspect_error: the largest allowed ``|log(w/h) - log(bucket_w/bucket_h)|``. An image
            further than this from every bucket is rejected and counted. 0.5 lets a 4:1 bucket
            take images up to about 6.6:1 (covering then crops up to 39% of the image);
            ``math.inf`` keeps everything.
        min_size: reject images whose short side is under this many pixels (``REJECT_MIN_SIZE``) instead of
            enlarging them to cover their bucket; ``None`` keeps every size.
        min_area: reject images of fewer pixels than this (an int, ``"512*512"`` or ``"512x512"``); with
            ``min_size`` an image must pass both.

    Raises:
        ConfigError: any bad value, naming it (a positional argument or an unknown keyword is Python's TypeError).
    """

    max_area: int = None  # type: ignore[assignment]  # None: from resolution, bucket_sizes or NOVELAI
    min_dim: int = None  # type: ignore[assignment]
    max_dim: int = None  # type: ignore[assignment]
    step: int = None  # type: ignore[assignment]
    base: tuple[int, int] = None  # type: ignore[assignment]
    no_upscale: bool = False
    max_aspect_error: float = 0.5
    min_size: int | None = None
    min_area: int | None = None
    bucket_sizes: tuple[tuple[int, int], ...] | None = None
    resolution: InitVar[int | None] = None
    _sizes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self, resolution: int | None) -> None:
        given = _geometry_given(self)
        if self.bucket_sizes is not None:
            object.__setattr__(self, "bucket_sizes", _size_list(self.bucket_sizes))
            geometry = _explicit(self.bucket_sizes, given, resolution)
        elif resolution is not None:
            geometry = _preset(resolution, given)
        else:
            geometry = {**NOVELAI, **given}
        for name, value in geometry.items():
            object.__setattr__(self, name, value)
        if self.bucket_sizes is None:
            _check_generated(self)
        _check_filters(self)
        object.__setattr__(self, "_sizes", _generate(self))

    @classmethod
    def from_sizes(cls, sizes: Iterable[Any] | str, **options: Any) -> BucketSpec:
        """Exactly the buckets ``sizes``: ``(width, height)`` pairs or ``"WxH"`` strings (or one string of them,
        comma- or line-separated), such as SDXL's published list. ``options``: ``no_upscale``, ``max_aspect_error``,
        ``min_size``, ``min_area``."""
        return cls(bucket_sizes=sizes, **options)

    def to_dict(self) -> dict:
        """The options as JSON-ready data (``base`` as ``{"width", "height"}``); :meth:`from_dict` reads it back.

        ``min_size``, ``min_area`` and ``bucket_sizes`` (as ``"WxH"`` strings) appear only when set, so that a spec
        without them has the same dict (and cache and state) as before they existed."""
        out = {
            "max_area": int(self.max_area),
            "min_dim": int(self.min_dim),
            "max_dim": int(self.max_dim),
            "step": int(self.step),
            "base": {"width": self.base[1], "height": self.base[0]},
            "no_upscale": bool(self.no_upscale),
            "max_aspect_error": float(self.max_aspect_error),
        }
        for name in ("min_size", "min_area"):
            if getattr(self, name) is not None:
                out[name] = int(getattr(self, name))
        if self.bucket_sizes is not None:
            out["bucket_sizes"] = [f"{w}x{h}" for w, h in self.bucket_sizes]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BucketSpec:
        """The spec :meth:`to_dict` described (``base`` may also be ``[height, width]`` or ``"WxH"``; ``resolution``
        may be given instead of the options it sets)."""
        if not isinstance(data, dict):
            raise ConfigError(f"bucket options must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__ if not f.startswith("_")})
        if unknown:
            raise ConfigError(f"unknown bucket option(s) {', '.join(map(str, unknown))}")
        options = dict(data)
        base = options.get("base")
        if isinstance(base, dict):
            options["base"] = (base.get("height"), base.get("width"))
        elif isinstance(base, list):
            options["base"] = tuple(base)
        if options.get("max_aspect_error") in ("inf", "Infinity"):
            options["max_aspect_error"] = math.inf
        return cls(**options)

    @property
    def sizes(self) -> np.ndarray:
        """Bucket resolutions, ``int64 (K, 2)`` as ``(height, width)``, NovelAI's order (width up, height down)."""
        return self._sizes.copy()

    def resolutions(self) -> list[tuple[int, int]]:
        """Bucket resolutions as a list of ``(height, width)``."""
        return [(int(h), int(w)) for h, w in self._sizes]

    def assign(self, heights: np.ndarray, widths: np.ndarray) -> BucketAssignment:
        """Assign every image to a bucket at once.

        Args:
            heights, widths: ``(N,)`` displayed (EXIF-upright) sizes.
        Returns:
            a :class:`BucketAssignment`; rejected images have bucket ``-1``.
        """
        return _assign(self, np.asarray(heights), np.asarray(widths))


def _generate(spec: BucketSpec) -> np.ndarray:
    """The spec's buckets: ``(K, 2)`` int64 ``(height, width)``, width up then height down (NovelAI's rule, or the
    explicit list)."""
    if spec.bucket_sizes is not None:
        return np.array([(h, w) for w, h in spec.bucket_sizes], dtype=np.int64).reshape(-1, 2)
    found: set[tuple[int, int]] = set()
    for swap in (False, True):
        side = spec.min_dim
        while side <= spec.max_dim:
            other = min(spec.max_dim, spec.max_area // side) // spec.step * spec.step
            if other >= spec.min_dim:
                width, height = (other, side) if swap else (side, other)
                found.add((height, width))
            side += spec.step
    found.add(spec.base)
    ordered = sorted(found, key=lambda hw: (hw[1], -hw[0]))  # width up, then height down
    return np.array(ordered, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class BucketAssignment:
    """Result of :meth:`BucketSpec.assign`.

    Attributes:
        sizes: ``int64 (K, 2)`` ``(height, width)`` of every bucket an image may use: the spec's
            buckets first, then (with ``no_upscale``) the scaled-down copies.
        num_base: how many of ``sizes`` are the spec's own buckets.
        bucket: ``int16 (N,)`` bucket index per image (``int32`` beyond 32,767 buckets), ``-1`` for rejected images.
        reject_code: ``int8 (N,)`` ``REJECT_NONE``, ``REJECT_ASPECT``, ``REJECT_TOO_SMALL`` or ``REJECT_MIN_SIZE``
            (:data:`REJECT_REASONS` says each in words).
        log_aspect: ``float64 (N,)`` ``log(width / height)`` of every image.
        heights, widths: ``int64 (N,)`` the sizes that were assigned.
        no_upscale: whether the leftover policy must avoid enlarging images too.
    """

    sizes: np.ndarray
    num_base: int
    bucket: np.ndarray
    reject_code: np.ndarray
    log_aspect: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    no_upscale: bool

    @property
    def num_images(self) -> int:
        return int(self.bucket.shape[0])

    @property
    def bucket_log_aspect(self) -> np.ndarray:
        """``float64 (K,)`` log aspect ratio of each bucket."""
        return np.log(self.sizes[:, 1] / self.sizes[:, 0])

    def counts(self) -> np.ndarray:
        """``int64 (K,)`` images per bucket."""
        kept = self.bucket[self.bucket >= 0]
        return np.bincount(kept, minlength=len(self.sizes)).astype(np.int64)

    def rejected(self, code: int | None = None) -> int:
        """How many images were rejected (for one reason, or any)."""
        if code is None:
            return int(np.count_nonzero(self.reject_code))
        return int(np.count_nonzero(self.reject_code == code))


#: Loaders size their buffers by this percentile of the served images' sides and encoded lengths (the GPU decoder's
#: preallocation, the worker processes' shared-memory chunks): :attr:`BucketIndex.served_p99`.
SERVED_PERCENTILE = 99


def served_p99(heights: np.ndarray, widths: np.ndarray, lengths: np.ndarray) -> dict[str, float | None]:
    """``SERVED_PERCENTILE``-th percentiles of served images' ``height``, ``width`` and known encoded ``length``
    (``lengths`` ``<= 0`` are unknown; ``None`` when none is known), from ``(n,)`` arrays of them."""
    known = lengths[lengths > 0]
    return {
        "height": float(np.percentile(heights, SERVED_PERCENTILE)),
        "width": float(np.percentile(widths, SERVED_PERCENTILE)),
        "length": float(np.percentile(known, SERVED_PERCENTILE)) if known.size else None,
    }


class PlannedIndex:
    """What the :class:`~dali_arb.plan.planner.Planner` reads of an index, derived from its ``sizes`` (``int64 (K, 2)``)
    and ``starts`` (``int64 (K + 1,)``, each bucket's first member position): :class:`BucketIndex` (one manifest)
    and :class:`~dali_arb.plan.mixture.MixedIndex` (several, with repeats) both provide ``member_rows``, ``bucket_of``,
    ``dataset_of``, ``log_aspect``, ``leftover_order`` and ``leftover_candidates``."""

    sizes: np.ndarray
    starts: np.ndarray

    @property
    def num_usable(self) -> int:
        """Samples per epoch before batching (``M``; repeats counted)."""
        return int(self.starts[-1])

    def counts(self) -> np.ndarray:
        """``int64 (K,)`` samples per bucket per epoch."""
        return np.diff(self.starts)

    def epoch_counts(self, epoch: int) -> np.ndarray:
        """``int64 (K,)`` samples per bucket in ``epoch``: :meth:`counts` (fractional repeats vary them per epoch)."""
        return self.counts()

    def bucket_rows(self, k: int, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` rows at ``positions`` (any shape, in ``[0, epoch_counts(epoch)[k])``) of bucket ``k`` in
        ``epoch``."""
        return self.member_rows(self.starts[k] + positions, epoch)

    @property
    def bucket_log_aspect(self) -> np.ndarray:
        """``float64 (K,)`` log aspect ratio of each bucket."""
        return np.log(self.sizes[:, 1] / self.sizes[:, 0])


@dataclass(frozen=True, eq=False)
class BucketIndex(PlannedIndex):
    """Images grouped by bucket: what the planner reads. Built once per manifest and bucket options, and
    memory-mapped from the cache by every process of a node (``data/cache.py``), so that it holds no
    per-row Python object and no private per-row array.

    Attributes:
        sizes: ``int64 (K, 2)`` ``(height, width)`` of every bucket (as :class:`BucketAssignment`).
        num_base: how many of ``sizes`` are the spec's own buckets.
        no_upscale: whether leftover batches must avoid enlarging images too.
        bucket: ``int16 (N,)`` bucket per row (``int32`` beyond 32,767 buckets), ``-1`` for rejected rows.
        members: ``int32 (M,)`` the usable rows grouped by bucket, ascending inside each bucket (``int64``
            from 2**31 rows); bucket ``k`` owns ``members[starts[k]:starts[k + 1]]``.
        starts: ``int64 (K + 1,)``.
        heights, widths: ``(N,)`` displayed sizes (any integer type).
        rejected_aspect, rejected_too_small, rejected_min_size: rows rejected for each reason.
        served_p99: the 99th percentiles of the usable rows' ``height``, ``width`` and known encoded ``length``
            (``None`` where no length is known), when the index comes from a manifest's cache, which computes
            them once per node; ``None`` otherwise (a loader then samples rows).
    """

    sizes: np.ndarray
    num_base: int
    no_upscale: bool
    bucket: np.ndarray
    members: np.ndarray
    starts: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    rejected_aspect: int
    rejected_too_small: int
    served_p99: dict[str, float | None] | None = None
    rejected_min_size: int = 0

    @classmethod
    def of(cls, assignment: BucketAssignment) -> BucketIndex:
        """Group an assignment's rows by bucket (O(N))."""
        bucket = assignment.bucket
        order = np.argsort(bucket, kind="stable")  # radix sort of int16: rows ascending inside each bucket
        usable = order[np.count_nonzero(bucket < 0) :]
        counts = np.bincount(bucket[usable], minlength=len(assignment.sizes)).astype(np.int64)
        return cls(
            sizes=assignment.sizes,
            num_base=assignment.num_base,
            no_upscale=assignment.no_upscale,
            bucket=bucket,
            members=usable.astype(np.int32 if len(bucket) < 2**31 else np.int64),
            starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            heights=assignment.heights,
            widths=assignment.widths,
            rejected_aspect=assignment.rejected(REJECT_ASPECT),
            rejected_too_small=assignment.rejected(REJECT_TOO_SMALL),
            rejected_min_size=assignment.rejected(REJECT_MIN_SIZE),
        )

    @property
    def num_images(self) -> int:
        """Rows, usable or not (``N``)."""
        return int(self.bucket.shape[0])

    def log_aspect(self, rows: np.ndarray) -> np.ndarray:
        """``float64`` ``log(width / height)`` of ``rows`` (same shape), as :attr:`BucketAssignment.log_aspect`."""
        return np.log(self.widths[rows].astype(np.int64) / self.heights[rows].astype(np.int64))

    # -- what the planner reads (shared with mixture.MixedIndex) ---------------------------------------
    def member_rows(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` rows at ``positions`` of :attr:`members` (any shape; the same in every epoch)."""
        return self.members[positions].astype(np.int64)

    def bucket_of(self, rows: np.ndarray) -> np.ndarray:
        """Bucket of each row (same shape)."""
        return self.bucket[rows]

    def dataset_of(self, rows: np.ndarray) -> np.ndarray:
        """Dataset of each row: always 0 (one manifest)."""
        return np.zeros(np.shape(rows), np.int64)

    def leftover_order(self, pool: np.ndarray) -> np.ndarray:
        """Order of leftover ``pool`` rows: by aspect, so that neighbours share a batch."""
        return np.argsort(self.log_aspect(pool), kind="stable")

    def leftover_candidates(self, chunk: np.ndarray) -> np.ndarray:
        """Buckets a batch of leftover rows may take: the spec's own; with ``no_upscale``, only those every image
        of the batch covers (else the smallest by area)."""
        if not self.no_upscale:
            return np.arange(self.num_base)
        h, w = self.heights[chunk].min(), self.widths[chunk].min()
        candidates = np.flatnonzero((self.sizes[:, 0] <= h) & (self.sizes[:, 1] <= w))
        if len(candidates) == 0:
            candidates = np.array([int(np.argmin(self.sizes[:, 0] * self.sizes[:, 1]))])
        return candidates


def _nearest(sorted_log_aspect: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index into ``sorted_log_aspect`` (ascending) of the nearest entry to each value."""
    mids = (sorted_log_aspect[1:] + sorted_log_aspect[:-1]) / 2
    return np.searchsorted(mids, values)


def _assign(spec: BucketSpec, heights: np.ndarray, widths: np.ndarray) -> BucketAssignment:
    if heights.shape != widths.shape or heights.ndim != 1:
        raise ConfigError(
            f"heights and widths must be 1-D arrays of one length, got shapes {heights.shape} and {widths.shape}"
        )
    heights = heights.astype(np.int64, copy=False)
    widths = widths.astype(np.int64, copy=False)
    if heights.size and (heights.min() < 1 or widths.min() < 1):
        bad = int(np.flatnonzero((heights < 1) | (widths < 1))[0])
        raise ConfigError(
            f"image sizes must be positive, got height {heights[bad]} and width {widths[bad]} at row {bad}"
        )
    base_sizes = spec.sizes
    base_log = np.log(base_sizes[:, 1] / base_sizes[:, 0])
    # Nearest bucket by log aspect: sort the buckets by aspect (keeping the larger area where two
    # share an aspect), then one binary search per image. O(N log K), O(N) memory.
    order = np.lexsort((-(base_sizes[:, 0] * base_sizes[:, 1]), base_log))
    keep = np.ones(len(order), bool)
    keep[1:] = base_log[order][1:] != base_log[order][:-1]
    order = order[keep]
    log_aspect = np.log(widths / heights)
    bucket = order[_nearest(base_log[order], log_aspect)].astype(index_dtype(len(base_sizes)))
    below = _below_minimum(spec, heights, widths)  # (N,) bool
    sizes = base_sizes
    if spec.no_upscale:
        bucket, sizes = _no_upscale(spec, bucket, base_sizes, heights, widths, ~below)
    reject = np.zeros(bucket.shape, np.int8)
    if spec.no_upscale:
        reject[bucket < 0] = REJECT_TOO_SMALL
    bucket[below] = -1
    reject[below] = REJECT_MIN_SIZE
    chosen_log = np.log(sizes[:, 1] / sizes[:, 0])[np.maximum(bucket, 0)]
    too_far = (np.abs(log_aspect - chosen_log) > spec.max_aspect_error) & (bucket >= 0)
    reject[too_far] = REJECT_ASPECT
    bucket[too_far] = -1
    return BucketAssignment(
        sizes=sizes,
        num_base=len(base_sizes),
        bucket=bucket,
        reject_code=reject,
        log_aspect=log_aspect,
        heights=heights,
        widths=widths,
        no_upscale=spec.no_upscale,
    )


def _below_minimum(spec: BucketSpec, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """``bool (N,)``: images under ``spec.min_size`` (short side) or ``spec.min_area`` (pixels)."""
    below = np.zeros(heights.shape, bool)
    if spec.min_size is not None:
        below |= np.minimum(heights, widths) < spec.min_size
    if spec.min_area is not None:
        below |= heights * widths < spec.min_area
    return below


def downscale_ladder(spec: BucketSpec, sizes: np.ndarray) -> np.ndarray:
    """Scaled-down copies of each bucket: ``int64 (K, L, 2)``; level ``l`` has ``2**-(l+1)`` of the area.

    Sides are rounded down to ``spec.step``; a side below ``step`` is 0 (that level is unusable).
    """
    levels = []
    level = 1
    while True:
        scale = 2.0 ** (-level / 2)
        scaled = np.floor(sizes * scale / spec.step).astype(np.int64) * spec.step
        if not (scaled >= spec.step).all(axis=1).any():
            break
        scaled[(scaled < spec.step).any(axis=1)] = 0
        levels.append(scaled)
        level += 1
    if not levels:
        return np.zeros((len(sizes), 0, 2), np.int64)
    return np.stack(levels, axis=1)


def _no_upscale(
    spec: BucketSpec,
    bucket: np.ndarray,
    base_sizes: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    eligible: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Move ``eligible`` (``bool (N,)``) images smaller than their bucket to the largest scaled-down copy they
    cover (the others make no copy)."""
    target = base_sizes[bucket]
    small = np.flatnonzero(eligible & ((heights < target[:, 0]) | (widths < target[:, 1])))
    if small.size == 0:
        return bucket, base_sizes
    ladder = downscale_ladder(spec, base_sizes)  # (K, L, 2)
    cand = ladder[bucket[small]]  # (n_small, L, 2)
    fits = (cand[:, :, 0] > 0) & (cand[:, :, 0] <= heights[small, None]) & (cand[:, :, 1] <= widths[small, None])
    has = fits.any(axis=1)
    level = fits.argmax(axis=1)  # first (largest) level that fits
    chosen = cand[np.arange(small.size), level]  # (n_small, 2)
    # Number the copies that are used after the base buckets, deduplicated.
    used, inverse = np.unique(chosen[has], axis=0, return_inverse=True)
    known = {tuple(s): i for i, s in enumerate(base_sizes.tolist())}
    used_index = np.empty(len(used), np.int64)
    for j, s in enumerate(map(tuple, used.tolist())):  # a few dozen at most
        used_index[j] = known.setdefault(s, len(known))
    sizes = np.array(sorted(known, key=known.get), np.int64).reshape(-1, 2)
    bucket = bucket.astype(index_dtype(len(sizes)))
    bucket[small[~has]] = -1
    bucket[small[has]] = used_index[inverse.reshape(-1)]
    return bucket, sizes
