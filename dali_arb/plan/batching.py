"""How many images a bucket's batch holds: one size for every bucket, a pixel budget, or an explicit table.

Standard library and NumPy only. ``BatchSizing.per_bucket(sizes)`` is the one place a bucket's batch size is
decided; the planner, the report and the loader read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["BatchSizing"]


#: The largest count a sizing takes (pixels, images): products with bucket areas stay within int64.
LARGEST = 2**40


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value > LARGEST:
        raise ConfigError(f"{name} must be at most 2**40, got {value!r}")
    return int(value)


#: One entry of a batch-size table: ``(width, height, batch)`` for a bucket of any frame count, or ``(frames, width,
#: height, batch)`` for the bucket of that frame count only.
Entry = tuple[int, ...]


def _key(key: Any) -> tuple[int, ...]:
    """A table key as ``(width, height)`` or ``(frames, width, height)``: a tuple, or text ``"WxH"``/``"FxWxH"``."""
    if isinstance(key, str):
        parts = key.lower().split("x")
        if len(parts) in (2, 3) and all(p.strip().isdigit() for p in parts):
            return tuple(int(p) for p in parts)
        raise ValueError(key)
    values = tuple(key)
    if len(values) not in (2, 3) or any(isinstance(v, bool) or int(v) != v for v in values):
        raise ValueError(key)
    return tuple(int(v) for v in values)


def _table(value: Any) -> tuple[Entry, ...]:
    """``{(width, height): batch}`` and/or ``{(frames, width, height): batch}`` (or their items; keys also as
    ``"WxH"``/``"FxWxH"`` text) as sorted entries (:data:`Entry`): the ``(width, height)`` ones first."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(_key(k), b) for k, b in items]
    except (TypeError, ValueError, OverflowError):  # (OverflowError: an infinite side, int(inf))
        raise ConfigError(
            "batch_sizes must map (width, height), or (frames, width, height) for clips, to samples per step, e.g. "
            f"{{(1024, 1024): 4}} or {{(33, 832, 480): 2}}, got {value!r:.120}"
        ) from None
    if not pairs:
        raise ConfigError("batch_sizes must name at least one bucket, got an empty table")
    out = []
    for key, b in pairs:
        if min(key) < 1:
            raise ConfigError(f"batch_sizes has a bucket {'x'.join(map(str, key))}; frames and sides must be positive")
        out.append((*key, _positive(f"batch_sizes[{key}]", b)))
    if len({e[:-1] for e in out}) != len(out):
        raise ConfigError(f"batch_sizes names a bucket twice: {value!r:.120}")
    return tuple(sorted(out, key=lambda e: (len(e), e)))


