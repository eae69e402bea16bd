import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_arb import BucketSpec, ConfigError, LeftoverPolicy, PlanError, Planner, World
from support.reference import reference_plan

from .conftest import random_sizes

MODES = [
    ("nearest", True),
    ("drop", True),
    ("duplicate", True),
    ("nearest", False),
    ("drop", False),
]


def plans(assignment, *, batch_size, world_size, epoch=0, seed=0, leftover="nearest", sync_ranks=True):
    return [
        Planner(
            assignment,
            batch_size=batch_size,
            world=World(rank=r, world_size=world_size),
            seed=seed,
            leftover=leftover,
            sync_ranks=sync_ranks,
        ).epoch(epoch)
        for r in range(world_size)
    ]


@pytest.fixture(scope="module")
def assignment():
    h, w = random_sizes(4000, seed=1)
    return BucketSpec().assign(h, w)


@pytest.mark.parametrize(("leftover", "sync"), MODES)
@pytest.mark.parametrize("no_upscale", [False, True])
@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (3, 2), (8, 5)])
def test_matches_the_per_image_reference(leftover, sync, no_upscale, world_size, rank):
    h, w = random_sizes(1500, seed=world_size)
    a = BucketSpec(no_upscale=no_upscale).assign(h // 2, w // 2)
    plan = Planner(a, batch_size=4, world=World(rank, world_size), seed=11, leftover=leftover, sync_ranks=sync).epoch(3)
    rows, buckets = reference_plan(
        a, batch_size=4, world_size=world_size, rank=rank, seed=11, epoch=3, leftover=leftover, sync_ranks=sync
    )
    assert plan.rows.tolist() == rows
    assert plan.bucket.tolist() == buckets


@pytest.mark.parametrize(("leftover", "sync"), MODES)
@pytest.mark.parametrize("world_size", [1, 2, 5, 8])
def test_every_rank_gets_the_same_number_of_steps(assignment, leftover, sync, world_size):
    for epoch in range(3):
        counts = {
            len(p)
            for p in plans(
                assignment, batch_size=6, world_size=world_size, epoch=epoch, leftover=leftover, sync_ranks=sync
            )
        }
        assert len(counts) == 1


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("world_size", [1, 4, 7])
def test_nearest_serves_every_image_once_but_fewer_than_a_global_batch(assignment, sync, world_size):
    batch = 5
    ps = plans(assignment, batch_size=batch, world_size=world_size, epoch=1, sync_ranks=sync)
    served = np.concatenate([p.rows.ravel() for p in ps])
    assert len(np.unique(served)) == len(served), "a sample was served twice in one epoch"
    usable = int((assignment.bucket >= 0).sum())
    missing = usable - len(served)
    assert 0 <= missing < batch * world_size
    assert missing == ps[0].trimmed
    assert all(p.rows.shape[1] == batch for p in ps)


def test_drop_serves_no_image_twice_and_counts_what_it_drops(assignment):
    ps = plans(assignment, batch_size=8, world_size=4, leftover="drop")
    served = np.concatenate([p.rows.ravel() for p in ps])
    assert len(np.unique(served)) == len(served)
    assert len(served) + ps[0].dropped == int((assignment.bucket >= 0).sum())
    for p in ps:  # every batch is at its own bucket
        assert (assignment.bucket[p.rows] == p.bucket[:, None]).all()


def test_duplicate_serves_every_image_at_its_own_bucket(assignment):
    ps = plans(assignment, batch_size=8, world_size=4, leftover="duplicate")
    served = np.concatenate([p.rows.ravel() for p in ps])
    usable = np.flatnonzero(assignment.bucket >= 0)
    assert set(served.tolist()) == set(usable.tolist())
    assert len(served) - len(usable) == ps[0].duplicated
    for p in ps:
        assert (assignment.bucket[p.rows] == p.bucket[:, None]).all()


def test_same_arguments_same_plan_and_epochs_reshuffle(assignment):
    first = Planner(assignment, batch_size=8, world=World(1, 2), seed=5, leftover="nearest")
    again = Planner(assignment, batch_size=8, world=World(1, 2), seed=5, leftover="nearest")
    assert np.array_equal(first.epoch(2).rows, again.epoch(2).rows)
    e0, e1 = first.epoch(0), first.epoch(1)
    assert not np.array_equal(e0.bucket, e1.bucket), "batch order did not change between epochs"
    batches0 = {frozenset(r) for r in e0.rows.tolist()}
    batches1 = {frozenset(r) for r in e1.rows.tolist()}
    assert len(batches0 & batches1) < len(batches0) // 10, "images shared a batch again in the next epoch"
    other_seed = Planner(assignment, batch_size=8, world=World(1, 2), seed=6, leftover="nearest").epoch(2)
    assert not np.array_equal(other_seed.rows, first.epoch(2).rows)


def test_sync_ranks_train_one_bucket_per_step(assignment):
    ps = plans(assignment, batch_size=4, world_size=6)
    assert all(np.array_equal(ps[0].bucket, p.bucket) for p in ps)


def test_independent_ranks_may_differ_per_step(assignment):
    ps = plans(assignment, batch_size=4, world_size=6, sync_ranks=False)
    assert not all(np.array_equal(ps[0].bucket, p.bucket) for p in ps)


def test_leftovers_are_never_squashed_into_the_square_base():
    # 3:2 landscapes and 2:3 portraits only. Leftovers go to their own aspect; at most the one
    # leftover batch that straddles the gap between the two groups (exact counts, no duplicates
    # allowed) may sit between them, and never more than one per epoch.
    rng = np.random.default_rng(0)
    n = 1003
    landscape = rng.random(n) < 0.5
    h = np.where(landscape, 800, 1200)
    w = np.where(landscape, 1200, 800)
    a = BucketSpec().assign(h, w)
    for epoch in range(4):
        ps = plans(a, batch_size=16, world_size=4, epoch=epoch)
        sizes = ps[0].sizes[ps[0].bucket]
        square = (sizes[:, 0] == 512) & (sizes[:, 1] == 512)
        assert square.sum() <= 1
        for p in ps:
            if square.any():  # the straddling batch holds both kinds, in the counts the data forces
                step = int(np.flatnonzero(square)[0])
                assert len(set(a.bucket[p.rows[step]].tolist())) <= 2
            off = ~square
            served = np.log(sizes[off, 1] / sizes[off, 0])[:, None]
            assert (np.abs(a.log_aspect[p.rows[off]] - served) < 0.1).all()


def test_leftover_batches_group_neighbouring_aspects(assignment):
    p = Planner(assignment, batch_size=16, world=World(0, 8), seed=2, leftover="nearest").epoch(0)
    off = assignment.bucket[p.rows] != p.bucket[:, None]  # samples served away from their own bucket
    served_log = np.log(p.sizes[p.bucket, 1] / p.sizes[p.bucket, 0])[:, None]
    loss = 1 - np.exp(-np.abs(assignment.log_aspect[p.rows] - served_log))
    assert off.any()
    # crop loss of leftovers: never worse than the spec's own max_aspect_error allows plus a bucket step
    assert loss[off].max() < 1 - np.exp(-0.6)


def test_largest_bucket_comes_first(assignment):
    for epoch in range(3):
        p = Planner(assignment, batch_size=4, world=World(0, 2), seed=epoch, leftover="nearest").epoch(epoch)
        areas = p.sizes[p.bucket, 0] * p.sizes[p.bucket, 1]
        assert areas[0] == areas.max()
    q = Planner(assignment, batch_size=4, world=World(0, 2), largest_first=False, leftover="nearest").epoch(0)
    assert len(q) == len(p)


@pytest.mark.parametrize(("old", "new"), [((8, 4), (4, 8)), ((2, 16), (8, 4)), ((1, 32), (4, 8))])
def test_same_global_batch_gives_same_sequence_on_another_world_size(assignment, old, new):
    """Elastic resume: world x batch kept, the global batches are the same."""

    def global_batches(world_size, batch):
        ps = plans(assignment, batch_size=batch, world_size=world_size, epoch=4, seed=9)
        return np.concatenate([p.rows for p in ps], axis=1), ps[0].bucket

    rows_a, buckets_a = global_batches(*old)
    rows_b, buckets_b = global_batches(*new)
    assert np.array_equal(rows_a, rows_b) and np.array_equal(buckets_a, buckets_b)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 400),
    batch=st.integers(1, 9),
    world_size=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    mode=st.sampled_from(MODES),
)
def test_properties_hold_for_any_data(n, batch, world_size, seed, mode):
    leftover, sync = mode
    h, w = random_sizes(n, seed=seed % 1000)
    a = BucketSpec().assign(h, w)
    usable = int((a.bucket >= 0).sum())
    if usable < batch * world_size:
        with pytest.raises(PlanError):
            Planner(a, batch_size=batch, world=World(0, world_size), leftover="nearest")
        return
    try:
        ps = plans(a, batch_size=batch, world_size=world_size, seed=seed, leftover=leftover, sync_ranks=sync)
    except PlanError:  # drop with every bucket smaller than a batch
        assert leftover == "drop"
        return
    assert len({len(p) for p in ps}) == 1
    served = np.concatenate([p.rows.ravel() for p in ps])
    if leftover != "duplicate":
        assert len(np.unique(served)) == len(served)
    if leftover == "nearest":
        assert usable - len(served) < batch * world_size


