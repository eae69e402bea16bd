"""Deterministic replacement of a sample that cannot be served: a stand-in from the same bucket, drawn from
``(seed, epoch, step, position, attempt)`` alone, so every run, resume and worker picks the same one.

Imports NumPy and, below the loader, ``errors``, ``plan.buckets`` and ``contracts`` (no DALI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..errors import DataError
from ..plan.buckets import PlannedIndex, format_size
from .contracts import Failure

__all__ = ["MAX_REPLACEMENT_TRIES", "replacement_row", "serve_or_replace"]

#: Stand-ins tried for one planned sample before the run stops (the files behind the manifest are gone).
MAX_REPLACEMENT_TRIES = 64
#: Separates the replacement draws from every other keyed draw.
REPLACEMENT_STREAM = 0xBAD

T = TypeVar("T")


def replacement_row(
    index: PlannedIndex, seed: int, bucket: int, epoch: int, step: int, position: int, attempt: int
) -> int:
    """A deterministic stand-in from bucket ``bucket`` of ``index`` (images assigned to the batch's bucket) for the
    sample at ``position`` of the global batch of ``step``, try ``attempt``."""
    lo, hi = int(index.starts[bucket]), int(index.starts[bucket + 1])
    if hi == lo:  # a leftover batch at a bucket that owns no images: any usable image
        lo, hi = 0, int(index.starts[-1])
    pick = np.random.default_rng([seed, epoch, step, position, attempt, REPLACEMENT_STREAM]).integers(lo, hi)
    return int(index.member_rows(np.array([pick]), epoch)[0])


def serve_or_replace(
    planned: int,
    *,
    serve: Callable[[int], tuple[T | None, Failure, int]],
    usable: Callable[[int], bool],
    found_bad: Callable[[int, Failure, int], None],
    stand_in: Callable[[int], int],
    known_bad: Callable[[int], tuple[Failure, int] | None] = lambda row: None,
    bucket_size: tuple[int, int],
    epoch: int,
    step: int,
) -> tuple[int, Failure, int, T]:
    """``(row, failure of planned, its failed part, served)`` for ``planned`` or, if it cannot be served, the
    first stand-in that can: ``serve(row)`` is ``(served or None, failure, failed part)``; rows not ``usable``
    (known bad) are skipped unread; ``found_bad(row, failure, part)`` records a row that failed; ``stand_in(attempt)``
    is the ``attempt``-th stand-in (:func:`replacement_row`). A planned row skipped because this source found it bad
    earlier (as a stand-in, or as another clip of the same video) still reports that failure (``known_bad(row)``:
    ``(failure, part)`` or None), so the loader lists it.

    Raises:
        DataError: no stand-in served in :data:`MAX_REPLACEMENT_TRIES` tries.
    """
    row, first_failure, first_part = planned, Failure.NONE, 0
    if not usable(planned):
        first_failure, first_part = known_bad(planned) or (Failure.NONE, 0)
    for attempt in range(MAX_REPLACEMENT_TRIES):
        if usable(row):
            served, failure, part = serve(row)
            if served is not None:
                return row, first_failure, first_part, served
            found_bad(row, failure, part)
            if row == planned:
                first_failure, first_part = failure, part
        row = stand_in(attempt)
    raise DataError(
        f"no readable image left in bucket {format_size(*bucket_size)} after {MAX_REPLACEMENT_TRIES} "
        f"tries (epoch {epoch}, step {step}): the files behind the manifest have changed or gone; "
        "re-index with `dali-arb index ... --update` and restart from your checkpoint"
    )
