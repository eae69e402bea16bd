"""Several datasets in one loader: each with its own bucket options and a repeat count, planned as one.

Rows of dataset ``d`` are numbered ``offsets[d] + row`` (its *global* rows). Buckets of equal size are
shared by the datasets that have them, so a 512x768 batch may mix both; leftovers pool within each group
of datasets with the same bucket options first (a 512-class set never lends a batch to a 1024-class bucket
unless both groups' last images must share one batch).

``repeats[d]`` serves dataset ``d``'s images that many times per epoch: the whole part ``floor(r)`` as
copies, the fraction ``f`` as a window of each of its buckets (``n`` images) that moves along a fixed shuffle
of the bucket, epoch after epoch. Epoch ``e``'s window is positions ``[floor(f n e + phi), floor(f n (e + 1) +
phi))`` of that shuffle (mod ``n``; ``phi`` a seeded phase per bucket): ``floor(f n)`` or ``ceil(f n)`` images,
``f n`` on average, so a bucket of 3 at 0.5 serves 1 or 2 images (1.5 per epoch) and a bucket of 1 at 0.2 one
image every fifth epoch; the windows tile the shuffle, so every image is served ``f`` times per epoch over the
epochs, within one. Nothing per row is materialised: a bucket's members are segments (one per dataset and part)
evaluated at any position, so the planner still costs O(K x G) per epoch and O(B) per step.

Positions: :attr:`MixedIndex.starts` and :meth:`MixedIndex.member_rows` use a layout that is the same in every
epoch, with room for the largest window (``ceil(f n)``); the planner reads each epoch's own layout through
:meth:`MixedIndex.epoch_counts` and :meth:`MixedIndex.bucket_rows`. A position past an epoch's window (a
stand-in drawn from the fixed layout) is the next image along the bucket's shuffle.

Imports only the standard library, NumPy, ``errors`` and ``plan`` (buckets, permute, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .buckets import BucketIndex, BucketSpec, PlannedIndex
from .permute import Permutation, moving_round, round_keys
from .rows import GlobalRows

__all__ = ["MixedIndex", "check_repeats"]

#: Separates the fraction windows' shuffles from every other keyed draw.
FRACTION_STREAM = 0xF4AC


def check_repeats(repeats, count: int) -> tuple[float, ...]:
    """``repeats`` as a tuple of ``count`` non-negative numbers (``None``: all 1); a ConfigError echoing it."""
    if repeats is None:
        return (1.0,) * count
    if isinstance(repeats, (int, float)) and not isinstance(repeats, bool):
        repeats = [repeats] * count
    values = list(repeats) if isinstance(repeats, (list, tuple)) else None
    if values is None or len(values) != count:
        raise ConfigError(f"repeats must give one number per dataset ({count}), got {repeats!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"repeats must be non-negative numbers (3, 0.5), got {repeats!r}")
    if not any(values):
        raise ConfigError(f"repeats must serve at least one dataset, got {repeats!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class _Segments:
    """The parts of every bucket's virtual member list, ``S`` segments in bucket order.

    ``start``: ``int64 (S,)`` first position in the fixed layout; ``bucket``: global bucket; ``dataset``;
    ``local_bucket``; ``local_start``: where the dataset's bucket begins in its ``members``; ``size``: images of
    that dataset's bucket; ``fraction``: ``bool (S,)`` whether the segment is a moving window (else whole copies);
    ``window``: its length in the fixed layout (the most an epoch serves); ``rate``: ``float64 (S,)`` images a
    window serves per epoch on average; ``phase``: ``float64 (S,)`` its seeded rounding phase in ``[0, 1)``."""

    start: np.ndarray
    bucket: np.ndarray
    dataset: np.ndarray
    local_bucket: np.ndarray
    local_start: np.ndarray
    size: np.ndarray
    fraction: np.ndarray
    window: np.ndarray
    rate: np.ndarray
    phase: np.ndarray

    def lengths(self, epoch: int) -> np.ndarray:
        """``int64 (S,)`` images each segment serves in ``epoch``."""
        return np.where(self.fraction, moving_round(self.rate, self.phase, epoch), self.window)

    def window_start(self, i: int, epoch: int) -> int:
        """Where fraction segment ``i``'s window of ``epoch`` begins along its bucket's shuffle."""
        return int(np.floor(self.rate[i] * epoch + self.phase[i])) % int(self.size[i])


def _bucket_keys(index: BucketIndex) -> list[tuple[int, ...]]:
    """Each bucket of ``index`` as ``(height, width)``, or ``(height, width, frames)`` for a clip index."""
    sizes = [tuple(s) for s in np.asarray(index.sizes, np.int64).tolist()]
    frames = getattr(index, "frames", None)
    return sizes if frames is None else [(*s, int(f)) for s, f in zip(sizes, np.asarray(frames).tolist())]


class MixedIndex(PlannedIndex):
    """Several :class:`BucketIndex` objects (one per dataset, each from its own :class:`BucketSpec`) with repeat
    counts, as the one index the :class:`~dali_arb.plan.planner.Planner` plans from. Rows are global rows.

    Attributes:
        sizes: ``int64 (K, 2)`` every bucket of every dataset, once each: the specs' own first, then scaled-down
            copies (``no_upscale``).
        num_base: how many of ``sizes`` are a spec's own buckets.
        starts: ``int64 (K + 1,)`` virtual member positions of each bucket in the fixed layout (repeats counted,
            room for the largest fraction windows; :meth:`epoch_counts` gives an epoch's own).
        rows: the datasets' global rows (:class:`~dali_arb.plan.rows.GlobalRows`).
        offsets: ``int64 (D + 1,)`` first global row of each dataset (``rows.offsets``).
        groups: ``int64 (D,)`` datasets with equal bucket options share a group.
        to_global: per dataset, ``int64 (K_d,)`` the global bucket of each of its buckets.
    """

    def __init__(
        self, indexes: list[BucketIndex], repeats: tuple[float, ...], specs: list[BucketSpec], *, seed: int
    ) -> None:
        if not indexes or len(indexes) != len(repeats) or len(specs) != len(indexes):
            raise ConfigError("give one bucket index, repeat count and bucket spec per dataset")
        self.indexes, self.repeats, self.seed = list(indexes), tuple(repeats), int(seed)
        self.rows = GlobalRows([ix.num_images for ix in indexes])
        self.offsets = self.rows.offsets
        options = [repr(sorted(s.to_dict().items())) for s in specs]
        self.groups = np.array([options.index(o) for o in options], np.int64)
        # the union of the buckets: every spec's own ones first (leftover batches may take those), then copies; clip
        # indexes' buckets are (height, width, frames)
        keys = [_bucket_keys(ix) for ix in indexes]
        if len({len(k[0]) for k in keys if k}) > 1:
            raise ConfigError("datasets planned together must all be images or all be clips (give frames to all)")
        ordered: dict[tuple[int, ...], None] = {}
        for index, own in zip(indexes, keys):
            ordered.update(dict.fromkeys(own[: index.num_base]))
        self.num_base = len(ordered)
        for index, own in zip(indexes, keys):
            ordered.update(dict.fromkeys(own[index.num_base :]))
        table = np.array(list(ordered), np.int64).reshape(len(ordered), -1)
        self.sizes = table[:, :2].copy()
        #: ``int64 (K,)`` frames of each bucket when the datasets are clips (ClipIndex), else None
        self.frames = table[:, 2].copy() if table.shape[1] == 3 else None
        where = {size: k for k, size in enumerate(ordered)}
        self.to_global = [np.array([where[key] for key in own], np.int64) for own in keys]
        self.no_upscale = any(ix.no_upscale for ix in indexes)
        self._group_base = {}  # group -> its spec's own buckets, as global ids
        for d, index in enumerate(indexes):
            self._group_base.setdefault(int(self.groups[d]), self.to_global[d][: index.num_base])
        self._group_no_upscale = {int(self.groups[d]): ix.no_upscale for d, ix in enumerate(indexes)}
        self._segments = self._build_segments()
        self._shuffles: dict[tuple[int, int], Permutation] = {}
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _build_segments(self) -> _Segments:
        # (bucket, d, k, local start, n, fraction, length in the fixed layout, rate)
        rows: list[tuple[int, int, int, int, int, bool, int, float]] = []
        for d, (index, repeat) in enumerate(zip(self.indexes, self.repeats)):
            whole, part = math.floor(repeat), repeat - math.floor(repeat)
            counts = index.counts()
            for k in np.flatnonzero(counts).tolist():
                n, start, bucket = int(counts[k]), int(index.starts[k]), int(self.to_global[d][k])
                if whole:
                    rows.append((bucket, d, k, start, n, False, whole * n, 0.0))
                rate = round(part * n, 9)  # images per epoch; round(): 2.2 - 2 is 0.2000000000000002
                if rate:
                    rows.append((bucket, d, k, start, n, True, math.ceil(rate), rate))
        rows.sort(key=lambda r: r[0])  # bucket order; stable: datasets in order inside a bucket
        lengths = np.array([r[6] for r in rows], np.int64)
        buckets = np.array([r[0] for r in rows], np.int64)
        counts = np.bincount(buckets, weights=lengths, minlength=len(self.sizes)).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        column = (lambda i, t: np.array([r[i] for r in rows], t)) if rows else (lambda i, t: np.zeros(0, t))
        phase = [np.random.default_rng([self.seed, r[1], r[2], FRACTION_STREAM, 1]).random() for r in rows]
        return _Segments(
            start=first,
            bucket=buckets,
            dataset=column(1, np.int64),
            local_bucket=column(2, np.int64),
            local_start=column(3, np.int64),
            size=column(4, np.int64),
            fraction=column(5, bool),
            window=lengths,
            rate=column(7, np.float64),
            phase=np.array(phase, np.float64),
        )

    # -- what the planner reads --------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Global rows, usable or not."""
        return len(self.rows)

    def _shuffle(self, d: int, k: int) -> Permutation:
        """The fixed shuffle of dataset ``d``'s bucket ``k`` that fraction windows move along."""
        if (d, k) not in self._shuffles:
            n = int(np.diff(self.indexes[d].starts)[k])
            keys = round_keys(np.random.default_rng([self.seed, d, k, FRACTION_STREAM]), 1)[0]
            self._shuffles[(d, k)] = Permutation(n, keys)
        return self._shuffles[(d, k)]

    def member_rows(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` global rows at ``positions`` (any shape) of the fixed layout (:attr:`starts`) in ``epoch``."""
        positions = np.asarray(positions, np.int64)
        flat = positions.reshape(-1)
        seg = self._segments
        s = np.searchsorted(seg.start, flat, side="right") - 1
        q = flat - seg.start[s]
        out = np.empty(flat.shape, np.int64)
        for i in np.unique(s).tolist():
            chosen = np.flatnonzero(s == i)
            d, n = int(seg.dataset[i]), int(seg.size[i])
            if seg.fraction[i]:  # this epoch's window along the bucket's fixed shuffle
                local = self._shuffle(d, int(seg.local_bucket[i]))((q[chosen] + seg.window_start(i, epoch)) % n)
            else:
                local = q[chosen] % n
            members = self.indexes[d].members
            out[chosen] = self.rows.to_global(d, members[int(seg.local_start[i]) + local])
        return out.reshape(positions.shape)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(segment starts int64 (S,), bucket starts int64 (K + 1,))`` of ``epoch``'s own layout (O(S); the last
        two epochs are kept)."""
        cached = self._layouts.get(epoch)
        if cached is None:
            lengths = self._segments.lengths(epoch)
            per_bucket = np.bincount(self._segments.bucket, weights=lengths, minlength=len(self.sizes))
            cached = (
                np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
                np.concatenate([[0], np.cumsum(per_bucket)]).astype(np.int64),
            )
            # replaced, never changed in place: the loader's threads plan at once
            self._layouts = dict([*list(self._layouts.items())[-1:], (epoch, cached)])
        return cached

    def epoch_counts(self, epoch: int) -> np.ndarray:
        """``int64 (K,)`` samples per bucket in ``epoch`` (fraction windows serve floor or ceil of ``f n``)."""
        return np.diff(self._layout(epoch)[1])

    def bucket_rows(self, k: int, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` global rows at ``positions`` (any shape, in ``[0, epoch_counts(epoch)[k])``) of bucket ``k`` in
        ``epoch``."""
        segment_starts, bucket_starts = self._layout(epoch)
        at = bucket_starts[k] + np.asarray(positions, np.int64)
        # the last segment starting at or before each position: windows empty this epoch start where the next does
        s = np.searchsorted(segment_starts, at, side="right") - 1
        return self.member_rows(self._segments.start[s] + (at - segment_starts[s]), epoch)

    def dataset_of(self, rows: np.ndarray) -> np.ndarray:
        """``int64`` dataset of each global row (same shape)."""
        return self.rows.dataset_of(rows)

    def _per_dataset(self, rows: np.ndarray, pick) -> np.ndarray:
        """``float64`` ``pick(d, index, local rows)`` of each global row (same shape as ``rows``)."""
        out = np.empty(np.size(rows), np.float64)
        for d, at, local in self.rows.by_dataset(rows):
            out[at] = pick(d, self.indexes[d], local)
        return out.reshape(np.shape(rows))

    def bucket_of(self, rows: np.ndarray) -> np.ndarray:
        """``int64`` global bucket of each global row."""
        return self._per_dataset(rows, lambda d, ix, local: self.to_global[d][ix.bucket[local]]).astype(np.int64)

    def log_aspect(self, rows: np.ndarray) -> np.ndarray:
        return self._per_dataset(rows, lambda d, ix, local: ix.log_aspect(local))

    def side_lengths(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(heights, widths)`` of global rows."""
        h = self._per_dataset(rows, lambda d, ix, local: ix.heights[local]).astype(np.int64)
        w = self._per_dataset(rows, lambda d, ix, local: ix.widths[local]).astype(np.int64)
        return h, w

    def leftover_order(self, pool: np.ndarray) -> np.ndarray:
        """Order of leftover ``pool`` rows: by group of datasets (clips: then by frames), then by aspect (neighbours
        share a batch)."""
        groups = self.groups[self.dataset_of(pool)]
        if self.frames is None:
            return np.lexsort((self.log_aspect(pool), groups))
        return np.lexsort((self.log_aspect(pool), self.frames[self.bucket_of(pool)], groups))

    def leftover_candidates(self, chunk: np.ndarray) -> np.ndarray:
        """Buckets a batch of leftover rows may take: the own buckets of their groups; where a group does not
        upscale, only those every image covers (else the smallest)."""
        groups = np.unique(self.groups[self.dataset_of(chunk)]).tolist()
        candidates = np.unique(np.concatenate([self._group_base[g] for g in groups]))
        if self.frames is not None:  # clips: the fewest frames among them (a clip may be served shorter, not longer)
            candidates = candidates[self.frames[candidates] == self.frames[self.bucket_of(chunk)].min()]
        if any(self._group_no_upscale[g] for g in groups):
            h, w = self.side_lengths(chunk)
            fits = candidates[(self.sizes[candidates, 0] <= h.min()) & (self.sizes[candidates, 1] <= w.min())]
            area = self.sizes[candidates, 0] * self.sizes[candidates, 1]
            candidates = fits if len(fits) else candidates[[int(np.argmin(area))]]
        return candidates
