"""Batches sized to the bucket (issue 20): a pixel budget or a table per bucket, leftover='partial' and 'auto'."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dali_arb import BucketSpec, ConfigError, LeftoverPolicy, PlanError, Planner, World
from dali_arb.plan.batching import BatchSizing
from dali_arb.plan.planner import make_planner
from support.reference import reference_plan

from .conftest import random_sizes

MODES = [
    ("nearest", True),
    ("drop", True),
    ("duplicate", True),
    ("partial", True),
    ("nearest", False),
    ("drop", False),
    ("partial", False),
]
BUDGET = BatchSizing(batch_pixels=4 * 512 * 512)


def table_for(sizes: np.ndarray, scale: int = 1) -> BatchSizing:
    """A table with 1..4 (times ``scale``) images per bucket, by bucket number."""
    return BatchSizing(batch_sizes={(int(w), int(h)): scale * (1 + k % 4) for k, (h, w) in enumerate(sizes.tolist())})


def plans(index, sizing, world_size, *, epoch=0, seed=0, leftover="nearest", sync_ranks=True, **kw):
    return [
        Planner(index, batch_size=sizing, world=World(r, world_size), seed=seed, leftover=leftover,
                sync_ranks=sync_ranks, **kw).epoch(epoch)
        for r in range(world_size)
    ]  # fmt: skip


def steps_of(plan) -> list[list[int]]:
    o = plan.row_offsets
    return [plan.flat_rows[o[i] : o[i + 1]].tolist() for i in range(len(plan))]


@pytest.fixture(scope="module")
def assignment():
    h, w = random_sizes(3000, seed=4)
    return BucketSpec().assign(h, w)


# -- the per-image oracle -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("leftover", "sync"), [*MODES, ("auto", True)])
@pytest.mark.parametrize("kind", ["budget", "table", "fixed"])
@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (3, 2), (8, 5)])
def test_matches_the_per_image_reference(leftover, sync, kind, world_size, rank):
    h, w = random_sizes(900, seed=world_size)
    a = BucketSpec(no_upscale=kind == "budget").assign(h // 2, w // 2)
    sizing = {"budget": BUDGET, "table": table_for(a.sizes), "fixed": 3}[kind]
    plan = Planner(a, batch_size=sizing, world=World(rank, world_size), seed=11, leftover=leftover,
                   sync_ranks=sync).epoch(3)  # fmt: skip
    rows, buckets = reference_plan(a, batch_size=sizing, world_size=world_size, rank=rank, seed=11, epoch=3,
                                   leftover=leftover, sync_ranks=sync)  # fmt: skip
    assert steps_of(plan) == rows
    assert plan.bucket.tolist() == buckets


def test_the_reference_catches_a_wrong_batch_size(assignment):
    """The oracle is not the planner: a planner given other batch sizes disagrees with it."""
    plan = Planner(assignment, batch_size=table_for(assignment.sizes, 2), world=World(0, 2), leftover="nearest")
    rows, _ = reference_plan(assignment, batch_size=table_for(assignment.sizes), world_size=2, rank=0, seed=0,
                             epoch=0)  # fmt: skip
    assert steps_of(plan.epoch(0)) != rows


# -- variable batches ------------------------------------------------------------------------------------------
def test_a_budget_gives_each_bucket_its_own_batch(assignment):
    ps = plans(assignment, BUDGET, 2, leftover="drop")
    b = BUDGET.per_bucket(assignment.sizes)
    assert len(set(b.tolist())) > 1
    for p in ps:
        assert (p.batch_sizes == b[p.bucket]).all()  # DROP: every step is a whole batch of its own bucket
        assert p.max_batch == int(b.max()) and p.batch_size is None and p.offset is None
        assert [p.batch_size_at(s) for s in range(len(p))] == p.batch_sizes.tolist()
        for s in (0, len(p) // 2, len(p) - 1):
            assert np.array_equal(p.rows_at(s), p.flat_rows[p.row_offsets[s] : p.row_offsets[s + 1]])
            assert p.offset_at(s) == p.rank * p.batch_size_at(s)
        with pytest.raises(ValueError, match="steps differ in size"):
            p.rows  # noqa: B018
    assert np.array_equal(ps[0].batch_sizes, ps[1].batch_sizes)


def test_max_batch_is_the_same_in_every_epoch(assignment):
    planner = Planner(assignment, batch_size=BUDGET, world=World(0, 4), leftover="nearest")
    assert {planner.epoch(e).max_batch for e in range(4)} == {planner.max_batch}
    assert max(int(planner.epoch(e).batch_sizes.max()) for e in range(4)) <= planner.max_batch


def test_nearest_with_a_budget_serves_each_image_once_and_trims_less_than_any_unit(assignment):
    ps = plans(assignment, BUDGET, 4, epoch=2)
    served = np.concatenate([p.flat_rows for p in ps])
    assert len(np.unique(served)) == len(served)
    usable = int((assignment.bucket >= 0).sum())
    assert usable - len(served) == ps[0].trimmed < int(ps[0].batch_sizes.min()) * 4
    b = BUDGET.per_bucket(assignment.sizes)
    for p in ps:  # every step at most its bucket's batch; only pooled last batches smaller
        assert (p.batch_sizes <= b[p.bucket]).all()
        assert (p.batch_sizes < b[p.bucket]).sum() <= 1


def test_fixed_batches_plan_as_before(assignment):
    """An int and BatchSizing(batch_size=) are the same planner, and rows stays (steps, B)."""
    for leftover in ("nearest", "drop", "duplicate"):
        a = plans(assignment, 4, 3, leftover=leftover)
        b = plans(assignment, BatchSizing(batch_size=4), 3, leftover=leftover)
        for x, y in zip(a, b):
            assert x.rows.shape == (len(x), 4) and np.array_equal(x.rows, y.rows)
            assert x.offset == y.offset == 4 * x.rank and x.max_batch == 4


# -- partial ---------------------------------------------------------------------------------------------------
def test_partial_serves_every_remainder_at_its_own_bucket():
    h, w = random_sizes(37, seed=8)
    a = BucketSpec().assign(h, w)
    p = Planner(a, batch_size=4, leftover="partial").epoch(0)
    counts = a.counts()
    assert len(p) == int((-(-counts // 4)).sum())
    assert sorted(p.flat_rows.tolist()) == np.flatnonzero(a.bucket >= 0).tolist()
    assert (a.bucket[p.flat_rows] == np.repeat(p.bucket, p.batch_sizes)).all()
    assert p.trimmed == p.dropped == p.duplicated == 0
    assert sorted(p.batch_sizes[p.batch_sizes < 4].tolist()) == sorted((counts % 4)[counts % 4 > 0].tolist())
    assert p.batch_size == 4 and p.offset == 0 and p.max_batch == 4
    with pytest.raises(ValueError, match="steps differ in size"):
        p.rows  # noqa: B018


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_partial_with_ranks_in_sync_splits_the_remainder_evenly(assignment, world_size):
    ps = plans(assignment, BUDGET, world_size, leftover="partial", epoch=1)
    assert all(np.array_equal(ps[0].batch_sizes, p.batch_sizes) for p in ps)
    assert all(np.array_equal(ps[0].bucket, p.bucket) for p in ps)
    served = np.concatenate([p.flat_rows for p in ps])
    usable = np.flatnonzero(assignment.bucket >= 0)
    assert set(served.tolist()) == set(usable.tolist())
    assert len(served) - len(usable) == ps[0].duplicated
    assert ps[0].trimmed == ps[0].dropped == 0
    for step in range(len(ps[0])):
        got = [p.rows_at(step) for p in ps]
        assert (assignment.bucket[np.concatenate(got)] == ps[0].bucket[step]).all()
        distinct = [len(set(g.tolist())) for g in got]  # no rank holds only repeats while another has two reals
        assert max(distinct) - min(distinct) <= 1 or len(got[0]) == 1


def test_partial_with_independent_ranks_keeps_len_equal(assignment):
    ps = plans(assignment, BUDGET, 5, leftover="partial", sync_ranks=False)
    assert len({len(p) for p in ps}) == 1
    served = np.concatenate([p.flat_rows for p in ps])
    usable = np.flatnonzero(assignment.bucket >= 0)
    assert set(served.tolist()) == set(usable.tolist())
    assert len(served) - len(usable) == ps[0].duplicated
    for p in ps:
        assert (assignment.bucket[p.flat_rows] == np.repeat(p.bucket, p.batch_sizes)).all()


def test_partial_plans_fewer_images_than_one_global_batch():
    a = BucketSpec().assign(np.array([512] * 10), np.array([512] * 10))
    with pytest.raises(PlanError, match="or use leftover='partial'"):
        Planner(a, batch_size=4, world=World(0, 3), leftover="nearest")
    ps = plans(a, 4, 3, leftover="partial")
    assert [len(p) for p in ps] == [1, 1, 1] and [len(p.rows_at(0)) for p in ps] == [4, 4, 4]
    assert ps[0].duplicated == 2


# -- auto ------------------------------------------------------------------------------------------------------
def test_auto_is_partial_for_a_small_dataset_and_nearest_for_a_large_one(assignment):
    h, w = random_sizes(37, seed=8)
    small = Planner(BucketSpec().assign(h, w), batch_size=4)
    assert small.leftover_requested is LeftoverPolicy.AUTO
    assert small.leftover is LeftoverPolicy.PARTIAL and small.epoch(0).leftover is LeftoverPolicy.PARTIAL
    h, w = random_sizes(200_000, seed=8)
    large = Planner(BucketSpec().assign(h, w), batch_size=4, world=World(3, 8))
    assert large.leftover is LeftoverPolicy.NEAREST and large.epoch(1).leftover is LeftoverPolicy.NEAREST
    # every rank agrees (decided from the data and the options, not the rank)
    assert {Planner(assignment, batch_size=16, world=World(r, 8)).leftover for r in range(8)} == {
        LeftoverPolicy.PARTIAL
    }


def test_auto_follows_the_share_of_leftovers():
    one = BucketSpec().assign(np.array([512] * 95), np.array([512] * 95))
    assert Planner(one, batch_size=10).leftover is LeftoverPolicy.NEAREST  # 5 of 95 left over
    assert Planner(one, batch_size=8).leftover is LeftoverPolicy.NEAREST  # 7 of 95
    assert Planner(one, batch_size=20).leftover is LeftoverPolicy.PARTIAL  # 15 of 95
    assert Planner(one, batch_size=100).leftover is LeftoverPolicy.PARTIAL  # all of them
    assert Planner(one, batch_size=5, world=World(0, 2)).leftover is LeftoverPolicy.NEAREST  # units of 10
    assert Planner(one, batch_size=10, world=World(0, 2)).leftover is LeftoverPolicy.PARTIAL  # units of 20
    assert Planner(one, batch_size=20, leftover="nearest").leftover is LeftoverPolicy.NEAREST


# -- elastic resume --------------------------------------------------------------------------------------------
def global_steps(ps, leftover) -> list[list[int]]:
    """Each step's global batch; a partial step (dealt out round-robin) in slot order."""
    out = []
    for s in range(len(ps[0])):
        got = [p.rows_at(s) for p in ps]
        block = int(ps[0]._blocks(np.array([s]))[0])
        dealt = leftover == "partial" and block >= int(ps[0]._full_starts[-1])
        out.append(np.stack(got).T.reshape(-1).tolist() if dealt else np.concatenate(got).tolist())
    return out


