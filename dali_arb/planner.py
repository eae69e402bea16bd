"""The epoch planner: for every (seed, epoch, rank, step), the batch of manifest rows and its bucket.

A plan is a pure function of ``(bucket assignment, batch_size, seed, epoch, world_size, rank,
options)``. Any step of any epoch is available by indexing, on any machine, with no coordination
between ranks and without replaying earlier steps. This module imports only the standard library
and NumPy.

Shapes: ``N`` images in the manifest, ``K`` buckets, ``B`` batch size, ``W`` world size,
``G = W * B`` the global batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .buckets import BucketAssignment, index_dtype
from .errors import ConfigError, PlanError
from .world import World

__all__ = ["EpochPlan", "LeftoverPolicy", "Planner"]


class LeftoverPolicy(str, enum.Enum):
    """What happens to the images of a bucket that do not fill a whole batch.

    A bucket rarely holds an exact multiple of the batch. With ranks in sync (the default) the unit
    is the global batch ``G = world_size * batch_size``; with independent ranks it is each rank's
    ``batch_size``. Worked example, one rank, ``batch_size=2``, seven images and three buckets::

        768x512: a1 a2 a3      512x768: p1 p2 p3      512x512: s1

        NEAREST    [a1 a2]@768x512 [p1 p2]@512x768 and the leftovers a3 p3 s1, sorted by aspect
                   (p3 s1 a3), form [p3 s1]@576x640 (the bucket nearest their middle aspect);
                   a3 is the one image trimmed (fewer than G are trimmed per epoch, at random)
        DROP       [a1 a2]@768x512 [p1 p2]@512x768; a3 p3 s1 sit out this epoch
        DUPLICATE  [a1 a2] [a3 a1]@768x512 [p1 p2] [p3 p1]@512x768 [s1 s1]@512x512

    Every policy reshuffles each epoch, so images left over in one epoch are served in others.

    Attributes:
        NEAREST: leftovers of all buckets are pooled, sorted by aspect ratio and cut into batches;
            each batch takes the bucket nearest (in log aspect) to the middle of its aspect range,
            so neighbours share a batch and crops stay small. Never squashes into the square base
            bucket (NovelAI's catch-all). No image twice; fewer than ``G`` trimmed per epoch.
            When the data has a gap in aspect (say only 3:2 and 2:3 images) and the leftovers of
            the two sides do not each fill whole batches, the one batch that straddles the gap
            takes the bucket between them: the smallest worst-case crop for its images. Use
            DUPLICATE where no image may ever be cropped beyond its own bucket.
        DROP: leftovers are not served this epoch; every batch is at its own bucket.
        DUPLICATE: a bucket's last batch is filled up with images of the same bucket, served a
            second time; every image is served at its own bucket, none dropped.
    """

    NEAREST = "nearest"
    DROP = "drop"
    DUPLICATE = "duplicate"

    @classmethod
    def parse(cls, value: LeftoverPolicy | str) -> LeftoverPolicy:
        """The policy named by ``value``; a ConfigError naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ConfigError(f"leftover must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One rank's plan for one epoch.

    Attributes:
        rows: ``int64 (steps, B)`` manifest row of every sample of every step.
        bucket: ``int16 (steps,)`` bucket index of every step (into ``sizes``; ``int32`` beyond 32,767 buckets).
        sizes: ``int64 (K, 2)`` bucket ``(height, width)``.
        epoch, rank, world_size, batch_size: what the plan is for.
        offset: position of this rank's samples inside the global batch (for per-sample randomness
            that does not depend on the world size).
        trimmed, dropped, duplicated: images trimmed / not served / served twice this epoch,
            over all ranks.
        bucket_counts: ``int64 (R, K)`` images per bucket this epoch, after trimming, for each unit
            that batches are cut from: ``R = 1`` (all ranks together) with ranks in sync, else
            ``R = world_size``. ``counts // unit`` are whole batches, ``counts % unit`` leftovers.
    """

    rows: np.ndarray
    bucket: np.ndarray
    sizes: np.ndarray
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    offset: int
    trimmed: int
    dropped: int
    duplicated: int
    bucket_counts: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def size(self, step: int) -> tuple[int, int]:
        """``(height, width)`` of step ``step``."""
        h, w = self.sizes[self.bucket[step]]
        return int(h), int(w)


class Planner:
    """Makes :class:`EpochPlan` objects for one rank.

    Args:
        assignment: images assigned to buckets (:meth:`BucketSpec.assign`).
        batch_size: samples per batch per rank.
        world: this rank's :class:`World`.
        seed: shared by every rank; epoch ``e`` draws from ``np.random.default_rng([seed, e])``.
        leftover: a :class:`LeftoverPolicy` (or its value).
        sync_ranks: True (default): every rank trains the same bucket at a given step, so all ranks
            do the same work per step (no stragglers). Global batches of ``G`` images are cut per
            bucket, so leftovers are up to ``G - 1`` per bucket. False: each rank buckets its own
            share independently (NovelAI), leftovers up to ``B - 1`` per bucket per rank, but
            ranks may train different resolutions at the same step.
        largest_first: serve a batch of the largest-area bucket as step 0 of every epoch, so an
            out-of-memory error shows at once rather than hours later.
    """

    def __init__(
        self,
        assignment: BucketAssignment,
        *,
        batch_size: int,
        world: World | None = None,
        seed: int = 0,
        leftover: LeftoverPolicy | str = LeftoverPolicy.NEAREST,
        sync_ranks: bool = True,
        largest_first: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.leftover = LeftoverPolicy.parse(leftover)
        self.world = world if world is not None else World()
        if not sync_ranks and self.leftover is LeftoverPolicy.DUPLICATE:
            raise ConfigError("leftover='duplicate' needs sync_ranks=True; use 'nearest' or 'drop'")
        self.assignment = assignment
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sync_ranks = bool(sync_ranks)
        self.largest_first = bool(largest_first)
        self.global_batch = self.batch_size * self.world.world_size
        bucket = assignment.bucket
        index_type = np.int32 if bucket.shape[0] < 2**31 else np.int64
        self._valid = np.flatnonzero(bucket >= 0).astype(index_type)  # (N_valid,)
        self._bucket = bucket
        self._sizes = assignment.sizes
        self._log_sizes = np.log(self._sizes[:, 1] / self._sizes[:, 0])
        self._area = self._sizes[:, 0] * self._sizes[:, 1]
        if len(self._valid) < self.global_batch:
            raise PlanError(
                f"only {len(self._valid)} usable images, fewer than one global batch "
                f"(world_size {self.world.world_size} x batch_size {self.batch_size} = {self.global_batch}); "
                "lower the batch size or add images"
            )
        self._cache: dict[int, EpochPlan] = {}  # the last two epochs (prefetch straddles epoch ends)

    @property
    def num_images(self) -> int:
        """Images that take part (not rejected)."""
        return len(self._valid)

    def epoch(self, epoch: int) -> EpochPlan:
        """The plan of this rank for ``epoch`` (the last two epochs asked for are kept)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        if epoch in self._cache:
            return self._cache[epoch]
        plan = self._plan_sync(int(epoch)) if self.sync_ranks else self._plan_independent(int(epoch))
        if len(plan) == 0:
            raise PlanError(
                f"no full batch can be made with leftover='{self.leftover.value}' "
                f"(largest bucket holds {int(self.assignment.counts().max())} images, batch needs "
                f"{self.global_batch if self.sync_ranks else self.batch_size}); use leftover='nearest'"
            )
        if len(self._cache) >= 2:
            del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[int(epoch)] = plan
        return plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps per epoch, equal on every rank."""
        return len(self.epoch(epoch))

    # -- sync: every rank serves one slice of the same global batch at each step ------------------
    def _plan_sync(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        G, B, r = self.global_batch, self.batch_size, self.world.rank
        perm = rng.permutation(self._valid)  # (N_valid,) rows in random order
        trimmed = 0
        if self.leftover is LeftoverPolicy.NEAREST:
            trimmed = len(perm) % G
            perm = perm[: len(perm) - trimmed]
        serving, starts, block_bucket, dropped, duplicated, counts = self._blocks(perm, G)
        order = self._block_order(rng, block_bucket)  # (steps,)
        # rows: (steps, B) this rank's slice of each global batch
        idx = starts[order][:, None] + (r * B + np.arange(B, dtype=np.int64))[None, :]
        return EpochPlan(
            rows=serving[idx].astype(np.int64),
            bucket=block_bucket[order],
            sizes=self._sizes,
            epoch=epoch,
            rank=r,
            world_size=self.world.world_size,
            batch_size=B,
            offset=r * B,
            trimmed=trimmed,
            dropped=dropped,
            duplicated=duplicated,
            bucket_counts=counts[None, :],
        )

    # -- independent: each rank buckets its own share (NovelAI) ---------------------------------
    def _plan_independent(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        G, B, W, r = self.global_batch, self.batch_size, self.world.world_size, self.world.rank
        perm = rng.permutation(self._valid)
        trimmed = len(perm) % G
        perm = perm[: len(perm) - trimmed]
        mine = perm[r::W]  # (N_trim / W,) this rank's share
        rank_rng = np.random.default_rng([self.seed, epoch, 1 + r])
        serving, starts, block_bucket, dropped, _, _ = self._blocks(mine, B)
        order = self._block_order(rank_rng, block_bucket)
        steps = len(order)
        K = len(self._sizes)
        shares = self._bucket[perm].reshape(-1, W)  # (N_trim / W, W): column r holds rank r's buckets
        counts = np.stack([np.bincount(shares[:, r], minlength=K) for r in range(W)]).astype(np.int64)  # (W, K)
        if self.leftover is LeftoverPolicy.DROP:
            # Ranks fill different numbers of whole batches; all stop at the smallest count.
            per_rank = (counts // B).sum(axis=1)  # (W,)
            steps = int(per_rank.min())
            dropped = int(len(perm) - steps * G)
            order = order[:steps]
        idx = starts[order][:, None] + np.arange(B, dtype=np.int64)[None, :]
        return EpochPlan(
            rows=serving[idx].astype(np.int64),
            bucket=block_bucket[order],
            sizes=self._sizes,
            epoch=epoch,
            rank=r,
            world_size=W,
            batch_size=B,
            offset=r * B,
            trimmed=trimmed,
            dropped=dropped if self.leftover is LeftoverPolicy.DROP else 0,
            duplicated=0,
            bucket_counts=counts,
        )

    def _block_order(self, rng: np.random.Generator, block_bucket: np.ndarray) -> np.ndarray:
        """A random order of the blocks (NovelAI's size-weighted bucket draw is equivalent)."""
        order = rng.permutation(len(block_bucket))
        if self.largest_first and len(order):
            areas = self._area[block_bucket[order]]
            first = int(np.argmax(areas))
            order[[0, first]] = order[[first, 0]]
        return order

    def _blocks(self, rows: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, np.ndarray]:
        """Cut shuffled ``rows`` into blocks of ``group`` images that share a bucket.

        Returns ``serving`` (rows, ``(M,)``), ``starts`` (``int64 (n_blocks,)``: block ``j`` is
        ``serving[starts[j]:starts[j] + group]``), ``block_bucket`` (``int16 (n_blocks,)``),
        how many images were dropped and duplicated, and the images per bucket (``int64 (K,)``).
        """
        K = len(self._sizes)
        keys = self._bucket[rows]
        order = np.argsort(keys, kind="stable")  # radix sort for int16 keys
        grouped = rows[order]  # (M,) rows grouped by bucket, shuffled within
        del order
        counts = np.bincount(keys, minlength=K).astype(np.int64)
        del keys
        bucket_start = np.cumsum(counts) - counts
        full = counts // group  # whole blocks per bucket
        rem = counts - full * group
        n_full = int(full.sum())
        block_bucket = np.repeat(np.arange(K, dtype=index_dtype(K)), full)
        block_index = np.arange(n_full, dtype=np.int64) - np.repeat(np.cumsum(full) - full, full)
        starts = np.repeat(bucket_start, full) + group * block_index
        leftovers = [
            grouped[bucket_start[k] + full[k] * group : bucket_start[k] + counts[k]] for k in np.flatnonzero(rem)
        ]
        dropped = duplicated = 0
        extra_rows: list[np.ndarray] = []
        extra_bucket: list[int] = []
        if self.leftover is LeftoverPolicy.DROP:
            dropped = int(rem.sum())
        elif self.leftover is LeftoverPolicy.DUPLICATE:
            for k, part in zip(np.flatnonzero(rem), leftovers):
                whole = grouped[bucket_start[k] : bucket_start[k] + counts[k]]
                pad = np.resize(whole, group - len(part))  # earliest images of the bucket first
                extra_rows.append(np.concatenate([part, pad]))
                extra_bucket.append(int(k))
                duplicated += len(pad)
        elif leftovers:
            pool = np.concatenate(leftovers)
            pool = pool[np.argsort(self.assignment.log_aspect[pool], kind="stable")]
            assert len(pool) % group == 0, "leftover pool must hold whole blocks"
            for chunk in pool.reshape(-1, group):
                extra_rows.append(chunk)
                extra_bucket.append(self._leftover_bucket(chunk))
        if extra_rows:
            extra = np.concatenate(extra_rows).astype(grouped.dtype)
            starts = np.concatenate([starts, len(grouped) + group * np.arange(len(extra_rows), dtype=np.int64)])
            block_bucket = np.concatenate([block_bucket, np.array(extra_bucket, block_bucket.dtype)])
            grouped = np.concatenate([grouped, extra])
        return grouped, starts, block_bucket, dropped, duplicated, counts

    def _leftover_bucket(self, chunk: np.ndarray) -> int:
        """Bucket for a block of leftover rows (sorted by aspect): nearest to its middle aspect.

        Only the spec's own buckets are candidates; with ``no_upscale``, only buckets that every
        image of the block covers (falling back to the smallest such bucket by area).
        """
        log_aspect = self.assignment.log_aspect[chunk]
        middle = (log_aspect.min() + log_aspect.max()) / 2
        if self.assignment.no_upscale:
            h = self.assignment.heights[chunk].min()
            w = self.assignment.widths[chunk].min()
            candidates = np.flatnonzero((self._sizes[:, 0] <= h) & (self._sizes[:, 1] <= w))
            if len(candidates) == 0:
                candidates = np.array([int(np.argmin(self._area))])
        else:
            candidates = np.arange(self.assignment.num_base)
        best = candidates[np.argmin(np.abs(self._log_sizes[candidates] - middle))]
        return int(best)
