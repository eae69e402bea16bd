"""The epoch planner: for every (seed, epoch, rank, step), the batch of manifest rows and its bucket.

A plan is a pure function of ``(bucket index, batch sizing, seed, epoch, world_size, rank, options)``.
Any step of any epoch is available on any machine, with no coordination between ranks and without
replaying earlier steps.

Batch sizes may differ by bucket (:class:`~dali_arb.plan.batching.BatchSizing`: one size, a pixel budget or a
table): bucket ``k`` serves ``b_k`` images per rank and step. With ranks in sync its unit is the global batch
``U_k = W * b_k``, else ``b_k`` on each rank; all ranks train the same bucket at a step, so a step has one batch
size on every rank, and the sequence of global batches depends only on the units ``U_k`` (elastic resume keeps it
on another world size with the same units).

An epoch costs O(K x U) time and memory to plan, not O(N), and any step's batch O(b): nothing the
size of the dataset is built per epoch. Bucket ``k`` (``n_k`` images, ``members[starts[k]:]`` of the
:class:`BucketIndex`) is shuffled by a keyed permutation (:mod:`dali_arb.plan.permute`) that gives the
image at any position directly. Blocks of ``U_k`` consecutive positions are global batches; what is left
over of each bucket (fewer than ``U_k`` images, a random subset) is handled by the :class:`LeftoverPolicy`;
the order of the blocks is another keyed permutation. What an epoch trims (``M mod T`` samples, ``T = W x
gcd(b)``, the pool unit: ``G`` for one batch size) is drawn uniformly from all samples first, O(T log K):
bucket ``k`` trims the last ``t_k`` positions of its shuffle. Every key comes from
``np.random.default_rng([seed, epoch])``.

This module imports only the standard library, NumPy and the plan layer (buckets, permute, mixture, world,
batching). :func:`make_planner` is the one way a planner is made from per-dataset bucket indexes.

Shapes: ``N`` images in the manifest, ``M`` usable, ``K`` buckets, ``b_k`` images per rank and step of bucket
``k`` (``B`` when all are equal), ``W`` world size, ``U_k = W * b_k`` (``G = W * B``) the global batch.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np

from ..errors import ConfigError, PlanError
from .batching import BatchSizing
from .buckets import BucketAssignment, BucketIndex, BucketSpec, PlannedIndex, index_dtype
from .clipindex import clip_index
from .frames import ClipTable, FrameSpec, clip_table
from .mixture import MixedIndex, check_repeats
from .permute import Permutation, moving_round, round_keys
from .world import World

__all__ = ["EpochPlan", "LeftoverPolicy", "Planner", "make_planner"]

#: Separates DUPLICATE's rounding phases (buckets smaller than a global batch) from every other keyed draw.
DUPLICATE_STREAM = 0xD0B1

#: AUTO serves PARTIAL when NEAREST would move at least one image in AUTO_PARTIAL_SHARE to another bucket's batch.
AUTO_PARTIAL_SHARE = 10


class LeftoverPolicy(str, enum.Enum):
    """What happens to the images of a bucket that do not fill a whole batch.

    A bucket rarely holds an exact multiple of its batch. With ranks in sync (the default) the unit
    of bucket ``k`` is its global batch ``U_k = world_size * b_k``; with independent ranks it is each rank's
    ``b_k``. Worked example, one rank, ``batch_size=2``, seven images and three buckets::

        768x512: a1 a2 a3      512x768: p1 p2 p3      512x512: s1

        NEAREST    7 % 2 = 1 image, drawn from all seven, is trimmed first (say a3); then [a1 a2]@768x512
                   [p1 p2]@512x768, and the leftovers p3 s1, sorted by aspect, form [p3 s1]@576x640 (the
                   bucket nearest their middle aspect)
        DROP       [a1 a2]@768x512 [p1 p2]@512x768; s1's bucket can never fill a batch, so one image is
                   trimmed as for NEAREST (say a3) and the pooled [p3 s1]@576x640 is served too
        DUPLICATE  [a1 a2] [a3 a1]@768x512 [p1 p2] [p3 p1]@512x768, and [s1 s1]@512x512 every other
                   epoch (its bucket holds 1 image of the 2 a batch needs)
        PARTIAL    [a1 a2] [a3]@768x512 [p1 p2] [p3]@512x768 [s1]@512x512: every image once, at its own
                   bucket; three steps of one image (kohya's behaviour)

    Every policy reshuffles each epoch, and whatever an epoch trims or leaves out is drawn at random, so no
    image is left out for good, however small its bucket: with NEAREST, DUPLICATE and PARTIAL every image is
    served about as often as any other over the epochs; DROP serves a bucket of ``n >= U`` images ``U * (n // U)``
    of them per epoch.

    Attributes:
        NEAREST: ``M mod T`` of the ``M`` images are trimmed first (``T = W x gcd(b_k)``: ``G`` for one batch
            size), drawn uniformly from all of them; each bucket then serves its whole batches, and the leftovers
            of all buckets are pooled, sorted by aspect ratio and cut into batches; each batch takes the bucket
            nearest (in log aspect) to the middle of its aspect range, with that bucket's batch size, so
            neighbours share a batch and crops stay small. Never squashes into the square base bucket (NovelAI's
            catch-all). No image twice; fewer than ``T`` trimmed per epoch, nothing else left out. With batch
            sizes that differ by bucket, the pool's last batch may be smaller than its bucket's (a multiple of
            ``gcd(b_k)`` per rank), and with independent ranks a rank whose share cuts into fewer batches than
            another's repeats some of its batches (counted in ``duplicated``) so that every rank has as many steps.
            When the data has a gap in aspect (say only 3:2 and 2:3 images) and the leftovers of
            the two sides do not each fill whole batches, the one batch that straddles the gap
            takes the bucket between them: the smallest worst-case crop for its images. Use
            DUPLICATE or PARTIAL where no image may ever be cropped beyond its own bucket.
        DROP: leftovers are not served this epoch; every batch is at its own bucket, except for buckets
            that cannot fill one batch (fewer than ``U_k`` images; with independent ranks, no whole batch on
            the rank): their images join the nearest-bucket pool as for NEAREST (trimming ``M mod T`` from
            all images first), and the pooled batches that hold one of them are served. No image twice.
        DUPLICATE: a bucket's last batch is filled up with images of the same bucket, served a
            second time; every image is served at its own bucket. A bucket of ``n < U`` images serves
            its one batch (each image about ``U / n`` times) in a share ``n / U`` of the epochs, by a seeded
            rounding, so that its images are served once per epoch on average like all others; in the
            other epochs they count as dropped.
        PARTIAL: each bucket's remainder (``r < U_k`` images) is served as one smaller step at its own bucket;
            nothing is trimmed and no image moves to another bucket. With ranks in sync the step has
            ``ceil(r / W)`` images per rank, the slots past ``r`` (up to ``W - 1``) repeat images of the bucket
            (counted in ``duplicated``; a rank that would get nothing gets a repeat); rank ``q`` takes slots
            ``q, q + W, ...`` so the real images are spread evenly. With independent ranks each rank serves its
            own remainder per bucket, and a rank with fewer steps than another repeats some of its batches
            (counted in ``duplicated``) so that every rank has the same number of steps.
        AUTO: the default: PARTIAL where NEAREST would serve at least one image in ten away from its own
            bucket (small datasets: ``sum_k (n_k mod U_k) >= M / 10`` over the index's per-epoch counts), else
            NEAREST. Decided from the data and the options only, so every rank and every resume agrees;
            :attr:`Planner.leftover` is the policy it resolved to.
    """

    NEAREST = "nearest"
    DROP = "drop"
    DUPLICATE = "duplicate"
    PARTIAL = "partial"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: LeftoverPolicy | str) -> LeftoverPolicy:
        """The policy named by ``value``; a ConfigError naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ConfigError(f"leftover must be one of {choices}, got {value!r}") from None


def auto_leftover(counts: np.ndarray, units: np.ndarray) -> LeftoverPolicy:
    """What AUTO resolves to for ``counts`` ``int64 (K,)`` samples per bucket and ``units`` ``int64 (K,)`` their
    global batches: PARTIAL when the leftovers (``sum(counts mod units)``) are at least a tenth of the samples.

    Why a tenth: kohya serves every bucket's remainder as a smaller batch; NEAREST is better only where its pooled
    batches are few and their aspect range narrow, i.e. where leftovers are a small share. On 37 photos at batch 4
    most buckets hold 1-5 images and most images are leftovers (a portrait was served at a landscape bucket);
    at 1M images and 19 buckets of 128 the leftovers are 0.1%."""
    counts = np.asarray(counts, np.int64)
    leftovers = int((counts % np.asarray(units, np.int64)).sum())
    total = int(counts.sum())
    return LeftoverPolicy.PARTIAL if AUTO_PARTIAL_SHARE * leftovers >= total else LeftoverPolicy.NEAREST


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``int64 (sum(lengths),)``: ``arange(s, s + l)`` for each pair of ``starts`` and ``lengths``, concatenated."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    begin = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, np.int64) - begin, lengths) + np.arange(total, dtype=np.int64)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """``int64 (L + 1,)`` offsets of ``L`` consecutive pieces of ``sizes``."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))]).astype(np.int64)


class _Blocks:
    """Blocks of rows that are not whole blocks of a bucket's shuffle: ``rows`` ``int64 (R,)`` flat, ``offsets``
    ``int64 (L + 1,)`` where each block begins, ``bucket`` ``int64 (L,)``."""

    def __init__(self, rows: np.ndarray, offsets: np.ndarray, bucket: np.ndarray) -> None:
        self.rows, self.offsets, self.bucket = rows, offsets, bucket

    @classmethod
    def empty(cls) -> _Blocks:
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))

    @classmethod
    def join(cls, parts: list[np.ndarray], bucket: list[int]) -> _Blocks:
        if not parts:
            return cls.empty()
        rows = np.concatenate(parts).astype(np.int64)
        return cls(rows, _offsets([len(p) for p in parts]), np.array(bucket, np.int64))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.bucket)

    def rank_slice(self, rank: int, world_size: int) -> _Blocks:
        """Rank ``rank``'s contiguous share of each global block (every size a multiple of ``world_size``)."""
        share = self.sizes // world_size
        rows = self.rows[_ranges(self.offsets[:-1] + rank * share, share)]
        return _Blocks(rows, _offsets(share), self.bucket)