def test_bad_arguments_name_the_value(assignment):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        Planner(assignment, batch_size=0)
    with pytest.raises(ConfigError, match="got 'sideways'"):
        Planner(assignment, batch_size=2, leftover="sideways")
    with pytest.raises(ConfigError, match="rank must be in \\[0, 3\\] for world_size 4, got 4"):
        World(rank=4, world_size=4)
    with pytest.raises(ConfigError, match="world_size must be at least 1, got 0"):
        World(rank=0, world_size=0)
    with pytest.raises(ConfigError, match="epoch must be a non-negative integer, got -1"):
        Planner(assignment, batch_size=2).epoch(-1)
    with pytest.raises(ConfigError, match="sync_ranks=True"):
        Planner(assignment, batch_size=2, leftover=LeftoverPolicy.DUPLICATE, sync_ranks=False)


def test_too_few_images_for_one_global_batch():
    a = BucketSpec().assign(np.array([512] * 10), np.array([512] * 10))
    with pytest.raises(PlanError, match=r"only 10 usable images, fewer than one global batch .*= 12"):
        Planner(a, batch_size=4, world=World(0, 3), leftover="nearest")


def test_world_detect_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.detect() == World(rank=3, world_size=8, local_rank=1)
    assert World.detect(rank=0, world_size=2) == World(rank=0, world_size=2, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer, got 'eight'"):
        World.detect()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert World.detect() == World()


def test_steps_match_the_arithmetic_of_each_policy(assignment):
    counts = assignment.counts()
    G = 4 * 8
    usable = int(counts.sum())
    assert Planner(assignment, batch_size=8, world=World(0, 4), leftover="nearest").steps_per_epoch() == usable // G
    assert Planner(assignment, batch_size=8, world=World(0, 4), leftover="drop").steps_per_epoch() == int(
        (counts // G).sum()
    )
    assert Planner(assignment, batch_size=8, world=World(0, 4), leftover="duplicate").steps_per_epoch() == int(
        (-(-counts // G)).sum()
    )


def test_plan_rows_index_the_manifest(assignment):
    p = Planner(assignment, batch_size=3, world=World(0, 1), leftover="nearest").epoch(0)
    assert p.rows.dtype == np.int64 and p.rows.shape == (len(p), 3)
    assert list(itertools.chain(p.size(0))) == list(p.sizes[p.bucket[0]])
