"""The epoch planner: for every (seed, epoch, rank, step), the batch of manifest rows and its bucket.

A plan is a pure function of ``(bucket index, batch_size, seed, epoch, world_size, rank, options)``.
Any step of any epoch is available on any machine, with no coordination between ranks and without
replaying earlier steps.

An epoch costs O(K x G) time and memory to plan, not O(N), and any step's batch O(B): nothing the
size of the dataset is built per epoch. Bucket ``k`` (``n_k`` images, ``members[starts[k]:]`` of the
:class:`BucketIndex`) is shuffled by a keyed permutation (:mod:`dali_arb.plan.permute`) that gives the
image at any position directly. Blocks of ``G`` consecutive positions are global batches; what is left
over of each bucket (fewer than ``G`` images, a random subset) is pooled per epoch; the order of the
blocks is another keyed permutation. What an epoch trims (``M mod G`` samples) is drawn uniformly from all
samples first, O(G log K): bucket ``k`` trims the last ``t_k`` positions of its shuffle. Every key comes from
``np.random.default_rng([seed, epoch])``.

This module imports only the standard library, NumPy and the plan layer (buckets, permute, mixture, world).
:func:`make_planner` is the one way a planner is made from per-dataset bucket indexes.

Shapes: ``N`` images in the manifest, ``M`` usable, ``K`` buckets, ``B`` batch size, ``W`` world size,
``G = W * B`` the global batch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from ..errors import ConfigError, PlanError
from .buckets import BucketAssignment, BucketIndex, BucketSpec, PlannedIndex, index_dtype
from .mixture import MixedIndex, check_repeats
from .permute import Permutation, moving_round, round_keys
from .world import World

__all__ = ["EpochPlan", "LeftoverPolicy", "Planner", "make_planner"]

#: Separates DUPLICATE's rounding phases (buckets smaller than a global batch) from every other keyed draw.
DUPLICATE_STREAM = 0xD0B1


class LeftoverPolicy(str, enum.Enum):
    """What happens to the images of a bucket that do not fill a whole batch.

    A bucket rarely holds an exact multiple of the batch. With ranks in sync (the default) the unit
    is the global batch ``G = world_size * batch_size``; with independent ranks it is each rank's
    ``batch_size``. Worked example, one rank, ``batch_size=2``, seven images and three buckets::

        768x512: a1 a2 a3      512x768: p1 p2 p3      512x512: s1

        NEAREST    7 % 2 = 1 image, drawn from all seven, is trimmed first (say a3); then [a1 a2]@768x512
                   [p1 p2]@512x768, and the leftovers p3 s1, sorted by aspect, form [p3 s1]@576x640 (the
                   bucket nearest their middle aspect)
        DROP       [a1 a2]@768x512 [p1 p2]@512x768; s1's bucket can never fill a batch, so one image is
                   trimmed as for NEAREST (say a3) and the pooled [p3 s1]@576x640 is served too
        DUPLICATE  [a1 a2] [a3 a1]@768x512 [p1 p2] [p3 p1]@512x768, and [s1 s1]@512x512 every other
                   epoch (its bucket holds 1 image of the 2 a batch needs)

    Every policy reshuffles each epoch, and whatever an epoch trims or leaves out is drawn at random, so no
    image is left out for good, however small its bucket: with NEAREST and DUPLICATE every image is served
    about as often as any other over the epochs; DROP serves a bucket of ``n >= G`` images ``G * (n // G)``
    of them per epoch.

    Attributes:
        NEAREST: ``M mod G`` of the ``M`` images are trimmed first, drawn uniformly from all of them; each
            bucket then serves its whole batches, and the leftovers of all buckets (together a whole number of
            batches) are pooled, sorted by aspect ratio and cut into batches; each batch takes the bucket
            nearest (in log aspect) to the middle of its aspect range, so neighbours share a batch and crops
            stay small. Never squashes into the square base bucket (NovelAI's catch-all). No image twice;
            fewer than ``G`` trimmed per epoch, nothing else left out.
            When the data has a gap in aspect (say only 3:2 and 2:3 images) and the leftovers of
            the two sides do not each fill whole batches, the one batch that straddles the gap
            takes the bucket between them: the smallest worst-case crop for its images. Use
            DUPLICATE where no image may ever be cropped beyond its own bucket.
        DROP: leftovers are not served this epoch; every batch is at its own bucket, except for buckets
            that cannot fill one batch (fewer than ``G`` images; with independent ranks, no whole batch on
            the rank): their images join the nearest-bucket pool as for NEAREST (trimming ``M mod G`` from
            all images first), and the pooled batches that hold one of them are served. No image twice.
        DUPLICATE: a bucket's last batch is filled up with images of the same bucket, served a
            second time; every image is served at its own bucket. A bucket of ``n < G`` images serves
            its one batch (each image about ``G / n`` times) in a share ``n / G`` of the epochs, by a seeded
            rounding, so that its images are served once per epoch on average like all others; in the
            other epochs they count as dropped.
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


class EpochPlan:
    """One rank's plan for one epoch, evaluated on demand: :meth:`rows_at` and :meth:`bucket_at` cost
    O(B) and O(log K) for any step; :attr:`rows` and :attr:`bucket` materialise the whole epoch.

    Attributes:
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

    def __init__(
        self,
        *,
        index: BucketIndex,
        permutations: list[Permutation],
        full_starts: np.ndarray,
        first_position: np.ndarray,
        stride: int,
        pitch: int,
        extra_rows: np.ndarray,
        extra_bucket: np.ndarray,
        order: _BlockOrder,
        steps: int,
        epoch: int,
        rank: int,
        world_size: int,
        batch_size: int,
        offset: int,
        trimmed: int,
        dropped: int,
        duplicated: int,
        bucket_counts: np.ndarray,
    ) -> None:
        self._index = index
        self._permutations = permutations  # (K,) the shuffle of each bucket this epoch
        self._full_starts = full_starts  # int64 (K + 1,) first full block of each bucket
        self._first_position = first_position  # int64 (K,) this rank's first position in each bucket
        self._stride, self._pitch = stride, pitch  # position = first + stride * (block * pitch + i)
        self._extra_rows = extra_rows  # (L, B) this rank's rows of the pooled / padded blocks
        self._extra_bucket = extra_bucket  # (L,)
        self._order = order
        self._steps = steps
        self.sizes = index.sizes
        self.epoch, self.rank, self.world_size, self.batch_size = epoch, rank, world_size, batch_size
        self.offset = offset
        self.trimmed, self.dropped, self.duplicated = trimmed, dropped, duplicated
        self.bucket_counts = bucket_counts

    def __len__(self) -> int:
        return self._steps

    def _check(self, step: int) -> int:
        if not 0 <= step < self._steps:
            raise IndexError(f"step {step} is outside epoch {self.epoch}, which has {self._steps} steps")
        return int(step)

    def _buckets_of(self, blocks: np.ndarray) -> np.ndarray:
        full = int(self._full_starts[-1])
        bucket = np.searchsorted(self._full_starts, np.minimum(blocks, full - 1), side="right") - 1
        if len(self._extra_bucket):
            extra = blocks >= full
            bucket[extra] = self._extra_bucket[blocks[extra] - full]
        return bucket

    def bucket_at(self, step: int) -> int:
        """Bucket index of ``step`` (into :attr:`sizes`)."""
        block = self._order(np.array([self._check(step)], np.int64))
        return int(self._buckets_of(block)[0])

    def size(self, step: int) -> tuple[int, int]:
        """``(height, width)`` of step ``step``."""
        h, w = self.sizes[self.bucket_at(step)]
        return int(h), int(w)

    def rows_at(self, step: int) -> np.ndarray:
        """``int64 (B,)`` manifest rows of ``step``."""
        return self._rows_of(self._order(np.array([self._check(step)], np.int64)))[0]

    def _rows_of(self, blocks: np.ndarray) -> np.ndarray:
        """``int64 (len(blocks), B)`` rows of ``blocks``."""
        B, full = self.batch_size, int(self._full_starts[-1])
        rows = np.empty((len(blocks), B), np.int64)
        bucket = self._buckets_of(blocks)
        extra = blocks >= full
        if extra.any():
            rows[extra] = self._extra_rows[blocks[extra] - full]
        for k in np.unique(bucket[~extra]).tolist():
            chosen = np.flatnonzero((bucket == k) & ~extra)
            block = blocks[chosen] - self._full_starts[k]  # the block's number inside its bucket
            positions = self._first_position[k] + self._stride * (
                block[:, None] * self._pitch + np.arange(B, dtype=np.int64)[None, :]
            )
            rows[chosen] = self._index.bucket_rows(k, self._permutations[k](positions), self.epoch)
        return rows

    @cached_property
    def rows(self) -> np.ndarray:
        """``int64 (steps, B)`` manifest row of every sample of every step (O(N / W): for tools and tests)."""
        return self._rows_of(self._order(np.arange(self._steps, dtype=np.int64)))

    @cached_property
    def bucket(self) -> np.ndarray:
        """``int16 (steps,)`` bucket index of every step (``int32`` beyond 32,767 buckets)."""
        blocks = self._order(np.arange(self._steps, dtype=np.int64))
        return self._buckets_of(blocks).astype(index_dtype(len(self.sizes)))


class _BlockOrder:
    """The shuffled order of an epoch's blocks: step ``i`` trains block ``order(i)``; with ``first`` given,
    that block moves to step 0 (swapping places with the block the shuffle put there)."""

    def __init__(self, n_blocks: int, keys: np.ndarray, first: int | None) -> None:
        self.shuffle = Permutation(n_blocks, keys)
        self.first = first
        if first is not None:
            self.first_was_at = int(self.shuffle.inverse(np.array([first]))[0])
            self.zero_holds = int(self.shuffle(np.array([0]))[0])

    def __call__(self, steps: np.ndarray) -> np.ndarray:
        blocks = self.shuffle(steps)
        if self.first is not None:
            blocks = np.where(steps == 0, self.first, np.where(steps == self.first_was_at, self.zero_holds, blocks))
        return blocks


class Planner:
    """Makes :class:`EpochPlan` objects for one rank.

    Args:
        index: images grouped by bucket: a :class:`BucketIndex` (the data plane's, memory-mapped), a
            :class:`~dali_arb.plan.mixture.MixedIndex` (several datasets with repeats) or a
            :class:`BucketAssignment` (:meth:`BucketSpec.assign`), grouped here.
        batch_size: samples per batch per rank.
        world: this rank's :class:`World`.
        seed: shared by every rank; epoch ``e`` draws its keys from ``np.random.default_rng([seed, e])``.
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
        index: BucketIndex | BucketAssignment,
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
        self.index = BucketIndex.of(index) if isinstance(index, BucketAssignment) else index
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sync_ranks = bool(sync_ranks)
        self.largest_first = bool(largest_first)
        self.global_batch = self.batch_size * self.world.world_size
        self._sizes = self.index.sizes
        self._log_sizes = self.index.bucket_log_aspect
        self._area = self._sizes[:, 0] * self._sizes[:, 1]
        self._duplicate_phase = np.random.default_rng([self.seed, DUPLICATE_STREAM]).random(len(self._sizes))
        if self.num_images < self.global_batch:
            raise PlanError(
                f"only {self.num_images} usable images, fewer than one global batch "
                f"(world_size {self.world.world_size} x batch_size {self.batch_size} = {self.global_batch}); "
                "lower the batch size or add images"
            )
        self._cache: dict[int, EpochPlan] = {}  # the last two epochs (prefetch straddles epoch ends)

    @property
    def assignment(self) -> BucketIndex:
        """The :class:`BucketIndex` planned from (the name of earlier versions)."""
        return self.index

    @property
    def num_images(self) -> int:
        """Images that take part (not rejected)."""
        return self.index.num_usable

    def epoch(self, epoch: int) -> EpochPlan:
        """The plan of this rank for ``epoch`` (the last two epochs asked for are kept)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        plan = self._plan_sync(int(epoch)) if self.sync_ranks else self._plan_independent(int(epoch))
        if len(plan) == 0:  # every policy serves at least one block of the (at least G) samples
            raise AssertionError(f"epoch {epoch} has no step with leftover='{self.leftover.value}': a planner bug")
        # replaced, never changed in place: the loader's thread and its worker threads plan at once
        newest = list(self._cache.items())[-1:]
        self._cache = dict([*newest, (int(epoch), plan)])
        return plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps per epoch, equal on every rank."""
        return len(self.epoch(epoch))

    def _epoch_counts(self, epoch: int) -> np.ndarray:
        """``int64 (K,)`` samples per bucket in ``epoch``; a PlanError when they do not fill one global batch."""
        counts = self.index.epoch_counts(epoch)
        if int(counts.sum()) < self.global_batch:
            raise PlanError(
                f"epoch {epoch} serves only {int(counts.sum())} samples (fractional repeats), fewer than one global "
                f"batch ({self.global_batch}); lower the batch size or raise the repeats"
            )
        return counts

    def _epoch_keys(self, epoch: int, counts: np.ndarray) -> tuple[np.random.Generator, list[Permutation]]:
        """The epoch's generator and the shuffle of every bucket (keys drawn first, in bucket order)."""
        rng = np.random.default_rng([self.seed, epoch])
        keys = round_keys(rng, len(self._sizes))
        return rng, [Permutation(int(n), k) for n, k in zip(counts.tolist(), keys)]

    def _trimmed(self, counts: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``int64 (K,)`` samples trimmed from each bucket: ``M mod G`` of all ``M``, drawn uniformly from all of
        them (the first positions of a keyed permutation of ``[0, M)``: O(G log K)), so that an image of a small
        bucket is trimmed no more often than any other. Bucket ``k`` trims the last ones of its shuffle."""
        total = int(counts.sum())
        picks = Permutation(total, keys)(np.arange(total % self.global_batch, dtype=np.int64))
        return np.bincount(np.searchsorted(np.cumsum(counts), picks, side="right"), minlength=len(counts))

    def _members_at(self, permutations: list[Permutation], k: int, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` rows at ``positions`` of bucket ``k``'s shuffle in ``epoch``."""
        return self.index.bucket_rows(k, permutations[k](positions), epoch)

    # -- sync: every rank serves one slice of the same global batch at each step ------------------
    def _plan_sync(self, epoch: int) -> EpochPlan:
        G, B, r = self.global_batch, self.batch_size, self.world.rank
        counts = self._epoch_counts(epoch)
        rng, permutations = self._epoch_keys(epoch, counts)
        order_keys, trim_keys = round_keys(rng, 2)
        small = (counts > 0) & (counts < G)  # buckets that cannot fill one global batch
        trim = self.leftover is LeftoverPolicy.NEAREST or (self.leftover is LeftoverPolicy.DROP and small.any())
        kept = counts - (self._trimmed(counts, trim_keys) if trim else 0)
        full = kept // G
        rem = kept - full * G
        dropped = duplicated = 0
        if self.leftover is LeftoverPolicy.DUPLICATE:
            extra, extra_bucket, duplicated, dropped = self._padded(permutations, counts, full, rem, epoch)
        elif trim:  # NEAREST, or DROP with small buckets: the pool fills whole global batches
            pieces = [(k, full[k] * G, 1, rem[k]) for k in np.flatnonzero(rem).tolist()]
            pool, owner = self._leftovers(permutations, pieces, epoch)
            extra = self._cut(pool, owner, G, starved=full == 0 if self.leftover is LeftoverPolicy.DROP else None)
            extra_bucket = self._leftover_buckets(extra)
            dropped = len(pool) - extra.size
        else:  # DROP, every bucket fills a global batch: each one's remainder sits out
            extra, extra_bucket = np.zeros((0, G), np.int64), np.zeros(0, np.int64)
            dropped = int(rem.sum())
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full,
            first_position=np.full(len(counts), r * B, np.int64),
            stride=1,
            pitch=G,
            extra_rows=extra[:, r * B : (r + 1) * B],
            extra_bucket=extra_bucket,
            order_keys=order_keys,
            steps=None,
            trimmed=int((counts - kept).sum()),
            dropped=dropped,
            duplicated=duplicated,
            bucket_counts=kept[None, :],
        )

    def _padded(
        self, permutations: list[Permutation], counts: np.ndarray, full: np.ndarray, rem: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """DUPLICATE's last block of each bucket, filled up with the earliest images of its shuffle: ``(rows (L, G),
        bucket (L,), duplicated, dropped)``. A bucket of ``n < G`` images would serve each one ``G / n`` times every epoch: it
        serves its block in a share ``n / G`` of the epochs instead (seeded moving rounding), so its images are
        served once per epoch on average, like all others; when no block at all is due, the nearest to due serves."""
        G = self.global_batch
        small = (counts > 0) & (counts < G)
        rate = counts / G
        due = ~small | (moving_round(rate, self._duplicate_phase, epoch) > 0)
        if small.any() and not full.any() and not due[small].any():
            progress = np.where(small, np.mod(rate * epoch + self._duplicate_phase, 1.0) + rate, -1.0)
            due[int(np.argmax(progress))] = True
        blocks: list[np.ndarray] = []
        duplicated = 0
        padded = np.flatnonzero((rem > 0) & due)
        for k in padded.tolist():
            pad = np.arange(G - rem[k], dtype=np.int64) % counts[k]  # earliest images of the shuffle
            positions = np.concatenate([np.arange(full[k] * G, counts[k], dtype=np.int64), pad])
            blocks.append(self._members_at(permutations, k, positions, epoch))
            duplicated += len(pad)
        return np.array(blocks, np.int64).reshape(-1, G), padded.astype(np.int64), duplicated, int(counts[~due].sum())

    # -- independent: each rank buckets its own share (NovelAI) ---------------------------------
    def _plan_independent(self, epoch: int) -> EpochPlan:
        G, B, W, r = self.global_batch, self.batch_size, self.world.world_size, self.world.rank
        counts = self._epoch_counts(epoch)
        K = len(counts)
        rng, permutations = self._epoch_keys(epoch, counts)
        # One sequence of all images but M % G of them, trimmed uniformly from all: the buckets in a random order,
        # each shuffled; position q goes to rank q % W, so every rank gets M // G * B images.
        bucket_order = rng.permutation(K)
        kept = counts - self._trimmed(counts, round_keys(rng, 1)[0])
        sequence_start = np.empty(K, np.int64)
        sequence_start[bucket_order] = np.cumsum(kept[bucket_order]) - kept[bucket_order]
        first = (np.arange(W)[:, None] - sequence_start[None, :]) % W  # (W, K) each rank's first position
        shares = np.maximum(0, -((first - kept[None, :]) // W))  # (W, K) ceil((kept - first) / W)
        full = shares // B

        def pool_of(q: int) -> tuple[np.ndarray, np.ndarray]:  # rank q's leftovers
            left = shares[q] - full[q] * B
            pieces = [(k, int(first[q, k] + W * full[q, k] * B), W, int(left[k])) for k in np.flatnonzero(left)]
            return self._leftovers(permutations, pieces, epoch)

        drop = self.leftover is LeftoverPolicy.DROP
        starved = full == 0  # (W, K) a rank's buckets with no whole batch: DROP serves their pooled batches
        extra = self._cut(*pool_of(r), B, starved=starved[r] if drop else None)
        steps = None
        dropped = 0
        if drop:  # ranks serve different numbers of batches: all stop at the fewest
            pooled = [len(self._cut(*pool_of(q), B, starved=starved[q])) if (starved[q] & (shares[q] > 0)).any()
                      else 0 for q in range(W)]  # fmt: skip
            steps = int((full.sum(axis=1) + np.array(pooled)).min())
            dropped = int(kept.sum()) - steps * G
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full[r],
            first_position=first[r].astype(np.int64),
            stride=W,
            pitch=B,
            extra_rows=extra,
            extra_bucket=self._leftover_buckets(extra),
            order_keys=round_keys(np.random.default_rng([self.seed, epoch, 1 + r]), 1)[0],
            steps=steps,
            trimmed=int((counts - kept).sum()),
            dropped=dropped,
            duplicated=0,
            bucket_counts=shares.astype(np.int64),
        )

    def _leftovers(
        self, permutations: list[Permutation], pieces: list[tuple[int, int, int, int]], epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the leftover ``pieces`` (``(bucket, first position, stride, count)``) and the bucket each comes
        from, in the index's leftover order (by aspect; with several datasets, by group of datasets first)."""
        parts = [
            self._members_at(permutations, k, first + stride * np.arange(count, dtype=np.int64), epoch)
            for k, first, stride, count in pieces
        ]
        pool = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        owner = np.repeat(np.array([p[0] for p in pieces], np.int64), [int(p[3]) for p in pieces])
        order = self.index.leftover_order(pool)
        return pool[order], owner[order]

    @staticmethod
    def _cut(pool: np.ndarray, owner: np.ndarray, unit: int, *, starved: np.ndarray | None = None) -> np.ndarray:
        """``int64 (L, unit)`` the pool (a whole number of blocks) cut into blocks in leftover order; with
        ``starved`` (``bool (K,)``, DROP), only the blocks that hold an image of a starved bucket."""
        if len(pool) % unit:
            raise AssertionError(f"a leftover pool of {len(pool)} is no whole number of blocks of {unit}")
        blocks = pool.reshape(-1, unit)
        if starved is not None:
            blocks = blocks[starved[owner.reshape(-1, unit)].any(axis=1)]
        return blocks

    def _plan(
        self,
        *,
        epoch: int,
        full: np.ndarray,
        extra_bucket: np.ndarray,
        order_keys: np.ndarray,
        steps: int | None,
        **given,
    ) -> EpochPlan:
        """The plan from this rank's full blocks per bucket ``full (K,)`` and its extra blocks."""
        full_starts = np.concatenate([[0], np.cumsum(full)]).astype(np.int64)
        n_blocks = int(full_starts[-1]) + len(extra_bucket)
        first = None
        if self.largest_first and n_blocks:
            # the lowest-numbered block of the largest area: the first full block of a bucket, or an extra block
            candidates = [(-int(self._area[k]), int(full_starts[k])) for k in np.flatnonzero(full).tolist()]
            candidates += [(-int(self._area[k]), int(full_starts[-1]) + i) for i, k in enumerate(extra_bucket.tolist())]
            first = min(candidates)[1]
        order = _BlockOrder(n_blocks, order_keys, first)
        return EpochPlan(
            index=self.index,
            full_starts=full_starts,
            extra_bucket=extra_bucket,
            order=order,
            steps=n_blocks if steps is None else min(steps, n_blocks),
            epoch=epoch,
            rank=self.world.rank,
            world_size=self.world.world_size,
            batch_size=self.batch_size,
            offset=self.world.rank * self.batch_size,
            **given,
        )

    def _leftover_buckets(self, blocks: np.ndarray) -> np.ndarray:
        """``int64 (L,)`` the bucket of each pooled block of ``blocks`` (``(L, unit)``): :meth:`_leftover_bucket`."""
        return np.array([self._leftover_bucket(block) for block in blocks], np.int64)

    def _leftover_bucket(self, chunk: np.ndarray) -> int:
        """Bucket for a block of leftover rows (in leftover order): among the index's candidates for it (the
        spec's own buckets; with ``no_upscale``, those every image covers), the nearest to its middle aspect."""
        log_aspect = self.index.log_aspect(chunk)
        middle = (log_aspect.min() + log_aspect.max()) / 2
        candidates = self.index.leftover_candidates(chunk)
        return int(candidates[np.argmin(np.abs(self._log_sizes[candidates] - middle))])


def make_planner(
    indexes: Sequence[BucketIndex],
    specs: Sequence[BucketSpec],
    *,
    repeats: Sequence[float] | float | None = None,
    seed: int = 0,
    batch_size: int,
    world: World | None = None,
    leftover: LeftoverPolicy | str = LeftoverPolicy.NEAREST,
    sync_ranks: bool = True,
) -> Planner:
    """THE planner factory: a :class:`Planner` over ``D`` datasets from each one's :class:`BucketIndex` (or
    :class:`BucketAssignment`) and :class:`BucketSpec`, with ``repeats`` (one per dataset, ``None``: all 1;
    validated by :func:`~dali_arb.plan.mixture.check_repeats`). One dataset served once plans from its own index;
    otherwise the datasets plan as one :class:`~dali_arb.plan.mixture.MixedIndex` (its rows are global rows).
    The loader (``loader.planning.build_planner``), the bucket report and the benchmark all make it here."""
    if len(indexes) != len(specs) or not indexes:
        raise ConfigError(f"give one bucket index and one bucket spec per dataset, got {len(indexes)} and {len(specs)}")
    weights = check_repeats(repeats, len(indexes))
    grouped = [BucketIndex.of(ix) if isinstance(ix, BucketAssignment) else ix for ix in indexes]
    if len(grouped) == 1 and weights == (1.0,):
        index: PlannedIndex = grouped[0]
    else:
        index = MixedIndex(grouped, weights, list(specs), seed=seed)
    return Planner(index, batch_size=batch_size, world=world, seed=seed, leftover=leftover, sync_ranks=sync_ranks)
