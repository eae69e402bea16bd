"""A straightforward per-image planner: the test oracle for :class:`dali_arb.Planner`.

It loops over images in Python like NovelAI's bucket manager, evaluates the keyed shuffles with a
scalar Feistel network written from its definition, and draws the same random numbers in the same
order as the planner, so both must produce identical plans. Slow on purpose (readable); used by the
tests and by ``benchmarks/`` as the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from dali_arb.plan.batching import BatchSizing
from dali_arb.plan.buckets import BucketAssignment
from dali_arb.plan.permute import ROUNDS
from dali_arb.plan.planner import DUPLICATE_STREAM, LeftoverPolicy

__all__ = ["feistel", "reference_plan"]

_MASK64 = (1 << 64) - 1


def feistel(n: int, keys: list[int]) -> Callable[[int], int]:
    """The bijection of ``range(n)`` that :class:`dali_arb.plan.permute.Permutation` computes, one value at a time."""
    bits = max(2, max(n - 1, 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, (1 << (bits // 2)) - 1

    def mix(x: int) -> int:  # splitmix64's finaliser
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    def encrypt(x: int) -> int:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix(right ^ key) & mask)
        return (left << half) | right

    def permute(position: int) -> int:
        value = encrypt(position)
        while value >= n:
            value = encrypt(value)
        return value

    return permute


def _batch_per_bucket(assignment: BucketAssignment, batch_size: int | BatchSizing) -> list[int]:
    """``b_k`` of every bucket, as the planner decides it (a table: the buckets that hold images and the spec's own;
    any other gets the table's smallest)."""
    sizing = batch_size if isinstance(batch_size, BatchSizing) else BatchSizing(batch_size=batch_size)
    sizes = assignment.sizes
    if sizing.batch_sizes is None:
        return [int(b) for b in sizing.per_bucket(sizes)]
    used = {int(k) for k in assignment.bucket.tolist() if k >= 0}
    needed = [k for k in range(len(sizes)) if k < assignment.num_base or k in used]
    table = {k: int(b) for k, b in zip(needed, sizing.per_bucket(sizes[needed]))}
    return [table.get(k, min(table.values())) for k in range(len(sizes))]


def reference_plan(
    assignment: BucketAssignment,
    *,
    batch_size: int | BatchSizing,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    leftover: str = "nearest",
    sync_ranks: bool = True,
    largest_first: bool = True,
) -> tuple[list[list[int]], list[int]]:
    """Rows of every step (``steps`` lists of rows, ``b`` of the step's bucket, or fewer) and the bucket of every
    step. ``batch_size`` is an int or a :class:`~dali_arb.plan.batching.BatchSizing` (``b_k`` per bucket)."""
    policy = LeftoverPolicy(leftover)
    bucket = assignment.bucket.tolist()
    log_aspect = assignment.log_aspect.tolist()
    sizes = assignment.sizes.tolist()
    bucket_log = assignment.bucket_log_aspect
    K = len(sizes)
    W = world_size
    batch = _batch_per_bucket(assignment, batch_size)
    units = [W * b for b in batch] if sync_ranks else list(batch)  # what a bucket's batches are cut by
    T = W * math.gcd(*batch)  # what NEAREST and DROP trim to a multiple of
    counts = [0] * K
    for k in bucket:
        if k >= 0:
            counts[k] += 1
    if policy is LeftoverPolicy.AUTO:
        leftovers = sum(n % (W * b) for n, b in zip(counts, batch))
        policy = LeftoverPolicy.PARTIAL if 10 * leftovers >= sum(counts) else LeftoverPolicy.NEAREST

    def keys_of(rng: np.random.Generator, count: int) -> list[list[int]]:
        return rng.integers(0, 2**64, size=(count, ROUNDS), dtype=np.uint64).tolist()

    def leftover_bucket(chunk: list[int]) -> int:
        values = [log_aspect[row] for row in chunk]
        middle = (min(values) + max(values)) / 2
        if assignment.no_upscale:
            h = min(int(assignment.heights[row]) for row in chunk)
            w = min(int(assignment.widths[row]) for row in chunk)
            candidates = [k for k, (bh, bw) in enumerate(sizes) if bh <= h and bw <= w]
            if not candidates:
                areas = [bh * bw for bh, bw in sizes]
                candidates = [areas.index(min(areas))]
        else:
            candidates = list(range(assignment.num_base))
        best, best_distance = candidates[0], abs(bucket_log[candidates[0]] - middle)
        for k in candidates[1:]:
            distance = abs(bucket_log[k] - middle)
            if distance < best_distance:
                best, best_distance = k, distance
        return best

    def by_bucket(rows: list[int]) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in range(K)]
        for row in rows:
            groups[bucket[row]].append(row)
        return groups

    def cut(pool: list[int], unit: list[int]) -> list[tuple[list[int], int]]:
        """The pool (in aspect order) cut into blocks: a block starting at ``p`` takes the unit of its first image's
        bucket, then of the bucket its rows choose, until the two agree (four rounds at most, then it shrinks to its
        bucket's unit); the last block may be short."""
        out = []
        p = 0
        while p < len(pool):
            rest = len(pool) - p
            u = min(rest, unit[bucket[pool[p]]])
            for _ in range(4):
                k = leftover_bucket(pool[p : p + u])
                if min(rest, unit[k]) == u:
                    break
                u = min(rest, unit[k])
                k = leftover_bucket(pool[p : p + u])
            u = min(u, unit[k])
            out.append((pool[p : p + u], k))
            p += u
        return out

    def blocks_of(
        groups: list[list[int]], unit: list[int], starved: list[bool] | None
    ) -> list[tuple[list[int], int, bool]]:
        """Whole blocks of each bucket (bucket order), then the policy's blocks of what is left (NEAREST, DROP with
        ``starved``: the pooled blocks that hold an image of a starved bucket; DUPLICATE: padded, if due; PARTIAL:
        the rest, with ranks in sync padded to a multiple of W and dealt out round-robin). The flag: dealt out."""
        blocks = []
        rests = []
        for k, members in enumerate(groups):
            whole = len(members) // unit[k]
            blocks += [(members[j * unit[k] : (j + 1) * unit[k]], k, False) for j in range(whole)]
            if members[whole * unit[k] :]:
                rests.append((k, members[whole * unit[k] :], members))
        if policy is LeftoverPolicy.DUPLICATE:
            for k, rest, members in rests:
                if due[k]:
                    blocks.append((rest + [members[i % len(members)] for i in range(unit[k] - len(rest))], k, False))
        elif policy is LeftoverPolicy.PARTIAL:
            for k, rest, members in rests:
                pad = (-len(rest)) % W if sync_ranks else 0
                blocks.append((rest + [members[i % len(members)] for i in range(pad)], k, sync_ranks))
        elif policy is LeftoverPolicy.NEAREST or starved is not None:
            pool = sorted((row for _, rest, _ in rests for row in rest), key=lambda row: log_aspect[row])
            for chunk, k in cut(pool, unit):
                if starved is None or any(starved[bucket[row]] for row in chunk):
                    blocks.append((chunk, k, False))
        return blocks

    def trim(lists: list[list[int]], keys: list[int]) -> list[list[int]]:
        """Each bucket's shuffled list less the last ones of it: ``M mod T`` of all, picked uniformly."""
        total = sum(len(m) for m in lists)
        pick = feistel(total, keys)
        trimmed = [0] * K
        for i in range(total % T):
            position = pick(i)
            for k, members in enumerate(lists):
                if position < len(members):
                    trimmed[k] += 1
                    break
                position -= len(members)
        return [m[: len(m) - t] for m, t in zip(lists, trimmed)]

    def ordered(keys: list[int], blocks: list[tuple[list[int], int, bool]]) -> list[int]:
        shuffle = feistel(len(blocks), keys)
        order = [shuffle(i) for i in range(len(blocks))]
        if largest_first and order:
            areas = [sizes[k][0] * sizes[k][1] for _, k, _ in blocks]
            first = areas.index(max(areas))  # the lowest-numbered block of the largest area
            where = order.index(first)
            order[0], order[where] = order[where], order[0]
        return order

    rng = np.random.default_rng([seed, epoch])
    members = by_bucket([row for row in range(len(bucket)) if bucket[row] >= 0])
    shuffles = [feistel(len(m), keys) for m, keys in zip(members, keys_of(rng, K))]
    shuffled = [[m[shuffle(p)] for p in range(len(m))] for m, shuffle in zip(members, shuffles)]
    small = [0 < len(m) < unit for m, unit in zip(members, units)]
    phases = np.random.default_rng([seed, DUPLICATE_STREAM]).random(K).tolist()
    due = [True] * K
    for k in range(K):
        if small[k]:
            rate = len(members[k]) / units[k]
            due[k] = math.floor(rate * (epoch + 1) + phases[k]) - math.floor(rate * epoch + phases[k]) > 0
    if any(small) and not any(len(m) >= u for m, u in zip(members, units)) and not any(due):
        progress = [(rate * epoch + phases[k]) % 1.0 + rate if small[k] else -1.0
                    for k, rate in enumerate(len(m) / u for m, u in zip(members, units))]  # fmt: skip
        due[progress.index(max(progress))] = True
    if sync_ranks:
        order_keys, trim_keys = keys_of(rng, 2)
        if policy is LeftoverPolicy.NEAREST or (policy is LeftoverPolicy.DROP and any(small)):
            shuffled = trim(shuffled, trim_keys)
            starved = [len(m) < u for m, u in zip(shuffled, units)] if policy is LeftoverPolicy.DROP else None
        else:
            starved = None
        blocks = blocks_of(shuffled, units, starved)
        order = ordered(order_keys, blocks)
        out = []
        for o in order:
            rows, _, dealt = blocks[o]
            share = len(rows) // W
            out.append(rows[rank::W] if dealt else rows[rank * share : (rank + 1) * share])
        return out, [blocks[o][1] for o in order]
    bucket_order = rng.permutation(K).tolist()
    trim_keys = keys_of(rng, 1)[0]
    if policy is not LeftoverPolicy.PARTIAL:
        shuffled = trim(shuffled, trim_keys)
    sequence = [row for k in bucket_order for row in shuffled[k]]

    def blocks_of_rank(r: int) -> list[tuple[list[int], int, bool]]:
        groups = by_bucket(sequence[r::world_size])
        starved = [len(g) < b for g, b in zip(groups, batch)] if policy is LeftoverPolicy.DROP else None
        return blocks_of(groups, units, starved)

    blocks = blocks_of_rank(rank)
    if policy is not LeftoverPolicy.DROP:  # a rank with fewer blocks than another repeats its first ones
        most = max(len(blocks_of_rank(r)) for r in range(world_size))
        blocks = blocks + [blocks[j % len(blocks)] for j in range(most - len(blocks))]
    order = ordered(keys_of(np.random.default_rng([seed, epoch, 1 + rank]), 1)[0], blocks)
    if policy is LeftoverPolicy.DROP:
        order = order[: min(len(blocks_of_rank(r)) for r in range(world_size))]
    return [blocks[o][0] for o in order], [blocks[o][1] for o in order]
