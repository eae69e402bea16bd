"""Several datasets in one loader: repeats served exactly, fractions as moving windows, multi-resolution
buckets, every planner guarantee, through the loader and the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dali_arb import BucketSpec, ConfigError, DALIBucketIterator, Manifest, Planner, World
from dali_arb.cli import main
from dali_arb.index import build_index
from dali_arb.plan.buckets import BucketIndex
from dali_arb.plan.mixture import MixedIndex, check_repeats

from .conftest import SMALL, copy_photos, random_sizes
from .resume import check_save_load_state

LOW = BucketSpec(max_area=256 * 256, min_dim=128, max_dim=512, step=64, base=(256, 256))
HIGH = BucketSpec(max_area=512 * 512, min_dim=256, max_dim=1024, step=64, base=(512, 512))


def mixed(repeats, specs=(LOW, HIGH), n=(700, 500), seed=1) -> MixedIndex:
    indexes = []
    for i, (spec, count) in enumerate(zip(specs, n)):
        h, w = random_sizes(count, seed=10 + i)
        indexes.append(BucketIndex.of(spec.assign(h, w)))
    return MixedIndex(indexes, check_repeats(repeats, len(indexes)), list(specs), seed=seed)


def served(index, *, epoch, world=4, batch=4, **kw) -> tuple[Counter, list]:
    plans = [Planner(index, batch_size=batch, world=World(r, world), seed=5, **kw).epoch(epoch) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # equal steps on every rank
    counts = Counter(np.concatenate([p.rows.ravel() for p in plans]).tolist())
    return counts, plans


def test_whole_repeats_serve_each_image_exactly_that_often():
    index = mixed([3, 1])
    counts, plans = served(index, epoch=0)
    a_rows = range(0, int(index.offsets[1]))
    usable_a = {int(r) for r in index.indexes[0].members + index.offsets[0]}
    usable_b = {int(r) + int(index.offsets[1]) for r in index.indexes[1].members}
    short = sum(3 - counts.get(r, 0) for r in usable_a) + sum(1 - counts.get(r, 0) for r in usable_b)
    assert all(counts.get(r, 0) <= 3 for r in a_rows) and all(counts.get(r, 0) <= 1 for r in usable_b)
    assert short == plans[0].trimmed < 16  # fewer than one global batch trimmed, nothing else missing
    assert sum(counts.values()) == len(plans[0]) * 16


def test_a_fraction_serves_that_share_another_window_each_epoch_fairly():
    index = mixed([1, 0.5])
    b = index.indexes[1]
    usable_b = np.sort(b.members.astype(np.int64)) + int(index.offsets[1])
    least = sum(int(np.floor(0.5 * n)) for n in b.counts() if n)  # a window is floor or ceil of 0.5 n (issue 18 f2)
    most = sum(int(np.ceil(0.5 * n)) for n in b.counts() if n)
    over = Counter()
    windows = []
    for epoch in range(4):
        counts, _ = served(index, epoch=epoch, world=1, batch=1)  # one sample per batch: nothing trimmed
        this = {r for r in usable_b.tolist() if counts.get(r)}
        assert least <= len(this) <= most and all(counts[r] == 1 for r in this)  # each window image served once
        windows.append(this)
        over.update(this)
    assert windows[0] != windows[1]
    served_counts = [over.get(r, 0) for r in usable_b.tolist()]
    assert max(served_counts) - min(served_counts) <= 1  # every image as often as any other, within one


def test_leftovers_stay_within_their_resolution_group():
    index = mixed([1, 1], n=(900, 900))
    low_sizes = {tuple(s) for s in LOW.sizes.tolist()}
    for epoch in range(3):
        _, plans = served(index, epoch=epoch, world=1, batch=8)
        plan = plans[0]
        straddling = 0
        for step in range(len(plan)):
            groups = set(index.groups[index.dataset_of(plan.rows_at(step))].tolist())
            straddling += len(groups) > 1
            if groups == {0}:  # a low-resolution batch never takes a high-resolution bucket
                assert tuple(plan.sizes[plan.bucket_at(step)].tolist()) in low_sizes
        assert straddling <= 1  # at most the one batch where the two groups' last leftovers meet


@pytest.mark.parametrize(
    ("policy", "sync"),  # duplicate needs ranks in sync (refused otherwise: test_planner)
    [("nearest", True), ("nearest", False), ("drop", True), ("drop", False), ("duplicate", True)],
)
def test_every_policy_plans_equal_steps_and_is_reproducible(policy, sync):
    index = mixed([2, 0.5])
    _, plans = served(index, epoch=1, leftover=policy, sync_ranks=sync)
    again = Planner(index, batch_size=4, world=World(2, 4), seed=5, leftover=policy, sync_ranks=sync).epoch(1)
    for step in (0, len(again) // 2, len(again) - 1):
        assert np.array_equal(again.rows_at(step), plans[2].rows[step])
        assert again.bucket_at(step) == plans[2].bucket[step]


def test_repeats_are_checked_in_one_line():
    for bad, message in [
        ([1], r"one number per dataset \(2\), got \[1\]"),
        ([1, -1], r"non-negative numbers \(3, 0.5\), got \[1, -1\]"),
        ([0, 0], r"at least one dataset, got \[0, 0\]"),
        (["a", 1], "non-negative numbers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_repeats(bad, 2)
    assert check_repeats(None, 2) == (1.0, 1.0) and check_repeats(2, 3) == (2.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def two(tmp_path_factory, dataset):
    """The photo dataset split in two manifests: ``(first, second)``."""
    root = tmp_path_factory.mktemp("two")
    photos = sorted(dataset[0].glob("*.jpg"))
    first = copy_photos(dataset[0], root / "a", count=20)
    second = root / "b"
    second.mkdir()
    for f in photos[20:]:
        (second / f.name).write_bytes(f.read_bytes())
        (second / f.with_suffix(".txt").name).write_bytes(f.with_suffix(".txt").read_bytes())
    build_index([str(first)], root / "a.parquet", progress=False)
    build_index([str(second)], root / "b.parquet", progress=False)
    return root / "a.parquet", root / "b.parquet"


def loader(manifests, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "leftover": "nearest"}  # fmt: skip
    return DALIBucketIterator([m if isinstance(m, Manifest) else str(m) for m in manifests], **{**options, **kw})


def test_the_loader_serves_several_datasets_and_says_which(two):
    a, b = two
    keys = [set(Manifest.read(m).keys.to_pylist()) for m in (a, b)]
    it = loader([a, b], repeats=[2, 1])
    counts: Counter = Counter()
    for batch in it:
        assert batch["dataset"].dtype.is_floating_point is False and batch["dataset"].shape == (4,)
        for key, d, caption in zip(batch["ids"], batch["dataset"].tolist(), batch["captions"]):
            assert key in keys[d] and caption == f"caption {int(key[3:])}"
            counts[(d, key)] += 1
    assert {n for (d, _), n in counts.items() if d == 0} <= {1, 2} and {
        n for (d, _), n in counts.items() if d == 1
    } == {1}
    assert sum(counts.values()) == (2 * 20 + len(keys[1])) // 4 * 4
    state = it.state_dict()
    assert state["repeats"] == [2.0, 1.0] and isinstance(state["manifest"], list)


def test_several_datasets_resume_exactly_with_a_spec_each(two):
    a, b = two
    steps = len(loader([a, b], repeats=[1, 0.5], buckets=[SMALL, SMALL]))
    check_save_load_state(
        lambda: loader([a, b], repeats=[1, 0.5], buckets=[SMALL, SMALL], flip=0.5, workers=1), [1, steps - 1]
    )
    with pytest.raises(Exception, match="repeats"):
        loader([a, b], repeats=[1, 1]).load_state_dict(loader([a, b], repeats=[1, 0.5]).state_dict())


def test_datasets_with_other_pairs_are_refused_in_one_line(two, tmp_path):
    import pyarrow as pa

    from dali_arb.data.pairs import pair_schema

    a, b = two
    table = Manifest.read(b).table
    paired = pa.Table.from_arrays(
        [*table.columns, pa.array(table.column("source").to_pylist()), pa.array([0] * len(table), pa.int64()),
         pa.array([-1] * len(table), pa.int64()), table.column("width"), table.column("height")],
        schema=pair_schema(table.schema, {"depth": "pair"}),
    )  # fmt: skip
    with pytest.raises(Exception, match="different paired images"):
        loader([Manifest.read(a), Manifest(paired)])


def test_cli_buckets_and_plan_take_several_manifests(two, capsys):
    a, b = two
    assert main(["buckets", str(a), str(b), "--repeats", "2,0.5", "-b", "4", "--min-dim", "64", "--max-dim", "320",
                 "--step", "32", "--max-area", str(160 * 240), "--base", "160x160", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert [d["repeats"] for d in report["options"]["datasets"]] == [2.0, 0.5]
    assert report["totals"]["samples_per_epoch"] == sum(bucket["images"] for bucket in report["buckets"])
    assert main(["plan", str(a), str(b), "--repeats", "2,0.5", "-b", "4", "--leftover", "nearest"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(len(line["datasets"]) == len(line["ids"]) == 4 for line in lines)
    assert {d for line in lines for d in line["datasets"]} == {0, 1}
    assert main(["plan", str(a), str(b), "--repeats", "1", "-b", "4"]) != 0
    err = capsys.readouterr().err.strip()
    assert "repeats must give one number per dataset (2), got [1.0]" in err and "\n" not in err
    assert main(["plan", str(a), "--repeats", "x", "-b", "4"]) != 0
    assert "expected numbers separated by commas" in capsys.readouterr().err