@dataclass(frozen=True)
class BatchSizing:
    """Images per rank and step for each bucket; give exactly one of:

    - ``batch_size``: every bucket the same (the classic batch);
    - ``batch_pixels``: a budget, ``max(1, batch_pixels // (width * height))`` images for a bucket (clips:
      ``batch_pixels // (frames * width * height)``, a clip of ``F`` frames costing ``F`` images), at most
      ``max_batch``, rounded down to a multiple of ``batch_multiple`` where at least one multiple fits;
    - ``batch_sizes``: an explicit table ``{(width, height): images}`` naming every bucket that is served; for clips
      also ``{(frames, width, height): clips}``, which takes precedence over the ``(width, height)`` entry for that
      frame count (a table may hold both: a default per size and the frame counts that differ).
    """

    batch_size: int | None = None
    batch_pixels: int | None = None
    batch_sizes: Any = None
    max_batch: int | None = None
    batch_multiple: int = 1

    def __post_init__(self) -> None:
        given = [n for n in ("batch_size", "batch_pixels", "batch_sizes") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of batch_size, batch_pixels and batch_sizes, got "
                + (", ".join(given) if given else "none")
            )
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", _positive("batch_size", self.batch_size))
        if self.batch_pixels is not None:
            object.__setattr__(self, "batch_pixels", _positive("batch_pixels", self.batch_pixels))
        if self.batch_sizes is not None:
            object.__setattr__(self, "batch_sizes", _table(self.batch_sizes))
        if self.max_batch is not None:
            object.__setattr__(self, "max_batch", _positive("max_batch", self.max_batch))
        object.__setattr__(self, "batch_multiple", _positive("batch_multiple", self.batch_multiple))
        if self.batch_pixels is None and (self.max_batch is not None or self.batch_multiple != 1):
            raise ConfigError("max_batch and batch_multiple shape a pixel budget: give them with batch_pixels")

    @classmethod
    def of(cls, value: int | BatchSizing) -> BatchSizing:
        """``value`` as a BatchSizing: an int is ``batch_size``."""
        return value if isinstance(value, BatchSizing) else cls(batch_size=value)

    @property
    def fixed(self) -> int | None:
        """The one batch size of every bucket, or ``None`` when it varies by bucket."""
        return self.batch_size

    def per_bucket(self, sizes: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """``int64 (K,)`` images (or clips) per rank and step for buckets ``sizes`` ``int64 (K, 2)`` ``(height,
        width)``; ``frames`` ``int64 (K,)``: each bucket's frame count (clips), which a pixel budget divides by and
        a table is looked up by (its ``(frames, width, height)`` entry, else its ``(width, height)`` one)."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        per_sample = sizes[:, 0] * sizes[:, 1]
        if frames is not None:
            per_sample = per_sample * np.asarray(frames, np.int64).reshape(-1)
        if self.batch_size is not None:
            return np.full(len(sizes), self.batch_size, np.int64)
        if self.batch_pixels is not None:
            b = np.maximum(1, self.batch_pixels // per_sample)
            if self.max_batch is not None:
                b = np.minimum(b, self.max_batch)
            m = self.batch_multiple
            return np.where(b >= m, b // m * m, b).astype(np.int64)
        plain = {e[:2]: e[2] for e in self.batch_sizes if len(e) == 3}
        framed = {e[:3]: e[3] for e in self.batch_sizes if len(e) == 4}
        counts = [None] * len(sizes) if frames is None else np.asarray(frames, np.int64).reshape(-1).tolist()
        out, missing = [], []
        for (h, w), f in zip(sizes.tolist(), counts):
            b = framed.get((f, w, h)) if f is not None else None
            b = plain.get((w, h)) if b is None else b
            if b is None:
                missing.append(f"{w}x{h}" if f is None else f"{f}x{w}x{h}")
            out.append(b or 0)
        if missing:
            what = "width x height" if frames is None else "frames x width x height"
            raise ConfigError(
                f"batch_sizes has no entry for bucket(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
                f" ({what}); add them, or use batch_pixels"
            )
        return np.array(out, np.int64)

    def largest(self, sizes: np.ndarray, frames: np.ndarray | None = None) -> int:
        """The largest batch any of ``sizes`` (with ``frames``) gets: what a pipeline is built for."""
        return int(self.per_bucket(sizes, frames).max()) if len(sizes) else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for ``state_dict`` and reports); :meth:`from_dict` reads it back."""
        table = None if self.batch_sizes is None else [list(e) for e in self.batch_sizes]  # [w, h, b] / [f, w, h, b]
        return {"batch_size": self.batch_size, "batch_pixels": self.batch_pixels, "batch_sizes": table,
                "max_batch": self.max_batch, "batch_multiple": self.batch_multiple}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSizing:
        table = data.get("batch_sizes")
        return cls(
            batch_size=data.get("batch_size"), batch_pixels=data.get("batch_pixels"),
            batch_sizes=None if table is None else {tuple(e[:-1]): e[-1] for e in table},
            max_batch=data.get("max_batch"), batch_multiple=data.get("batch_multiple", 1),
        )  # fmt: skip

    def scaled(self, factor: float) -> BatchSizing:
        """The same sizing for ``factor`` times as many images per step (elastic resume on another world size
        keeps the global budget: ``factor`` = old ranks / new ranks); a ConfigError when it is not whole."""

        def whole(v: int) -> int:
            out = v * factor
            if not math.isclose(out, round(out)) or round(out) < 1:
                raise ConfigError(f"{v} x {factor} is not a whole positive number of images")
            return round(out)

        if self.batch_size is not None:
            return BatchSizing(batch_size=whole(self.batch_size))
        if self.batch_pixels is not None:
            return BatchSizing(batch_pixels=whole(self.batch_pixels),
                               max_batch=None if self.max_batch is None else whole(self.max_batch),
                               batch_multiple=self.batch_multiple)  # fmt: skip
        return BatchSizing(batch_sizes={e[:-1]: whole(e[-1]) for e in self.batch_sizes})
