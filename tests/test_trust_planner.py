"""Issue 18, findings 1 and 2: every image is served as often as any other over the epochs, whatever its bucket's
size, the leftover policy, the sync mode or a fractional repeat count."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dali_arb import BucketSpec, Planner, World
from dali_arb.plan.buckets import BucketIndex
from dali_arb.plan.mixture import MixedIndex
from dali_arb.tools.report import bucket_report
from support.reference import reference_plan

MODES = [("nearest", True), ("drop", True), ("duplicate", True), ("nearest", False), ("drop", False)]


def squares_and_portraits(squares: int = 1000, portraits: int = 10):
    """``squares`` 1024x1024 images (the 512x512 bucket) and ``portraits`` 1024x1536 ones (512x768)."""
    h = np.array([1024] * squares + [1536] * portraits)
    w = np.array([1024] * (squares + portraits))
    return BucketSpec().assign(h, w)


def epoch_plans(index, *, epoch, world=8, batch=16, seed=3, leftover="nearest", sync=True):
    return [
        Planner(index, batch_size=batch, world=World(r, world), seed=seed, leftover=leftover, sync_ranks=sync).epoch(
            epoch
        )
        for r in range(world)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("leftover", "sync"), MODES)
def test_f1_a_bucket_smaller_than_a_global_batch_is_served_as_often_as_the_others(leftover, sync):
    """Finding 1: 1,000 squares + 10 portraits on 8 ranks x 16: the portraits were served 0 times in 40 epochs
    (nearest, drop), or 13 times as often as a square (duplicate); now each about as often as a square."""
    a = squares_and_portraits()
    portraits = np.flatnonzero(a.heights == 1536)
    squares = np.flatnonzero(a.heights == 1024)
    served = np.zeros(a.num_images, np.int64)
    for epoch in range(40):
        plans = epoch_plans(a, epoch=epoch, leftover=leftover, sync=sync)
        assert len({len(p) for p in plans}) == 1, "ranks disagree on the number of steps"
        rows = np.concatenate([p.rows.ravel() for p in plans])
        if leftover != "duplicate":
            assert len(np.unique(rows)) == len(rows), f"an image served twice in epoch {epoch}"
        served += np.bincount(rows, minlength=a.num_images)
    square_mean = served[squares].mean()
    assert square_mean > 30
    assert 0.75 * square_mean <= served[portraits].mean() <= 1.3 * square_mean, served[portraits].tolist()
    assert served[portraits].min() >= 0.6 * square_mean, served[portraits].tolist()
    assert served[squares].min() >= 0.6 * square_mean


@pytest.mark.parametrize(("leftover", "sync"), MODES)
def test_f1_plans_stay_deterministic_per_rank_and_step(leftover, sync):
    """Finding 1: the new trimming keeps every plan a pure function of (seed, epoch, rank, step)."""
    a = squares_and_portraits(squares=700, portraits=30)
    plans = epoch_plans(a, epoch=5, leftover=leftover, sync=sync)
    again = Planner(a, batch_size=16, world=World(3, 8), seed=3, leftover=leftover, sync_ranks=sync).epoch(5)
    for step in reversed(range(len(again))):  # any step, in any order
        assert np.array_equal(again.rows_at(step), plans[3].rows[step])
        assert again.bucket_at(step) == plans[3].bucket[step]


@pytest.mark.parametrize(("leftover", "sync"), MODES)
def test_f1_the_bucket_report_counts_what_the_planner_serves(leftover, sync):
    """Finding 1: `dali-arb buckets` reports the trimmed / dropped / duplicated counts of the real epoch 0."""
    a = squares_and_portraits()
    report = bucket_report(a.heights, a.widths, BucketSpec(), batch_size=16, world_size=8, seed=3,
                           leftover=leftover, sync_ranks=sync)  # fmt: skip
    totals = report["totals"]
    plans = epoch_plans(a, epoch=0, leftover=leftover, sync=sync)
    rows = np.concatenate([p.rows.ravel() for p in plans])
    assert totals["steps_per_epoch"] == len(plans[0])
    distinct = len(np.unique(rows))
    assert totals["usable"] - distinct == totals["trimmed_per_epoch"] + totals["dropped_per_epoch"]
    assert len(rows) - distinct == totals["duplicated_per_epoch"]
    assert totals["trimmed_per_epoch"] == plans[0].trimmed and totals["dropped_per_epoch"] == plans[0].dropped


def one_dataset(repeat: float, seed: int = 7) -> MixedIndex:
    """One dataset with buckets of 1 (512x512), 3 (512x768) and 20 (768x512) images, at ``repeat``."""
    h = np.array([1024] * 1 + [1536] * 3 + [1024] * 20)
    w = np.array([1024] * 1 + [1024] * 3 + [1536] * 20)
    spec = BucketSpec()
    index = BucketIndex.of(spec.assign(h, w))
    assert sorted(n for n in index.counts().tolist() if n) == [1, 3, 20]
    return MixedIndex([index], (repeat,), [spec], seed=seed)


@pytest.mark.parametrize("repeat", [0.2, 0.5, 1.5, 2.5])
def test_f2_a_fractional_repeat_serves_each_image_that_often_over_the_epochs(repeat):
    """Finding 2: a fraction took floor(f * n) images of each bucket per epoch: a bucket of 1 or 3 at 0.2 was
    never served, a bucket of 3 at 0.5 a third of the epochs. Now each image f times per epoch, within one or two."""
    index = one_dataset(repeat)
    planner = Planner(index, batch_size=1, seed=4)  # one sample per batch: nothing trimmed
    epochs = 40
    served: Counter = Counter()
    subsets = []
    for epoch in range(epochs):
        rows = planner.epoch(epoch).rows.ravel()
        served.update(rows.tolist())
        subsets.append(frozenset(Counter(rows.tolist()).items()))  # which images are served twice, with 1.5
    expected = repeat * epochs
    counts = [served.get(r, 0) for r in range(index.num_images)]
    assert all(abs(c - expected) <= 2 for c in counts), (expected, counts)
    assert len(set(subsets)) > 1, "the same images are served every epoch"


def test_f2_each_epoch_serves_the_rounded_share_of_every_bucket():
    """Finding 2: an epoch serves floor or ceil of f * n images of each bucket, and epochs differ."""
    index = one_dataset(0.5)
    per_epoch = [index.epoch_counts(e) for e in range(12)]
    nonzero = np.flatnonzero(index.counts())
    for counts in per_epoch:
        for k in nonzero.tolist():
            n = int(np.diff(index.indexes[0].starts)[k])
            assert np.floor(0.5 * n) <= counts[k] <= np.ceil(0.5 * n), (k, counts[k])
    assert len({tuple(c.tolist()) for c in per_epoch}) > 1
    total = np.sum(per_epoch, axis=0)
    for k in nonzero.tolist():
        n = int(np.diff(index.indexes[0].starts)[k])
        assert abs(total[k] - 0.5 * n * 12) <= 1


@pytest.mark.parametrize(("leftover", "sync"), MODES)
@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_f1_small_buckets_match_the_per_image_reference(leftover, sync, epoch):
    """Finding 1: the uniform trim, DROP's pooled batches of small buckets and DUPLICATE's rounding, as the
    per-image oracle computes them (a bucket of 10 and one of 37 beside 600 squares, 4 ranks x 8)."""
    h = np.array([1024] * 600 + [1536] * 10 + [1024] * 37)
    w = np.array([1024] * 610 + [1536] * 37)
    a = BucketSpec().assign(h, w)
    for rank in (0, 3):
        plan = Planner(a, batch_size=8, world=World(rank, 4), seed=2, leftover=leftover, sync_ranks=sync).epoch(epoch)
        rows, buckets = reference_plan(
            a, batch_size=8, world_size=4, rank=rank, seed=2, epoch=epoch, leftover=leftover, sync_ranks=sync
        )
        assert plan.rows.tolist() == rows
        assert plan.bucket.tolist() == buckets


def test_f1_duplicate_serves_a_block_when_every_bucket_is_small():
    """Finding 1: with every bucket smaller than a global batch, DUPLICATE still plans a step in every epoch."""
    h = np.array([1024] * 20 + [1536] * 20)
    w = np.array([1024] * 20 + [1024] * 20)
    a = BucketSpec().assign(h, w)
    planner = Planner(a, batch_size=8, world=World(0, 4), leftover="duplicate")
    assert all(len(planner.epoch(e)) >= 1 for e in range(30))
