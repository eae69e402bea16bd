"""Hostile review of issue 20 (batch sizes by bucket): failing regression tests, one defect each (the docstring
names it). They pass once the defect is fixed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dali_arb import BucketSpec, ConfigError, DALIBucketIterator, PlanError, Planner, StateError, World
from dali_arb.plan.batching import BatchSizing

from .conftest import SMALL

BUDGET = 4 * 160 * 160


def _loader(manifest, **kw):
    options = {"batch_pixels": BUDGET, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "rank": 0, "world_size": 1, "leftover": "nearest"}  # fmt: skip
    options.update(kw)
    return DALIBucketIterator(str(manifest), **options)


@pytest.mark.parametrize("leftover", ["partial", "auto"])
def test_independent_partial_with_fewer_images_than_ranks_plans_or_says_why(leftover):
    """Defect: sync_ranks=False with leftover 'partial' (or 'auto', which resolves to it for small datasets) and a
    rank that gets no image (fewer images than ranks) crashes with a raw IndexError from the repeat accounting
    (plan/planner.py _plan_independent: ``sizes[np.arange(...) % n_real[q]]`` with n_real[q] == 0, after a
    divide-by-zero RuntimeWarning). It must plan (equal len on every rank, no empty batch) or raise PlanError."""
    a = BucketSpec().assign(np.array([512, 832]), np.array([512, 448]))  # 2 images
    W = 3
    try:
        plans = [Planner(a, batch_size=1, world=World(r, W), leftover=leftover, sync_ranks=False).epoch(0)
                 for r in range(W)]  # fmt: skip
    except PlanError:
        return
    assert len({len(p) for p in plans}) == 1
    for p in plans:
        for s in range(len(p)):
            assert p.batch_size_at(s) >= 1 and len(p.rows_at(s)) == p.batch_size_at(s)


def test_batch_pixels_none_next_to_batch_size_is_not_given(dataset):
    """Defect: an unused sizing keyword passed as None (``batch_pixels=None``, the way argparse and config files pass
    options) counts as given: ``DALIBucketIterator(m, batch_size=4, batch_pixels=None)`` raises ConfigError "give
    batch_size or batch_pixels, not both" (loader/options.py from_keywords: ``if k in top``, not ``is not None``)."""
    _, manifest = dataset
    loader = _loader(manifest, batch_pixels=None, batch_size=4, max_batch=None, batch_sizes=None)
    assert loader.batch_size == 4


def test_a_pixel_budget_too_large_for_int64_is_a_config_error():
    """Defect: BatchSizing accepts any Python int as batch_pixels (or max_batch), then per_bucket overflows NumPy's
    int64 with a raw OverflowError; `dali-arb buckets M --batch-pixels 9999999999999999999999999999` prints
    'internal error: OverflowError ... report it' (plan/batching.py _positive / per_bucket)."""
    sizes = np.array([[1024, 1024], [512, 512]])
    with pytest.raises(ConfigError):
        BatchSizing(batch_pixels=2**70).per_bucket(sizes)


def test_the_pipeline_is_not_built_for_batches_no_step_can_serve(dataset):
    """Defect: the pipeline's batch size (loader.batch_size = Planner.max_batch = max over ALL buckets of b_k) ignores
    how many images there are: 36 images with batch_pixels=10**9 build a pipeline for 48,828 samples per batch (and
    allow 48,829 recovery rounds); the /dev/shm chunks and the GPU decoder's preallocation scale with it. No step of
    any epoch serves more than the dataset holds here (plan/planner.py Planner.__init__ max_batch; loader/session.py
    batch_size)."""
    _, manifest = dataset
    loader = _loader(manifest, batch_pixels=10**9, leftover="partial")
    served = max(int(loader._planner.epoch(e).batch_sizes.max()) for e in range(3))
    assert served <= 36
    assert loader.batch_size <= 36


def test_dev_shm_sizing_with_a_budget_uses_each_buckets_own_batch_bytes(dataset, monkeypatch):
    """Defect: with worker processes, /dev/shm is sized as bytes_per_sample(LARGEST bucket) x max_batch (the batch of
    the SMALLEST bucket), a product no step ever reaches under a pixel budget: a budget loader is refused
    (ResourceError) on a /dev/shm that holds its real batches (loader/resources.py plan_read_ahead, per_batch =
    per_sample * batch_size; the same product is DALI's bytes_per_sample_hint x batch_size chunk)."""
    import dali_arb.loader.resources as module

    _, manifest = dataset
    big = BucketSpec(max_area=320 * 320, min_dim=128, max_dim=640, step=64, base=(320, 320))
    kw = {"buckets": [SMALL, big], "batch_pixels": 4 * 320 * 320, "leftover": "partial"}
    probe = DALIBucketIterator([str(manifest)] * 2, device="cpu", workers=2, worker_kind="thread", dtype="uint8",
                               seed=3, rank=0, world_size=1, **kw)  # fmt: skip
    planner, decoder = probe._planner, probe.decoder
    encoded = int(probe._served_p99["length"] or 0)
    area = planner.index.sizes[:, 0] * planner.index.sizes[:, 1]
    real = max(int(b) * decoder.bytes_per_sample(encoded, int(a)) for b, a in zip(planner.batch, area))
    inflated = int(planner.batch.max()) * decoder.bytes_per_sample(encoded, int(area.max()))
    assert inflated > real  # the budget gives the small buckets more images
    # room for one batch ahead plus the pipeline's prefetch (2) of the largest real batch
    monkeypatch.setattr(module, "free_shared_memory", lambda: 3 * real)
    DALIBucketIterator([str(manifest)] * 2, device="cpu", workers=2, worker_kind="process", dtype="uint8", seed=3,
                       rank=0, world_size=1, **kw)  # fmt: skip


def test_refusing_a_budget_state_on_the_same_world_size_does_not_blame_the_world_size(dataset):
    """Defect (misleading): a budget state loaded into a fixed-batch loader on the SAME world size is refused with
    "...resuming on another world size needs the same global batch of every bucket..." and the raw dict of the
    sizing; the world size did not change, the batch sizes did (loader/state.py check_resumable)."""
    _, manifest = dataset
    budget = _loader(manifest)
    next(iter(budget))
    state = json.loads(json.dumps(budget.state_dict()))
    fixed = DALIBucketIterator(
        str(manifest), batch_size=4, buckets=SMALL, device="cpu", workers=0, dtype="uint8", seed=3, rank=0,
        world_size=1, leftover="nearest")  # fmt: skip
    with pytest.raises(StateError) as raised:
        fixed.load_state_dict(state)
    assert "another world size" not in str(raised.value)