def _leftover_bucket(index: PlannedIndex, chunk: np.ndarray, log_aspect: np.ndarray) -> int:
    """Bucket for a block of leftover rows (in leftover order, their log aspects given): among the index's
    candidates for it (the spec's own buckets; with ``no_upscale``, those every image covers), the nearest to
    its middle aspect."""
    middle = (log_aspect.min() + log_aspect.max()) / 2
    candidates = index.leftover_candidates(chunk)
    return int(candidates[np.argmin(np.abs(index.bucket_log_aspect[candidates] - middle))])


def _cut_pool(
    index: PlannedIndex, pool: np.ndarray, owner: np.ndarray, units: np.ndarray, *, starved: np.ndarray | None = None
) -> _Blocks:
    """The pool (rows in leftover order, ``owner`` the bucket of each) cut into blocks, each served at the bucket
    nearest its middle aspect (:func:`_leftover_bucket`) with that bucket's unit (``units`` ``int64 (K,)``); with
    ``starved`` (``bool (K,)``, DROP), only the blocks that hold an image of a starved bucket.

    A block of ``u`` rows starting at ``p`` takes the unit of its first image's bucket, then of the bucket its
    rows choose, until the two agree (at most four rounds; else it shrinks to its bucket's unit). With one batch
    size every block is one unit. The last block may be smaller than its bucket's unit (the ``rest`` rows)."""
    log_aspect = index.log_aspect(pool) if len(pool) else np.zeros(0)
    bounds, buckets = [0], []
    p = 0
    while p < len(pool):
        rest = len(pool) - p
        u = min(rest, int(units[owner[p]]))
        for _ in range(4):
            k = _leftover_bucket(index, pool[p : p + u], log_aspect[p : p + u])
            if min(rest, int(units[k])) == u:
                break
            u = min(rest, int(units[k]))
            k = _leftover_bucket(index, pool[p : p + u], log_aspect[p : p + u])
        u = min(u, int(units[k]))
        p += u
        bounds.append(p)
        buckets.append(k)
    offsets, bucket = np.array(bounds, np.int64), np.array(buckets, np.int64)
    if starved is None:
        return _Blocks(pool.astype(np.int64), offsets, bucket)
    kept = np.flatnonzero([starved[owner[a:z]].any() for a, z in itertools.pairwise(bounds)])
    sizes = np.diff(offsets)[kept]
    return _Blocks(pool[_ranges(offsets[kept], sizes)], _offsets(sizes), bucket[kept])