@pytest.mark.parametrize("leftover", ["nearest", "drop", "duplicate", "partial"])
@pytest.mark.parametrize(("old", "new"), [((8, 1), (4, 2)), ((2, 4), (8, 1))])
def test_same_global_units_give_the_same_sequence_on_another_world_size(assignment, leftover, old, new):
    def run(world_size, scale):
        ps = plans(assignment, table_for(assignment.sizes, scale), world_size, epoch=4, seed=9, leftover=leftover)
        return global_steps(ps, leftover)

    a, b = run(*old), run(*new)
    assert len(a) == len(b)
    for x, y in zip(a, b):  # a partial step pads to a multiple of the world size: the real images come first
        short, long = (x, y) if len(x) <= len(y) else (y, x)
        assert long[: len(short)] == short
        assert len(x) == len(y) or leftover == "partial"


# -- properties ------------------------------------------------------------------------------------------------
SIZINGS = st.one_of(
    st.integers(1, 9).map(lambda b: BatchSizing(batch_size=b)),
    st.builds(
        lambda px, mx, mul: BatchSizing(batch_pixels=px, max_batch=mx, batch_multiple=mul),
        st.integers(256 * 256, 12 * 512 * 768),
        st.none() | st.integers(1, 12),
        st.integers(1, 3),
    ),
    st.lists(st.integers(1, 6), min_size=1, max_size=5).map(lambda bs: ("table", bs)),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.lists(st.integers(15, 300), min_size=1, max_size=2),
    repeats=st.sampled_from([None, (1.0, 2.0), (0.5, 1.0), (1.5, 0.3)]),
    sizing=SIZINGS,
    world_size=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    mode=st.sampled_from([*MODES, ("auto", True), ("auto", False)]),
    epoch=st.integers(0, 5),
)
def test_properties_hold_for_any_budget(n, repeats, sizing, world_size, seed, mode, epoch):
    leftover, sync = mode
    specs = [BucketSpec(), BucketSpec(max_area=384 * 384, min_dim=192, max_dim=768, base=(384, 384))][: len(n)]
    if repeats is not None and len(n) == 1:
        repeats = repeats[:1]
    elif repeats is None and len(n) == 2:
        repeats = (1.0, 1.0)
    assignments = [s.assign(*random_sizes(count, seed=seed % 997 + d)) for d, (s, count) in enumerate(zip(specs, n))]
    if isinstance(sizing, tuple):  # a table over every bucket of every dataset
        sizes = {(int(w), int(h)) for a in assignments for h, w in a.sizes.tolist()}
        sizing = BatchSizing(batch_sizes={s: sizing[1][i % len(sizing[1])] for i, s in enumerate(sorted(sizes))})

    def make(rank):
        return make_planner(assignments, specs, repeats=repeats, seed=seed, batch_size=sizing,
                            world=World(rank, world_size), leftover=leftover, sync_ranks=sync)  # fmt: skip

    try:
        planners = [make(r) for r in range(world_size)]
        ps = [p.epoch(epoch) for p in planners]
    except PlanError:  # too few samples for one global batch: never with partial
        assert leftover != "partial"
        return
    policy = planners[0].leftover
    assert policy is not LeftoverPolicy.AUTO and {p.leftover for p in planners} == {policy}
    index, b = planners[0].index, planners[0].batch
    # equal len on every rank; ranks in sync train one bucket with one batch size at each step
    assert len({len(p) for p in ps}) == 1
    if sync:
        assert all(np.array_equal(ps[0].bucket, p.bucket) and np.array_equal(ps[0].batch_sizes, p.batch_sizes)
                   for p in ps)  # fmt: skip
    for p in ps:  # every step at most its bucket's batch, so the budget holds (unless one image is too many)
        assert (p.batch_sizes >= 1).all() and (p.batch_sizes <= b[p.bucket]).all()
        assert (p.batch_sizes <= p.max_batch).all() and p.max_batch == planners[0].max_batch
        if sizing.batch_pixels is not None:
            area = p.sizes[p.bucket, 0] * p.sizes[p.bucket, 1]
            assert ((p.batch_sizes * area <= sizing.batch_pixels) | (p.batch_sizes == 1)).all()
        if policy in (LeftoverPolicy.DUPLICATE, LeftoverPolicy.PARTIAL, LeftoverPolicy.DROP) and sync:
            own = index.bucket_of(p.flat_rows)
            at_own = own == np.repeat(p.bucket, p.batch_sizes)
            assert at_own.all() or policy is LeftoverPolicy.DROP
    # each sample exactly once (repeats counted), the rest trimmed, dropped or duplicated as counted
    samples = int(index.epoch_counts(epoch).sum())
    served = np.concatenate([p.flat_rows for p in ps])
    first = ps[0]
    assert len(served) == samples - first.trimmed - first.dropped + first.duplicated
    if policy is LeftoverPolicy.PARTIAL:
        assert first.trimmed == first.dropped == 0
    if policy is LeftoverPolicy.NEAREST:
        global_units = world_size * b[index.epoch_counts(epoch) > 0]
        assert first.trimmed < global_units.min()  # fewer than one global batch of any bucket
    if first.duplicated == 0 and repeats in (None, (1.0,)):
        assert len(np.unique(served)) == len(served)
    # the same steps for the same arguments, and any step again on a fresh planner (resume)
    again = make(world_size - 1).epoch(epoch)
    assert np.array_equal(again.flat_rows, ps[-1].flat_rows) and np.array_equal(again.bucket, ps[-1].bucket)
    step = seed % len(again)
    fresh = make(world_size - 1).epoch(epoch)
    assert np.array_equal(
        fresh.rows_at(step), ps[-1].flat_rows[ps[-1].row_offsets[step] : ps[-1].row_offsets[step + 1]]
    )
    assert fresh.batch_size_at(step) == ps[-1].batch_sizes[step]


def test_bad_sizing_is_a_config_error(assignment):
    with pytest.raises(ConfigError, match="batch_sizes has no entry for bucket"):
        Planner(assignment, batch_size=BatchSizing(batch_sizes={(512, 512): 4}))
    with pytest.raises(ConfigError, match=r"batch_size must be a positive integer, got 2\.5"):
        Planner(assignment, batch_size=2.5)
