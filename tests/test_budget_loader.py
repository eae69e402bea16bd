"""Batches sized by bucket through the loader (issue 20): a pixel budget or a table, each step one batch size on
every rank, DALI serving a different batch size at each step, bit-exact resume, elastic resume by global units."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from dali_arb import BatchSizing, ConfigError, DALIBucketIterator, LoaderOptions, StateError
from dali_arb.data.manifest import Manifest

from .conftest import SMALL
from .resume import check_save_load_state, run_epochs
from .test_pairs import paired  # noqa: F401  (the fixture)

#: About 4 images of SMALL's base bucket (160x160) per rank and step; more of smaller buckets, fewer of larger.
BUDGET = 4 * 160 * 160


def budget_loader(manifest, **kw):
    options = {"batch_pixels": BUDGET, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "rank": 0, "world_size": 1, "leftover": "nearest"}  # fmt: skip
    options.update(kw)
    return DALIBucketIterator(str(manifest), **options)


def test_each_step_serves_its_buckets_batch_within_the_budget_and_every_image_once(dataset):
    _, manifest = dataset
    loader = budget_loader(manifest)
    per_bucket = {tuple(int(v) for v in s): int(b) for s, b in zip(loader._planner.index.sizes, loader._planner.batch)}
    assert len(set(per_bucket.values())) > 1  # the budget gives buckets different batch sizes
    served = Counter()
    sizes_seen = set()
    for batch in loader:
        h, w = batch["target_size"]
        planned = loader._planner.epoch(0).batch_size_at(batch["step"])
        assert batch["images"].shape == (planned, 3, h, w) and planned <= per_bucket[(h, w)]
        assert len(batch["ids"]) == batch["images"].shape[0] == len(batch["captions"]) == batch["flipped"].shape[0]
        assert len(batch["ids"]) * h * w <= BUDGET or len(batch["ids"]) == 1
        sizes_seen.add(len(batch["ids"]))
        served.update(batch["ids"])
    assert len(sizes_seen) > 1  # DALI served several batch sizes from one pipeline
    trimmed = loader._planner.epoch(0).trimmed
    assert set(served.values()) == {1} and len(served) == len(Manifest.read(manifest)) - trimmed
    assert loader.batch_size == max(per_bucket.values())


def test_partial_serves_remainders_at_their_own_bucket_and_drops_nothing(dataset):
    _, manifest = dataset
    loader = budget_loader(manifest, leftover="partial")
    table = Manifest.read(manifest)
    assigned = loader._planner.assignment.bucket
    sizes = loader._planner.index.sizes
    served = Counter()
    for batch in loader:
        rows = [int(np.flatnonzero(table.table.column("key").to_numpy(zero_copy_only=False) == key)[0])
                for key in batch["ids"]]  # fmt: skip
        assert {tuple(int(v) for v in sizes[assigned[r]]) for r in rows} == {batch["target_size"]}
        served.update(batch["ids"])
    assert len(served) == int((assigned >= 0).sum()) and set(served.values()) == {1}


def test_a_budget_run_resumes_bit_exactly_at_any_step(dataset):
    _, manifest = dataset
    check_save_load_state(lambda: budget_loader(manifest, flip=0.5), cuts=[1, 4, 9], epochs=2)


def test_options_objects_spell_the_same_budget(dataset):
    _, manifest = dataset
    flat = budget_loader(manifest)
    options = LoaderOptions(batch_size=BatchSizing(batch_pixels=BUDGET), seed=3, rank=0, world_size=1,
                            leftover="nearest", decode=flat.options.decode, workers=flat.options.workers)  # fmt: skip
    from dali_arb import Dataset

    grouped = DALIBucketIterator([Dataset(str(manifest), buckets=SMALL)], options=options)
    assert flat.state_dict() == grouped.state_dict()
    state = flat.state_dict()
    assert state["batch_size"] is None and state["batching"]["batch_pixels"] == BUDGET and state["format"] == 5


def test_elastic_resume_needs_the_same_global_batch_of_every_bucket(dataset):
    _, manifest = dataset
    two = budget_loader(manifest, world_size=2, batch_pixels=BUDGET)
    _, states = run_epochs(two, 1)
    state = states[2]
    # one rank with a table doubling every bucket's batch: the same global batches, so the state carries over
    doubled = {(int(w), int(h)): 2 * int(b) for (h, w), b in zip(two._planner.index.sizes, two._planner.batch)}
    one = budget_loader(manifest, world_size=1, batch_pixels=None, batch_sizes=doubled)
    one.load_state_dict(state)
    # the same budget on one rank gives other global batches: refused, with what to do
    with pytest.raises(StateError, match="needs the same global batch of every bucket"):
        budget_loader(manifest, world_size=1).load_state_dict(state)


def test_batch_size_and_a_budget_together_are_refused(dataset):
    _, manifest = dataset
    with pytest.raises(ConfigError, match="give batch_size or batch_pixels, not both"):
        budget_loader(manifest, batch_size=4)
    with pytest.raises(ConfigError, match="batch_pixels must be a positive integer, got 0"):
        budget_loader(manifest, batch_pixels=0)


def test_a_format_4_state_still_loads(dataset):
    _, manifest = dataset
    loader = DALIBucketIterator(str(manifest), batch_size=4, buckets=SMALL, device="cpu", workers=0, dtype="uint8",
                                rank=0, world_size=1, leftover="nearest")  # fmt: skip
    next(iter(loader))
    state = loader.state_dict()
    old = {k: v for k, v in state.items() if k != "batching"} | {"format": 4}
    fresh = DALIBucketIterator(str(manifest), batch_size=4, buckets=SMALL, device="cpu", workers=0, dtype="uint8",
                               rank=0, world_size=1, leftover="nearest")  # fmt: skip
    fresh.load_state_dict(old)
    assert fresh.state_dict() == state


def test_pairs_masks_and_captions_ride_along_with_budget_batches(paired, dataset):  # noqa: F811 (the fixture)
    """Every pair and mask is cut exactly as its image in batches of every size; captions stay with their ids."""
    from PIL import Image

    from .test_pairs import psnr

    _, manifest = paired
    it = budget_loader(manifest, flip=0.5, crop="random")
    sizes, worst_pair, worst_mask = set(), math.inf, math.inf
    for batch in it:
        images, depth, hole = batch["images"], batch["depth"], batch["hole"]
        assert depth.shape == images.shape and hole.shape == (images.shape[0], 1, *images.shape[2:])
        assert images.shape[0] == it._planner.epoch(0).batch_size_at(batch["step"])
        sizes.add(images.shape[0])
        for i in range(images.shape[0]):
            image = images[i].permute(1, 2, 0).numpy()
            worst_pair = min(worst_pair, psnr(255 - depth[i].permute(1, 2, 0).numpy(), image))
            worst_mask = min(worst_mask, psnr(hole[i, 0].numpy(), np.asarray(Image.fromarray(image).convert("L"))))
    assert it.failed == [] and max(sizes) * 160 * 160 <= 2 * BUDGET
    assert worst_pair > 27 and worst_mask > 30, (worst_pair, worst_mask)
    _, photos = dataset
    for batch in budget_loader(photos, caption_dropout=0.0):
        assert batch["captions"] == [f"caption {int(key[3:])}" for key in batch["ids"]]
