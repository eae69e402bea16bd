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


def reference_plan(
    assignment: BucketAssignment,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    leftover: str = "nearest",
    sync_ranks: bool = True,
    largest_first: bool = True,
) -> tuple[list[list[int]], list[int]]:
    """Rows of every step (``steps`` lists of ``batch_size`` rows) and the bucket of every step."""
    policy = LeftoverPolicy(leftover)
    bucket = assignment.bucket.tolist()
    log_aspect = assignment.log_aspect.tolist()
    sizes = assignment.sizes.tolist()
    bucket_log = assignment.bucket_log_aspect
    K = len(sizes)
    G = world_size * batch_size

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

    def blocks_of(groups: list[list[int]], group: int, starved: list[bool] | None) -> list[tuple[list[int], int]]:
        """Whole blocks of each bucket (bucket order), then the policy's blocks of what is left (NEAREST, DROP with
        ``starved``: the pooled blocks that hold an image of a starved bucket; DUPLICATE: padded, if due)."""
        blocks = []
        rests = []
        for k, members in enumerate(groups):
            whole = len(members) // group
            blocks += [(members[j * group : (j + 1) * group], k) for j in range(whole)]
            if members[whole * group :]:
                rests.append((k, members[whole * group :], members))
        if policy is LeftoverPolicy.DUPLICATE:
            for k, rest, members in rests:
                if due[k]:
                    blocks.append((rest + [members[i % len(members)] for i in range(group - len(rest))], k))
        elif policy is LeftoverPolicy.NEAREST or starved is not None:
            pool = sorted((row for _, rest, _ in rests for row in rest), key=lambda row: log_aspect[row])
            for start in range(0, len(pool), group):
                chunk = pool[start : start + group]
                if starved is None or any(starved[bucket[row]] for row in chunk):
                    blocks.append((chunk, leftover_bucket(chunk)))
        return blocks

    def trim(lists: list[list[int]], keys: list[int]) -> list[list[int]]:
        """Each bucket's shuffled list less the last ones of it: ``M mod G`` of all, picked uniformly."""
        total = sum(len(m) for m in lists)
        pick = feistel(total, keys)
        trimmed = [0] * K
        for i in range(total % G):
            position = pick(i)
            for k, members in enumerate(lists):
                if position < len(members):
                    trimmed[k] += 1
                    break
                position -= len(members)
        return [m[: len(m) - t] for m, t in zip(lists, trimmed)]

    def ordered(keys: list[int], blocks: list[tuple[list[int], int]]) -> list[int]:
        shuffle = feistel(len(blocks), keys)
        order = [shuffle(i) for i in range(len(blocks))]
        if largest_first and order:
            areas = [sizes[k][0] * sizes[k][1] for _, k in blocks]
            first = areas.index(max(areas))  # the lowest-numbered block of the largest area
            where = order.index(first)
            order[0], order[where] = order[where], order[0]
        return order

    rng = np.random.default_rng([seed, epoch])
    members = by_bucket([row for row in range(len(bucket)) if bucket[row] >= 0])
    shuffles = [feistel(len(m), keys) for m, keys in zip(members, keys_of(rng, K))]
    shuffled = [[m[shuffle(p)] for p in range(len(m))] for m, shuffle in zip(members, shuffles)]
    small = [0 < len(m) < G for m in members]
    phases = np.random.default_rng([seed, DUPLICATE_STREAM]).random(K).tolist()
    due = [True] * K
    for k in range(K):
        if small[k]:
            rate = len(members[k]) / G
            due[k] = math.floor(rate * (epoch + 1) + phases[k]) - math.floor(rate * epoch + phases[k]) > 0
    if any(small) and not any(len(m) >= G for m in members) and not any(due):
        progress = [(rate * epoch + phases[k]) % 1.0 + rate if small[k] else -1.0
                    for k, rate in enumerate(len(m) / G for m in members)]  # fmt: skip
        due[progress.index(max(progress))] = True
    if sync_ranks:
        order_keys, trim_keys = keys_of(rng, 2)
        if policy is LeftoverPolicy.NEAREST or (policy is LeftoverPolicy.DROP and any(small)):
            shuffled = trim(shuffled, trim_keys)
            starved = [len(m) < G for m in shuffled] if policy is LeftoverPolicy.DROP else None
        else:
            starved = None
        blocks = blocks_of(shuffled, G, starved)
        order = ordered(order_keys, blocks)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        return [blocks[o][0][lo:hi] for o in order], [blocks[o][1] for o in order]
    bucket_order = rng.permutation(K).tolist()
    shuffled = trim(shuffled, keys_of(rng, 1)[0])
    sequence = [row for k in bucket_order for row in shuffled[k]]

    def blocks_of_rank(r: int) -> list[tuple[list[int], int]]:
        groups = by_bucket(sequence[r::world_size])
        starved = [len(g) < batch_size for g in groups] if policy is LeftoverPolicy.DROP else None
        return blocks_of(groups, batch_size, starved)

    blocks = blocks_of_rank(rank)
    order = ordered(keys_of(np.random.default_rng([seed, epoch, 1 + rank]), 1)[0], blocks)
    if policy is LeftoverPolicy.DROP:
        order = order[: min(len(blocks_of_rank(r)) for r in range(world_size))]
    return [blocks[o][0] for o in order], [blocks[o][1] for o in order]
