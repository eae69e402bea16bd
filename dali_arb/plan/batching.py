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


def _table(value: Any) -> tuple[tuple[int, int, int], ...]:
    """``{(width, height): images}`` (or its items) as sorted ``(width, height, images)`` triples."""
    items = value.items() if isinstance(value, dict) else value
    try:
        triples = [(int(w), int(h), b) for (w, h), b in items]
    except (TypeError, ValueError):
        raise ConfigError(
            f"batch_sizes must map (width, height) to images per step, e.g. {{(1024, 1024): 4}}, got {value!r:.120}"
        ) from None
    if not triples:
        raise ConfigError("batch_sizes must name at least one bucket, got an empty table")
    out = []
    for w, h, b in triples:
        if w < 1 or h < 1:
            raise ConfigError(f"batch_sizes has a bucket {w}x{h}; sides must be positive")
        out.append((w, h, _positive(f"batch_sizes[({w}, {h})]", b)))
    if len({(w, h) for w, h, _ in out}) != len(out):
        raise ConfigError(f"batch_sizes names a bucket twice: {value!r:.120}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class BatchSizing:
    """Images per rank and step for each bucket; give exactly one of:

    - ``batch_size``: every bucket the same (the classic batch);
    - ``batch_pixels``: a budget, ``max(1, batch_pixels // (width * height))`` images for a bucket (clips:
      ``batch_pixels // (frames * width * height)``, a clip of ``F`` frames costing ``F`` images), at most
      ``max_batch``, rounded down to a multiple of ``batch_multiple`` where at least one multiple fits;
    - ``batch_sizes``: an explicit table ``{(width, height): images}`` naming every bucket that is served.
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
        width)``; ``frames`` ``int64 (K,)``: each bucket's frame count (clips), which a pixel budget divides by (a
        table is looked up by ``(width, height)`` whatever the frames)."""
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
        table = {(w, h): b for w, h, b in self.batch_sizes}
        missing = [f"{w}x{h}" for h, w in sizes.tolist() if (w, h) not in table]
        if missing:
            raise ConfigError(
                f"batch_sizes has no entry for bucket(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
                " (width x height); add them, or use batch_pixels"
            )
        return np.array([table[(w, h)] for h, w in sizes.tolist()], np.int64)

    def largest(self, sizes: np.ndarray, frames: np.ndarray | None = None) -> int:
        """The largest batch any of ``sizes`` (with ``frames``) gets: what a pipeline is built for."""
        return int(self.per_bucket(sizes, frames).max()) if len(sizes) else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for ``state_dict`` and reports); :meth:`from_dict` reads it back."""
        table = None if self.batch_sizes is None else [list(t) for t in self.batch_sizes]
        return {"batch_size": self.batch_size, "batch_pixels": self.batch_pixels, "batch_sizes": table,
                "max_batch": self.max_batch, "batch_multiple": self.batch_multiple}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSizing:
        table = data.get("batch_sizes")
        return cls(
            batch_size=data.get("batch_size"), batch_pixels=data.get("batch_pixels"),
            batch_sizes=None if table is None else {(w, h): b for w, h, b in table},
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
        return BatchSizing(batch_sizes={(w, h): whole(b) for w, h, b in self.batch_sizes})