MembersAt = Callable[[int, np.ndarray], np.ndarray]  # (bucket, positions of its shuffle) -> rows


def _padded(members_at: MembersAt, counts: np.ndarray, full: np.ndarray, rem: np.ndarray, units: np.ndarray,
            phase: np.ndarray, epoch: int) -> tuple[_Blocks, int, int]:  # fmt: skip
    """DUPLICATE's last block of each bucket (``int64 (K,)`` ``counts``, whole blocks ``full``, remainders ``rem``,
    ``units``), filled up with the earliest images of its shuffle: ``(blocks (each U_k rows), duplicated,
    dropped)``. A bucket of ``n < U`` images would serve each one ``U / n`` times every epoch: it serves its block in
    a share ``n / U`` of the epochs instead (moving rounding with the seeded ``phase``), so its images are served
    once per epoch on average, like all others; when no block at all is due, the nearest to due serves."""
    small = (counts > 0) & (counts < units)
    rate = counts / units
    due = ~small | (moving_round(rate, phase, epoch) > 0)
    if small.any() and not full.any() and not due[small].any():
        progress = np.where(small, np.mod(rate * epoch + phase, 1.0) + rate, -1.0)
        due[int(np.argmax(progress))] = True
    blocks: list[np.ndarray] = []
    duplicated = 0
    padded = np.flatnonzero((rem > 0) & due)
    for k in padded.tolist():
        pad = np.arange(units[k] - rem[k], dtype=np.int64) % counts[k]  # earliest images of the shuffle
        positions = np.concatenate([np.arange(full[k] * units[k], counts[k], dtype=np.int64), pad])
        blocks.append(members_at(k, positions))
        duplicated += len(pad)
    return _Blocks.join(blocks, padded.tolist()), duplicated, int(counts[~due].sum())


