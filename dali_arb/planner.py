"""The epoch planner: for every (seed, epoch, rank, step), the batch of manifest rows and its bucket.

A plan is a pure function of ``(bucket index, batch_size, seed, epoch, world_size, rank, options)``.
Any step of any epoch is available on any machine, with no coordination between ranks and without
replaying earlier steps.

An epoch costs O(K x G) time and memory to plan, not O(N), and any step's batch O(B): nothing the
size of the dataset is built per epoch. Bucket ``k`` (``n_k`` images, ``members[starts[k]:]`` of the
:class:`BucketIndex`) is shuffled by a keyed permutation (:mod:`dali_arb.permute`) that gives the
image at any position directly. Blocks of ``G`` consecutive positions are global batches; what is left
over of each bucket (fewer than ``G`` images, a random subset) is pooled per epoch; the order of the
blocks is another keyed permutation. Every key comes from ``np.random.default_rng([seed, epoch])``.

This module imports only the standard library and NumPy.

Shapes: ``N`` images in the manifest, ``M`` usable, ``K`` buckets, ``B`` batch size, ``W`` world size,
``G = W * B`` the global batch.
"""

from __future__ import annotations

import enum
from functools import cached_property

import numpy as np

from .buckets import BucketAssignment, BucketIndex, index_dtype
from .errors import ConfigError, PlanError
from .permute import Permutation, round_keys
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
        starts = self._index.starts
        for k in np.unique(bucket[~extra]).tolist():
            chosen = np.flatnonzero((bucket == k) & ~extra)
            block = blocks[chosen] - self._full_starts[k]  # the block's number inside its bucket
            positions = self._first_position[k] + self._stride * (
                block[:, None] * self._pitch + np.arange(B, dtype=np.int64)[None, :]
            )
            rows[chosen] = self._index.member_rows(starts[k] + self._permutations[k](positions), self.epoch)
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
            :class:`~dali_arb.mixture.MixedIndex` (several datasets with repeats) or a
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
        self._counts = self.index.counts()  # (K,)
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
        if len(plan) == 0:
            raise PlanError(
                f"no full batch can be made with leftover='{self.leftover.value}' "
                f"(largest bucket holds {int(self._counts.max())} images, batch needs "
                f"{self.global_batch if self.sync_ranks else self.batch_size}); use leftover='nearest'"
            )
        # replaced, never changed in place: the loader's thread and its worker threads plan at once
        newest = list(self._cache.items())[-1:]
        self._cache = dict([*newest, (int(epoch), plan)])
        return plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps per epoch, equal on every rank."""
        return len(self.epoch(epoch))

    def _epoch_keys(self, epoch: int) -> tuple[np.random.Generator, list[Permutation]]:
        """The epoch's generator and the shuffle of every bucket (keys drawn first, in bucket order)."""
        rng = np.random.default_rng([self.seed, epoch])
        keys = round_keys(rng, len(self._sizes))
        return rng, [Permutation(int(n), k) for n, k in zip(self._counts.tolist(), keys)]

    def _members_at(self, permutations: list[Permutation], k: int, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` rows at ``positions`` of bucket ``k``'s shuffle in ``epoch``."""
        return self.index.member_rows(self.index.starts[k] + permutations[k](positions), epoch)

    # -- sync: every rank serves one slice of the same global batch at each step ------------------
    def _plan_sync(self, epoch: int) -> EpochPlan:
        G, B, r = self.global_batch, self.batch_size, self.world.rank
        rng, permutations = self._epoch_keys(epoch)
        order_keys = round_keys(rng, 1)[0]
        counts = self._counts
        full = counts // G
        rem = counts - full * G
        trimmed = dropped = duplicated = 0
        counts_after = counts.copy()
        extra_blocks: list[np.ndarray] = []  # (G,) rows of each extra block
        extra_bucket: list[int] = []
        if self.leftover is LeftoverPolicy.DROP:
            dropped = int(rem.sum())
        elif self.leftover is LeftoverPolicy.DUPLICATE:
            for k in np.flatnonzero(rem).tolist():
                pad = np.arange(G - rem[k], dtype=np.int64) % counts[k]  # earliest images of the shuffle
                positions = np.concatenate([np.arange(full[k] * G, counts[k], dtype=np.int64), pad])
                extra_blocks.append(self._members_at(permutations, k, positions, epoch))
                extra_bucket.append(k)
                duplicated += len(pad)
        else:  # NEAREST: pool the leftovers, sorted by aspect; trim fewer than G of them at random
            pieces = [(k, full[k] * G, 1, rem[k]) for k in np.flatnonzero(rem).tolist()]
            pool = self._leftovers(permutations, pieces, epoch)
            trimmed = len(pool) % G
            if trimmed:
                cut = np.sort(rng.choice(len(pool), trimmed, replace=False))
                counts_after -= np.bincount(self.index.bucket_of(pool[cut]), minlength=len(counts))
                pool = np.delete(pool, cut)
            for chunk in pool.reshape(-1, G):
                extra_blocks.append(chunk)
                extra_bucket.append(self._leftover_bucket(chunk))
        extra = np.array(extra_blocks, np.int64).reshape(-1, G)[:, r * B : (r + 1) * B]
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full,
            first_position=np.full(len(counts), r * B, np.int64),
            stride=1,
            pitch=G,
            extra_rows=extra,
            extra_bucket=np.array(extra_bucket, np.int64),
            order_keys=order_keys,
            steps=None,
            trimmed=trimmed,
            dropped=dropped,
            duplicated=duplicated,
            bucket_counts=counts_after[None, :],
        )

    # -- independent: each rank buckets its own share (NovelAI) ---------------------------------
    def _plan_independent(self, epoch: int) -> EpochPlan:
        G, B, W, r = self.global_batch, self.batch_size, self.world.world_size, self.world.rank
        rng, permutations = self._epoch_keys(epoch)
        counts = self._counts
        K = len(counts)
        # One sequence of all images: the buckets in a random order, each shuffled; the last N % G are
        # trimmed and position q goes to rank q % W, so every rank gets N // G * B images.
        bucket_order = rng.permutation(K)
        sequence_start = np.empty(K, np.int64)
        sequence_start[bucket_order] = np.cumsum(counts[bucket_order]) - counts[bucket_order]
        total = int(counts.sum())
        trimmed = total % G
        kept = np.clip(total - trimmed - sequence_start, 0, counts)  # (K,) images of each bucket kept
        first = (np.arange(W)[:, None] - sequence_start[None, :]) % W  # (W, K) each rank's first position
        shares = np.maximum(0, -((first - kept[None, :]) // W))  # (W, K) ceil((kept - first) / W)
        full = shares // B
        steps = None
        dropped = 0
        pieces = [
            (k, int(first[r, k]) + W * int(full[r, k]) * B, W, int(shares[r, k] - full[r, k] * B)) for k in range(K)
        ]
        extra_blocks: list[np.ndarray] = []
        extra_bucket: list[int] = []
        if self.leftover is LeftoverPolicy.DROP:
            steps = int(full.sum(axis=1).min())  # ranks fill different numbers of whole batches
            dropped = total - trimmed - steps * G
        else:
            pool = self._leftovers(permutations, [p for p in pieces if p[3]], epoch)
            for chunk in pool.reshape(-1, B):
                extra_blocks.append(chunk)
                extra_bucket.append(self._leftover_bucket(chunk))
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full[r],
            first_position=first[r].astype(np.int64),
            stride=W,
            pitch=B,
            extra_rows=np.array(extra_blocks, np.int64).reshape(-1, B),
            extra_bucket=np.array(extra_bucket, np.int64),
            order_keys=round_keys(np.random.default_rng([self.seed, epoch, 1 + r]), 1)[0],
            steps=steps,
            trimmed=trimmed,
            dropped=dropped,
            duplicated=0,
            bucket_counts=shares.astype(np.int64),
        )

    def _leftovers(
        self, permutations: list[Permutation], pieces: list[tuple[int, int, int, int]], epoch: int
    ) -> np.ndarray:
        """Rows of the leftover ``pieces`` (``(bucket, first position, stride, count)``), in the index's leftover
        order (by aspect; with several datasets, by group of datasets first)."""
        parts = [
            self._members_at(permutations, k, first + stride * np.arange(count, dtype=np.int64), epoch)
            for k, first, stride, count in pieces
        ]
        pool = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return pool[self.index.leftover_order(pool)]

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

    def _leftover_bucket(self, chunk: np.ndarray) -> int:
        """Bucket for a block of leftover rows (in leftover order): among the index's candidates for it (the
        spec's own buckets; with ``no_upscale``, those every image covers), the nearest to its middle aspect."""
        log_aspect = self.index.log_aspect(chunk)
        middle = (log_aspect.min() + log_aspect.max()) / 2
        candidates = self.index.leftover_candidates(chunk)
        return int(candidates[np.argmin(np.abs(self._log_sizes[candidates] - middle))])
