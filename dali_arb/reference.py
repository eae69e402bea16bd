"""A straightforward per-image planner: the test oracle for :class:`dali_arb.Planner`.

It loops over images in Python like NovelAI's bucket manager, but draws the same random numbers
in the same order as the vectorised planner, so both must produce identical plans. Slow on
purpose (readable); used by the tests and by ``benchmarks/`` as the baseline.
"""

from __future__ import annotations

import numpy as np

from .buckets import BucketAssignment
from .planner import LeftoverPolicy

__all__ = ["reference_plan"]


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
    G = world_size * batch_size
    index_type = np.int32 if len(bucket) < 2**31 else np.int64
    valid = np.array([i for i, b in enumerate(bucket) if b >= 0], dtype=index_type)

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

    def blocks_of(rows: list[int], group: int) -> list[tuple[list[int], int]]:
        by_bucket: dict[int, list[int]] = {k: [] for k in range(len(sizes))}
        for row in rows:
            by_bucket[bucket[row]].append(row)
        blocks: list[tuple[list[int], int]] = []
        rests: list[tuple[int, list[int], list[int]]] = []
        for k in range(len(sizes)):
            members = by_bucket[k]
            whole = len(members) // group
            for j in range(whole):
                blocks.append((members[j * group : (j + 1) * group], k))
            rest = members[whole * group :]
            if rest:
                rests.append((k, rest, members))
        if policy is LeftoverPolicy.DUPLICATE:
            for k, rest, members in rests:
                pad = [members[i % len(members)] for i in range(group - len(rest))]
                blocks.append((rest + pad, k))
        elif policy is LeftoverPolicy.NEAREST:
            pool = [row for _, rest, _ in rests for row in rest]
            pool.sort(key=lambda row: log_aspect[row])
            for start in range(0, len(pool), group):
                chunk = pool[start : start + group]
                blocks.append((chunk, leftover_bucket(chunk)))
        return blocks

    def ordered(rng: np.random.Generator, blocks: list[tuple[list[int], int]]) -> list[int]:
        order = rng.permutation(len(blocks)).tolist()
        if largest_first and order:
            areas = [sizes[blocks[o][1]][0] * sizes[blocks[o][1]][1] for o in order]
            first = areas.index(max(areas))
            order[0], order[first] = order[first], order[0]
        return order

    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(valid).tolist()
    if sync_ranks:
        if policy is LeftoverPolicy.NEAREST:
            perm = perm[: len(perm) - len(perm) % G]
        blocks = blocks_of(perm, G)
        order = ordered(rng, blocks)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        return [blocks[o][0][lo:hi] for o in order], [blocks[o][1] for o in order]
    perm = perm[: len(perm) - len(perm) % G]
    mine = perm[rank::world_size]
    blocks = blocks_of(mine, batch_size)
    order = ordered(np.random.default_rng([seed, epoch, 1 + rank]), blocks)
    if policy is LeftoverPolicy.DROP:
        steps = min(
            sum(
                count // batch_size
                for count in np.bincount([bucket[row] for row in perm[r::world_size]], minlength=len(sizes)).tolist()
            )
            for r in range(world_size)
        )
        order = order[:steps]
    return [blocks[o][0] for o in order], [blocks[o][1] for o in order]