def _partial(members_at: MembersAt, counts: np.ndarray, full: np.ndarray, rem: np.ndarray, units: np.ndarray,
             world_size: int) -> tuple[_Blocks, int]:  # fmt: skip
    """PARTIAL's last block of each bucket with ranks in sync: its ``r`` remaining images and ``W * ceil(r / W) - r``
    repeats (the earliest of its shuffle), laid out so that rank ``q``'s contiguous share is slots ``q, q + W, ...``:
    ``(blocks, duplicated)``."""
    W = world_size
    blocks: list[np.ndarray] = []
    duplicated = 0
    partial = np.flatnonzero(rem > 0)
    for k in partial.tolist():
        per_rank = -(-int(rem[k]) // W)
        pad = np.arange(W * per_rank - rem[k], dtype=np.int64) % counts[k]
        slots = members_at(k, np.concatenate([np.arange(full[k] * units[k], counts[k], dtype=np.int64), pad]))
        blocks.append(slots.reshape(per_rank, W).T.reshape(-1))
        duplicated += len(pad)
    return _Blocks.join(blocks, partial.tolist()), duplicated


class EpochPlan:
    """One rank's plan for one epoch, evaluated on demand: :meth:`rows_at`, :meth:`bucket_at` and
    :meth:`batch_size_at` cost O(b) and O(log K) for any step; :attr:`flat_rows` (with :attr:`row_offsets`),
    :attr:`rows`, :attr:`bucket` and :attr:`batch_sizes` materialise the whole epoch.

    Attributes:
        sizes: ``int64 (K, 2)`` bucket ``(height, width)``.
        frames: ``int64 (K,)`` bucket frame counts when the samples are clips, else None (:meth:`frames_at`).
        epoch, rank, world_size: what the plan is for.
        batch_size: the one batch size of every bucket (an ``int``), ``None`` when it varies by bucket. Steps may
            still be smaller with ``leftover="partial"`` (and the last pooled batch of NEAREST with batch sizes
            that vary): :meth:`batch_size_at` is the truth.
        max_batch: the largest batch of any step of any epoch (what a pipeline is built for; the same in every
            epoch).
        leftover: the :class:`LeftoverPolicy` this plan follows (never AUTO).
        offset: ``rank * batch_size`` (position of this rank's samples inside a whole global batch) with one
            batch size, ``None`` when it varies by bucket; :meth:`offset_at` is exact at every step (a smaller
            PARTIAL or pooled step too).
        trimmed, dropped, duplicated: images trimmed / not served / served twice this epoch,
            over all ranks.
        bucket_counts: ``int64 (R, K)`` images per bucket this epoch, after trimming, for each unit
            that batches are cut from: ``R = 1`` (all ranks together) with ranks in sync, else
            ``R = world_size``. ``counts // unit`` are whole batches, ``counts % unit`` leftovers.
    """

    def __init__(self, *, index: PlannedIndex, permutations: list[Permutation], full_starts: np.ndarray,
                 first_position: np.ndarray, stride: int, pitch: np.ndarray, width: np.ndarray, extra: _Blocks,
                 order: _BlockOrder, steps: int, epoch: int, rank: int, world_size: int,
                 batch_size: int | None, max_batch: int, leftover: LeftoverPolicy, trimmed: int, dropped: int,
                 duplicated: int, bucket_counts: np.ndarray) -> None:  # fmt: skip
        self._index = index
        self._permutations = permutations  # (K,) the shuffle of each bucket this epoch
        self._full_starts = full_starts  # int64 (K + 1,) first full block of each bucket
        self._first_position = first_position  # int64 (K,) this rank's first position in each bucket
        # position of slot i of full block j of bucket k = first[k] + stride * (j * pitch[k] + i), i < width[k]
        self._stride, self._pitch, self._width = stride, pitch, width
        self._extra = extra  # this rank's rows of the pooled / padded / partial blocks
        self._n_real = int(full_starts[-1]) + len(extra)  # blocks past these repeat them (independent ranks)
        self._order = order
        self._steps = steps
        self.sizes = index.sizes
        self.frames = getattr(index, "frames", None)  # int64 (K,) frames of each bucket (clips), or None
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.batch_size, self.max_batch, self.leftover = batch_size, max_batch, leftover
        self.trimmed, self.dropped, self.duplicated = trimmed, dropped, duplicated
        self.bucket_counts = bucket_counts
        self.offset = None if batch_size is None else rank * batch_size
        self._uniform = batch_size is not None and bool((extra.sizes == batch_size).all())

    def __len__(self) -> int:
        return self._steps

    def _check(self, step: int) -> int:
        if not 0 <= step < self._steps:
            raise IndexError(f"step {step} is outside epoch {self.epoch}, which has {self._steps} steps")
        return int(step)

    def _blocks(self, steps: np.ndarray) -> np.ndarray:
        """``int64`` the real block each of ``steps`` serves (repeated blocks map onto the ones they repeat)."""
        blocks = self._order(steps)
        return np.where(blocks >= self._n_real, (blocks - self._n_real) % max(self._n_real, 1), blocks)

    def _buckets_of(self, blocks: np.ndarray) -> np.ndarray:
        full = int(self._full_starts[-1])
        bucket = np.searchsorted(self._full_starts, np.minimum(blocks, full - 1), side="right") - 1
        if len(self._extra):
            extra = blocks >= full
            bucket[extra] = self._extra.bucket[blocks[extra] - full]
        return bucket

    def _sizes_of(self, blocks: np.ndarray) -> np.ndarray:
        """``int64`` rows of each of ``blocks`` on this rank."""
        full = int(self._full_starts[-1])
        sizes = self._width[self._buckets_of(blocks)]
        extra = blocks >= full
        if extra.any():
            sizes[extra] = self._extra.sizes[blocks[extra] - full]
        return sizes

    def bucket_at(self, step: int) -> int:
        """Bucket index of ``step`` (into :attr:`sizes`)."""
        return int(self._buckets_of(self._blocks(np.array([self._check(step)], np.int64)))[0])

    def batch_size_at(self, step: int) -> int:
        """This rank's batch size at ``step`` (the same on every rank with ranks in sync)."""
        return int(self._sizes_of(self._blocks(np.array([self._check(step)], np.int64)))[0])

    def offset_at(self, step: int) -> int:
        """Position of this rank's first sample inside the global batch of ``step``: ``rank * batch_size_at``."""
        return self.rank * self.batch_size_at(step)

    def size(self, step: int) -> tuple[int, int]:
        """``(height, width)`` of step ``step``."""
        h, w = self.sizes[self.bucket_at(step)]
        return int(h), int(w)

    def frames_at(self, step: int) -> int:
        """Frames of every sample of ``step``: its bucket's frame count (1 when the samples are images)."""
        return 1 if self.frames is None else int(self.frames[self.bucket_at(step)])

    def rows_at(self, step: int) -> np.ndarray:
        """``int64 (b,)`` manifest rows of ``step``, ``b = batch_size_at(step)``; with clips (``frames`` given to
        :func:`make_planner`) the **clip ids** (indices into :attr:`Planner.clips`)."""
        return self._rows_of(self._blocks(np.array([self._check(step)], np.int64)))[0]

    def _rows_of(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows int64 (R,), offsets int64 (len(blocks) + 1,))``: the rows of ``blocks``, one after the other."""
        full = int(self._full_starts[-1])
        bucket, sizes = self._buckets_of(blocks), self._sizes_of(blocks)
        offsets = _offsets(sizes)
        rows = np.empty(int(offsets[-1]), np.int64)
        extra = blocks >= full
        if extra.any():
            at = blocks[extra] - full
            rows[_ranges(offsets[:-1][extra], sizes[extra])] = self._extra.rows[
                _ranges(self._extra.offsets[at], sizes[extra])
            ]
        for k in np.unique(bucket[~extra]).tolist():
            chosen = np.flatnonzero((bucket == k) & ~extra)
            block = blocks[chosen] - self._full_starts[k]  # the block's number inside its bucket
            w = int(self._width[k])
            positions = self._first_position[k] + self._stride * (
                block[:, None] * self._pitch[k] + np.arange(w, dtype=np.int64)[None, :]
            )
            found = self._index.bucket_rows(k, self._permutations[k](positions), self.epoch)
            rows[offsets[chosen][:, None] + np.arange(w, dtype=np.int64)[None, :]] = found
        return rows, offsets

    @cached_property
    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        return self._rows_of(self._blocks(np.arange(self._steps, dtype=np.int64)))

    @property
    def flat_rows(self) -> np.ndarray:
        """``int64 (R,)`` manifest row of every sample of every step, step after step (O(N / W): for tools and
        tests); step ``i`` is ``flat_rows[row_offsets[i]:row_offsets[i + 1]]``."""
        return self._all[0]

    @property
    def row_offsets(self) -> np.ndarray:
        """``int64 (steps + 1,)`` where each step begins in :attr:`flat_rows`."""
        return self._all[1]

    @cached_property
    def batch_sizes(self) -> np.ndarray:
        """``int64 (steps,)`` this rank's batch size at every step."""
        return self._sizes_of(self._blocks(np.arange(self._steps, dtype=np.int64)))

    @cached_property
    def rows(self) -> np.ndarray:
        """``int64 (steps, B)`` manifest row of every sample of every step, when every step has the same size
        ``B``; a ValueError otherwise: read :attr:`flat_rows` and
        :attr:`row_offsets` (or :meth:`rows_at`)."""
        if not self._uniform:
            raise ValueError(
                "this plan's steps differ in size (batch sizes by bucket, or leftover='partial'): "
                "read flat_rows and row_offsets, or rows_at(step)"
            )
        return self.flat_rows.reshape(self._steps, -1)

    @cached_property
    def bucket(self) -> np.ndarray:
        """``int16 (steps,)`` bucket index of every step (``int32`` beyond 32,767 buckets)."""
        blocks = self._blocks(np.arange(self._steps, dtype=np.int64))
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
        batch_size: samples per batch per rank: an ``int`` (every bucket the same) or a
            :class:`~dali_arb.plan.batching.BatchSizing` (a pixel budget or a table: ``b_k`` per bucket).
        world: this rank's :class:`World`.
        seed: shared by every rank; epoch ``e`` draws its keys from ``np.random.default_rng([seed, e])``.
        leftover: a :class:`LeftoverPolicy` (or its value); AUTO (the default) resolves to PARTIAL or NEAREST
            (:attr:`leftover`; :attr:`leftover_requested` keeps what was given).
        sync_ranks: True (default): every rank trains the same bucket at a given step, so all ranks
            do the same work per step (no stragglers). Global batches of ``U_k`` images are cut per
            bucket, so leftovers are up to ``U_k - 1`` per bucket. False: each rank buckets its own
            share independently (NovelAI), leftovers up to ``b_k - 1`` per bucket per rank, but
            ranks may train different resolutions at the same step.
        largest_first: serve a batch of the largest-area bucket as step 0 of every epoch, so an
            out-of-memory error shows at once rather than hours later.

    Attributes:
        batch: ``int64 (K,)`` images per rank and step of each bucket (``b_k``).
        units: ``int64 (K,)`` what each bucket's batches are cut by: ``W * b_k`` in sync, else ``b_k``.
        batch_size: the one batch size (``int``) or ``None`` when it varies by bucket.
        global_batch: ``W * batch_size``, or ``None`` when it varies.
        max_batch: the largest batch of any step of any epoch (what a pipeline is built for).
    """

    def __init__(
        self,
        index: PlannedIndex | BucketAssignment,
        *,
        batch_size: int | BatchSizing,
        world: World | None = None,
        seed: int = 0,
        leftover: LeftoverPolicy | str = LeftoverPolicy.AUTO,
        sync_ranks: bool = True,
        largest_first: bool = True,
    ) -> None:
        if isinstance(batch_size, BatchSizing):
            self.sizing = batch_size
        elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        else:
            self.sizing = BatchSizing(batch_size=int(batch_size))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.leftover_requested = LeftoverPolicy.parse(leftover)
        self.world = world if world is not None else World()
        if not sync_ranks and self.leftover_requested is LeftoverPolicy.DUPLICATE:
            raise ConfigError("leftover='duplicate' needs sync_ranks=True; use 'nearest', 'drop' or 'partial'")
        self.index = BucketIndex.of(index) if isinstance(index, BucketAssignment) else index
        self.seed = int(seed)
        self.sync_ranks = bool(sync_ranks)
        self.largest_first = bool(largest_first)
        self._sizes = self.index.sizes
        #: ``int64 (K,)`` frames of each bucket when the samples are clips (a ClipIndex), else None
        self.frames = getattr(self.index, "frames", None)
        #: the ClipTable of the clips planned (``rows_at`` gives indices into it), None for images
        self.clips = None
        #: the FrameSpec the clips were cut by, None for images
        self.frame_spec = None
        self._area = self._sizes[:, 0] * self._sizes[:, 1] * (1 if self.frames is None else self.frames)
        W = self.world.world_size
        self.batch = self._per_bucket()
        self.units = self.batch * W if self.sync_ranks else self.batch.copy()
        self.batch_size = self.sizing.fixed
        self.global_batch = None if self.batch_size is None else self.batch_size * W
        self._trim_unit = W * math.gcd(*self.batch.tolist()) if len(self.batch) else W  # T: the pool's unit
        self.leftover = self.leftover_requested
        if self.leftover is LeftoverPolicy.AUTO:
            self.leftover = auto_leftover(self.index.counts(), self.batch * W)
        self.max_batch = self._largest_step()
        self._duplicate_phase = np.random.default_rng([self.seed, DUPLICATE_STREAM]).random(len(self._sizes))
        least = 1 if self.leftover is LeftoverPolicy.PARTIAL else self._trim_unit
        if self.num_images < least:
            raise PlanError(f"only {self.num_images} usable images, fewer than one global batch {self._unit_text()}; "
                            "lower the batch size or add images, or use leftover='partial'")  # fmt: skip
        self._cache: dict[int, EpochPlan] = {}  # the last two epochs (prefetch straddles epoch ends)

    def _unit_text(self) -> str:
        W = self.world.world_size
        if self.batch_size is not None:
            return f"(world_size {W} x batch_size {self.batch_size} = {self.global_batch})"
        return f"(world_size {W} x the common divisor {self._trim_unit // W} of the batch sizes = {self._trim_unit})"

    def _per_bucket(self) -> np.ndarray:
        """``int64 (K,)`` ``b_k``: the sizing's, for every bucket that may be served (a table must name each bucket
        that holds images and each of the spec's own; others, never a batch's own, get the table's smallest)."""
        if self.sizing.batch_sizes is None:
            return self.sizing.per_bucket(self._sizes, self.frames)
        num_base = getattr(self.index, "num_base", len(self._sizes))
        needed = self.index.counts() > 0
        needed[:num_base] = True
        batch = np.ones(len(self._sizes), np.int64)
        batch[needed] = self.sizing.per_bucket(
            self._sizes[needed], None if self.frames is None else self.frames[needed]
        )
        batch[~needed] = batch[needed].min() if needed.any() else 1
        return batch

    def _largest_step(self) -> int:
        """The largest batch any step of any epoch can serve (what a pipeline is built for): a bucket's own batches
        hold at most its images shared over the ranks (``duplicate`` pads them to its full batch), and a pooled
        block (``nearest``; ``drop`` and ``duplicate`` pool small buckets) at most every image over the ranks; not the batch of a bucket no image reaches (a huge budget would size the
        pipeline for tens of thousands of samples). ``index.counts()`` is the most an epoch serves per bucket."""
        if not len(self.batch):
            return 1
        counts = np.asarray(self.index.counts(), np.int64)
        share = self.world.world_size if self.sync_ranks else 1
        fits = -(-counts // share)  # ceil: a bucket's images over the ranks
        padded = self.leftover is LeftoverPolicy.DUPLICATE
        own = np.where(counts > 0, self.batch if padded else np.minimum(self.batch, fits), 0)
        pools = (
            self.leftover is not LeftoverPolicy.PARTIAL
        )  # nearest pools leftovers; drop and duplicate pool small buckets
        pooled = min(int(self.batch.max()), -(-int(counts.sum()) // share)) if pools else 0
        return max(1, int(own.max()), pooled)

    @property
    def assignment(self) -> PlannedIndex:
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
        if len(plan) == 0:  # every policy serves at least one block of the (at least T) samples
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
        least = 1 if self.leftover is LeftoverPolicy.PARTIAL else self._trim_unit
        if int(counts.sum()) < least:
            raise PlanError(
                f"epoch {epoch} serves only {int(counts.sum())} samples (fractional repeats), fewer than one global "
                f"batch ({least}); lower the batch size or raise the repeats"
            )
        return counts

    def _epoch_keys(self, epoch: int, counts: np.ndarray) -> tuple[np.random.Generator, list[Permutation]]:
        """The epoch's generator and the shuffle of every bucket (keys drawn first, in bucket order)."""
        rng = np.random.default_rng([self.seed, epoch])
        keys = round_keys(rng, len(self._sizes))
        return rng, [Permutation(int(n), k) for n, k in zip(counts.tolist(), keys)]

    def _trimmed(self, counts: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``int64 (K,)`` samples trimmed from each bucket: ``M mod T`` of all ``M``, drawn uniformly from all of
        them (the first positions of a keyed permutation of ``[0, M)``: O(T log K)), so that an image of a small
        bucket is trimmed no more often than any other. Bucket ``k`` trims the last ones of its shuffle."""
        total = int(counts.sum())
        picks = Permutation(total, keys)(np.arange(total % self._trim_unit, dtype=np.int64))
        return np.bincount(np.searchsorted(np.cumsum(counts), picks, side="right"), minlength=len(counts))

    def _members_at(self, permutations: list[Permutation], k: int, positions: np.ndarray, epoch: int) -> np.ndarray:
        """``int64`` rows at ``positions`` of bucket ``k``'s shuffle in ``epoch``."""
        return self.index.bucket_rows(k, permutations[k](positions), epoch)

    # -- sync: every rank serves one slice of the same global batch at each step ------------------
    def _plan_sync(self, epoch: int) -> EpochPlan:
        W, r, U = self.world.world_size, self.world.rank, self.units
        counts = self._epoch_counts(epoch)
        rng, permutations = self._epoch_keys(epoch, counts)
        order_keys, trim_keys = round_keys(rng, 2)
        small = (counts > 0) & (counts < U)  # buckets that cannot fill one global batch
        policy = self.leftover
        trim = policy is LeftoverPolicy.NEAREST or (policy is LeftoverPolicy.DROP and small.any())
        kept = counts - (self._trimmed(counts, trim_keys) if trim else 0)
        full = kept // U
        rem = kept - full * U
        dropped = duplicated = 0

        def members_at(k: int, positions: np.ndarray) -> np.ndarray:
            return self._members_at(permutations, k, positions, epoch)

        if policy is LeftoverPolicy.DUPLICATE:
            extra, duplicated, dropped = _padded(members_at, counts, full, rem, U, self._duplicate_phase, epoch)
        elif policy is LeftoverPolicy.PARTIAL:
            extra, duplicated = _partial(members_at, counts, full, rem, U, W)
        elif trim:  # NEAREST, or DROP with small buckets: the pool fills whole global batches
            pieces = [(k, full[k] * U[k], 1, rem[k]) for k in np.flatnonzero(rem).tolist()]
            pool, owner = self._leftovers(permutations, pieces, epoch)
            extra = self._cut(pool, owner, U, starved=full == 0 if policy is LeftoverPolicy.DROP else None)
            dropped = len(pool) - len(extra.rows)
        else:  # DROP, every bucket fills a global batch: each one's remainder sits out
            extra = _Blocks.empty()
            dropped = int(rem.sum())
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full,
            first_position=r * self.batch,
            stride=1,
            pitch=U,
            extra=extra.rank_slice(r, W),
            order_keys=order_keys,
            steps=None,
            trimmed=int((counts - kept).sum()),
            dropped=dropped,
            duplicated=duplicated,
            bucket_counts=kept[None, :],
        )

    # -- independent: each rank buckets its own share (NovelAI) ---------------------------------
    def _plan_independent(self, epoch: int) -> EpochPlan:
        W, r, b = self.world.world_size, self.world.rank, self.batch
        counts = self._epoch_counts(epoch)
        K = len(counts)
        rng, permutations = self._epoch_keys(epoch, counts)
        # One sequence of all images but M % T of them, trimmed uniformly from all (none with PARTIAL): the buckets
        # in a random order, each shuffled; position q goes to rank q % W, so every rank gets (M - M % T) / W.
        bucket_order = rng.permutation(K)
        trim_keys = round_keys(rng, 1)[0]
        partial = self.leftover is LeftoverPolicy.PARTIAL
        kept = counts if partial else counts - self._trimmed(counts, trim_keys)
        sequence_start = np.empty(K, np.int64)
        sequence_start[bucket_order] = np.cumsum(kept[bucket_order]) - kept[bucket_order]
        first = (np.arange(W)[:, None] - sequence_start[None, :]) % W  # (W, K) each rank's first position
        shares = np.maximum(0, -((first - kept[None, :]) // W))  # (W, K) ceil((kept - first) / W)
        full = shares // b[None, :]
        drop = self.leftover is LeftoverPolicy.DROP
        starved = full == 0  # (W, K) a rank's buckets with no whole batch: DROP serves their pooled batches

        def extra_of(q: int) -> _Blocks:  # rank q's blocks beyond its whole ones
            left = shares[q] - full[q] * b
            ks = np.flatnonzero(left).tolist()
            starts = [int(first[q, k] + W * full[q, k] * b[k]) for k in ks]
            if partial:  # each remainder is one smaller batch at its own bucket
                parts = [
                    self._members_at(permutations, k, s + W * np.arange(left[k]), epoch) for k, s in zip(ks, starts)
                ]
                return _Blocks.join(parts, ks)
            pool, owner = self._leftovers(permutations, [(k, s, W, int(left[k])) for k, s in zip(ks, starts)], epoch)
            return self._cut(pool, owner, b, starved=starved[q] if drop else None)

        extra = extra_of(r)
        steps, repeats, dropped, duplicated = None, 0, 0, 0
        if drop:  # ranks serve different numbers of batches: all stop at the fewest
            extras = [extra_of(q) if (starved[q] & (shares[q] > 0)).any() else _Blocks.empty() for q in range(W)]
            steps = int(min(full[q].sum() + len(extras[q]) for q in range(W)))
            served = sum(self._served(q, full[q], extras[q], steps, epoch) for q in range(W))
            dropped = int(kept.sum()) - served
        elif partial or self.batch_size is None:  # ranks may cut different numbers of batches: the fewer repeat
            extras = [extra if q == r else extra_of(q) for q in range(W)]
            n_real = [int(full[q].sum()) + len(extras[q]) for q in range(W)]
            if min(n_real) == 0:
                raise PlanError(
                    f"with sync_ranks=False, rank {n_real.index(0)} of {W} gets no image this epoch ({self.num_images} "
                    "usable images); use sync_ranks=True (a remainder is then shared out and padded with repeats) or "
                    "fewer ranks"
                )
            repeats = max(n_real) - n_real[r]
            for q in range(W):
                sizes = np.concatenate([np.repeat(b, full[q]), extras[q].sizes])
                duplicated += int(sizes[np.arange(max(n_real) - n_real[q]) % n_real[q]].sum())
        return self._plan(
            epoch=epoch,
            permutations=permutations,
            full=full[r],
            first_position=first[r].astype(np.int64),
            stride=W,
            pitch=b,
            extra=extra,
            repeats=repeats,
            order_keys=self._rank_order_keys(epoch, r),
            steps=steps,
            trimmed=int((counts - kept).sum()),
            dropped=dropped,
            duplicated=duplicated,
            bucket_counts=shares.astype(np.int64),
        )

    def _rank_order_keys(self, epoch: int, rank: int) -> np.ndarray:
        return round_keys(np.random.default_rng([self.seed, epoch, 1 + rank]), 1)[0]

    def _served(self, q: int, full: np.ndarray, extra: _Blocks, steps: int, epoch: int) -> int:
        """Images rank ``q`` serves in its first ``steps`` steps (independent DROP)."""
        if self.batch_size is not None:
            return steps * self.batch_size
        full_starts = _offsets(full)
        order = _BlockOrder(int(full_starts[-1]) + len(extra), self._rank_order_keys(epoch, q),
                            self._largest_block(full, full_starts, extra.bucket))  # fmt: skip
        blocks = order(np.arange(steps, dtype=np.int64))
        sizes = np.concatenate([np.repeat(self.batch, full), extra.sizes])
        return int(sizes[blocks].sum())

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

    def _cut(
        self, pool: np.ndarray, owner: np.ndarray, units: np.ndarray, *, starved: np.ndarray | None = None
    ) -> _Blocks:
        """:func:`_cut_pool` of a pool that is a multiple of ``T`` (of ``T / W`` per rank with independent ranks)."""
        if len(pool) % (self._trim_unit // (1 if self.sync_ranks else self.world.world_size)):
            raise AssertionError(f"a leftover pool of {len(pool)} is no whole number of blocks of {self._trim_unit}")
        return _cut_pool(self.index, pool, owner, units, starved=starved)

    def _largest_block(self, full: np.ndarray, full_starts: np.ndarray, extra_bucket: np.ndarray) -> int | None:
        """The lowest-numbered block of the largest area (the first full block of a bucket, or an extra block), or
        ``None`` without ``largest_first``."""
        if not self.largest_first or int(full_starts[-1]) + len(extra_bucket) == 0:
            return None
        candidates = [(-int(self._area[k]), int(full_starts[k])) for k in np.flatnonzero(full).tolist()]
        candidates += [(-int(self._area[k]), int(full_starts[-1]) + i) for i, k in enumerate(extra_bucket.tolist())]
        return min(candidates)[1]

    def _plan(
        self,
        *,
        epoch: int,
        full: np.ndarray,
        extra: _Blocks,
        order_keys: np.ndarray,
        steps: int | None,
        repeats: int = 0,
        **given,
    ) -> EpochPlan:
        """The plan from this rank's full blocks per bucket ``full (K,)``, its extra blocks and ``repeats`` blocks
        that repeat its first ones (independent ranks with fewer blocks than another)."""
        full_starts = _offsets(full)
        n_blocks = int(full_starts[-1]) + len(extra) + repeats
        order = _BlockOrder(n_blocks, order_keys, self._largest_block(full, full_starts, extra.bucket))
        return EpochPlan(
            index=self.index,
            full_starts=full_starts,
            width=self.batch,
            extra=extra,
            order=order,
            steps=n_blocks if steps is None else min(steps, n_blocks),
            epoch=epoch,
            rank=self.world.rank,
            world_size=self.world.world_size,
            batch_size=self.batch_size,
            max_batch=self.max_batch,
            leftover=self.leftover,
            **given,
        )


def make_planner(
    indexes: Sequence[PlannedIndex | BucketAssignment],
    specs: Sequence[BucketSpec],
    *,
    repeats: Sequence[float] | float | None = None,
    seed: int = 0,
    batch_size: int | BatchSizing,
    world: World | None = None,
    leftover: LeftoverPolicy | str = LeftoverPolicy.AUTO,
    sync_ranks: bool = True,
    frames: FrameSpec | None = None,
    videos: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> Planner:
    """THE planner factory: a :class:`Planner` over ``D`` datasets from each one's :class:`BucketIndex` (or
    :class:`BucketAssignment`) and :class:`BucketSpec`, with ``repeats`` (one per dataset, ``None``: all 1;
    validated by :func:`~dali_arb.plan.mixture.check_repeats`) and ``batch_size`` (an ``int`` or a
    :class:`~dali_arb.plan.batching.BatchSizing`). One dataset served once plans from its own index;
    otherwise the datasets plan as one :class:`~dali_arb.plan.mixture.MixedIndex` (its rows are global rows).
    The loader (``loader.planning.build_planner``), the bucket report and the benchmark all make it here.

    With ``frames`` (a :class:`~dali_arb.plan.frames.FrameSpec`) the samples are clips: ``videos`` gives each
    dataset's ``(frames, fps, duration)`` columns (``(N_d,)`` arrays; frames <= 0 or NaN for images), cut into a
    :class:`~dali_arb.plan.frames.ClipTable` each and planned over buckets ``(frames, height, width)``
    (:mod:`dali_arb.plan.clipindex`); :attr:`Planner.clips` is the table of all datasets (global rows), and an
    epoch's ``rows_at`` gives clip ids into it."""
    if len(indexes) != len(specs) or not indexes:
        raise ConfigError(f"give one bucket index and one bucket spec per dataset, got {len(indexes)} and {len(specs)}")
    weights = check_repeats(repeats, len(indexes))
    grouped = [BucketIndex.of(ix) if isinstance(ix, BucketAssignment) else ix for ix in indexes]
    table = None
    if frames is not None:
        grouped, table = _clip_indexes(grouped, frames, videos)
    if len(grouped) == 1 and weights == (1.0,):
        index: PlannedIndex = grouped[0]
    else:
        index = MixedIndex(grouped, weights, list(specs), seed=seed)
    planner = Planner(index, batch_size=batch_size, world=world, seed=seed, leftover=leftover, sync_ranks=sync_ranks)
    planner.clips, planner.frame_spec = table, frames
    return planner


def _clip_indexes(
    grouped: list[PlannedIndex], spec: FrameSpec, videos: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None
) -> tuple[list[PlannedIndex], ClipTable]:
    """Each dataset's :class:`~dali_arb.plan.clipindex.ClipIndex` and the clip table of all of them (global rows)."""
    if not isinstance(spec, FrameSpec):
        raise ConfigError(f"frames must be a FrameSpec, got {type(spec).__name__}")
    if videos is None or len(videos) != len(grouped):
        raise ConfigError(
            f"give the (frames, fps, duration) columns of each of the {len(grouped)} datasets with frames="
        )
    indexes, tables, offset = [], [], 0
    for spatial, (count, fps, duration) in zip(grouped, videos):
        if not isinstance(spatial, BucketIndex):
            raise ConfigError("frames= plans from one bucket index per dataset (BucketIndex or BucketAssignment)")
        if len(count) != spatial.num_images:
            raise ConfigError(f"the video columns have {len(count)} rows, the bucket index {spatial.num_images}")
        table = clip_table(count, fps, duration, spec)
        indexes.append(clip_index(spatial, table, spec))
        tables.append(ClipTable(row=table.row + offset, length=table.length, start=table.start))
        offset += spatial.num_images
    joined = ClipTable(*(np.concatenate([getattr(t, name) for t in tables]) for name in ("row", "length", "start")))
    return indexes, joined
