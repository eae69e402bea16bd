"""Clips as the planner's samples (issue 21): :class:`ClipIndex`, a :class:`~dali_arb.plan.buckets.BucketIndex`
whose rows are the clips of a :class:`~dali_arb.plan.frames.ClipTable` and whose buckets are ``(frames, height,
width)``: every frame bucket of the :class:`~dali_arb.plan.frames.FrameSpec` times every spatial bucket. The
:class:`~dali_arb.plan.planner.Planner` plans it like any index, so every guarantee it gives for images (exactly
once per epoch, equal steps and the same bucket on every rank, batch budgets, resume, several datasets and repeats)
holds for clips.

Leftovers: a batch pooled from several buckets' leftovers takes the **fewest frames** among its clips (a clip of
``F`` frames can be served as its first ``F' < F`` frames, never longer) and, among the buckets of that frame count,
the one nearest its middle aspect (as for images); the pool is ordered by frame count first, so such mixed batches
are at most one per frame count boundary.

Bucket numbering: for ``J`` frame buckets and a spatial index of ``K`` sizes, ``num_base`` of them its own: clip
bucket ``j * num_base + k`` is (frame bucket ``j``, own bucket ``k``), then the scaled-down copies
(``J * num_base + j * (K - num_base) + k - num_base``), so the own buckets come first as the planner expects.

NumPy and the plan layer only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .buckets import BucketIndex, index_dtype
from .frames import ClipTable, FrameSpec

__all__ = ["ClipIndex", "clip_index"]


@dataclass(frozen=True, eq=False)
class ClipIndex(BucketIndex):
    """A :class:`BucketIndex` over clips (see the module's text). Its rows are clip ids (into ``table``); ``heights``
    and ``widths`` are the clips' videos' display sizes.

    Attributes:
        frames: ``int64 (K,)`` the frame count of each bucket.
        table: the :class:`ClipTable` (rows: the manifest's rows of one dataset).
    """

    frames: np.ndarray | None = None
    table: ClipTable | None = None

    def frames_of(self, clips: np.ndarray) -> np.ndarray:
        """``int64`` frame count of the bucket of each of ``clips`` (same shape)."""
        return self.frames[self.bucket[clips]]

    def leftover_order(self, pool: np.ndarray) -> np.ndarray:
        """Order of leftover clips: by frame count, then by aspect."""
        return np.lexsort((self.log_aspect(pool), self.frames_of(pool)))

    def leftover_candidates(self, chunk: np.ndarray) -> np.ndarray:
        """Buckets a batch of leftover clips may take: those of the fewest frames among them, the spec's own (with
        ``no_upscale``: any of them every clip covers, else the smallest)."""
        fewest = int(self.frames_of(chunk).min())
        same = self.frames == fewest
        if not self.no_upscale:
            return np.flatnonzero(same & (np.arange(len(self.sizes)) < self.num_base))
        h, w = self.heights[chunk].min(), self.widths[chunk].min()
        fits = np.flatnonzero(same & (self.sizes[:, 0] <= h) & (self.sizes[:, 1] <= w))
        if len(fits):
            return fits
        ids = np.flatnonzero(same)
        return ids[[int(np.argmin(self.sizes[ids, 0] * self.sizes[ids, 1]))]]


def clip_index(spatial: BucketIndex, table: ClipTable, spec: FrameSpec) -> ClipIndex:
    """The :class:`ClipIndex` of one dataset: the clips of ``table`` (its rows index ``spatial``'s rows) in the
    buckets (frame bucket of the clip, spatial bucket of its row); a clip of a rejected row is rejected too. O(C)."""
    sizes, nb = np.asarray(spatial.sizes, np.int64), int(spatial.num_base)
    K, J = len(sizes), len(spec.frames)
    frame_buckets = np.asarray(spec.frames, np.int64)
    j = np.searchsorted(frame_buckets, table.length).astype(np.int64)
    if len(j) and not np.array_equal(frame_buckets[np.minimum(j, J - 1)], table.length):
        raise ValueError("a clip's length is not one of the spec's frame buckets (the clip table is of another spec)")
    k = np.asarray(spatial.bucket, np.int64)[table.row] if len(table) else np.zeros(0, np.int64)
    bucket = np.where(k < nb, j * nb + k, J * nb + j * (K - nb) + (k - nb))
    bucket[k < 0] = -1
    bucket = bucket.astype(index_dtype(J * K))
    all_sizes = np.concatenate([np.tile(sizes[:nb], (J, 1)), np.tile(sizes[nb:], (J, 1))]).reshape(-1, 2)
    all_frames = np.concatenate([np.repeat(frame_buckets, nb), np.repeat(frame_buckets, K - nb)]).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    usable = order[np.count_nonzero(bucket < 0) :]
    counts = np.bincount(bucket[usable], minlength=J * K).astype(np.int64)
    return ClipIndex(
        sizes=all_sizes,
        num_base=J * nb,
        no_upscale=spatial.no_upscale,
        bucket=bucket,
        members=usable.astype(np.int32 if len(bucket) < 2**31 else np.int64),
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        heights=np.asarray(spatial.heights)[table.row],
        widths=np.asarray(spatial.widths)[table.row],
        rejected_aspect=spatial.rejected_aspect,
        rejected_too_small=spatial.rejected_too_small,
        served_p99=spatial.served_p99,
        rejected_min_size=spatial.rejected_min_size,
        frames=all_frames,
        table=table,
    )
