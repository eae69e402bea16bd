"""Planning clips (issue 21): which frames (plan/frames.py: FrameSpec, clip_table, frame_indices), property-tested
with hypothesis, and the planner over clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_arb.errors import ConfigError
from dali_arb.plan.frames import FrameSpec, clip_table, frame_indices, usable_frames

BUCKETS = st.lists(st.integers(1, 97), min_size=1, max_size=5, unique=True)
RATES = st.sampled_from([12.0, 15.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0, 120.0])
MODES = st.sampled_from(["head", "uniform", "slide", "chunk"])


@st.composite
def specs(draw):
    return FrameSpec(
        frames=tuple(draw(BUCKETS)),
        fps=draw(st.none() | RATES),
        clip=draw(MODES),
        stride=draw(st.integers(1, 40)),
        count=draw(st.integers(1, 6)),
        images=draw(st.booleans()),
    )


@st.composite
def videos(draw):
    """``(frames, fps, duration)`` columns of a few rows; frames <= 0 for images."""
    n = draw(st.integers(1, 12))
    frames = np.array([draw(st.integers(-1, 400)) for _ in range(n)], np.int64)
    fps = np.array([draw(RATES) for _ in range(n)], np.float64)
    duration = np.where(frames > 0, np.maximum(frames, 0) / fps, np.nan)
    return frames, fps, duration


@settings(max_examples=300, deadline=None)
@given(spec=specs(), columns=videos())
def test_clip_table_properties(spec, columns):
    frames, fps, duration = columns
    if not spec.images or 1 not in spec.frames:
        spec = FrameSpec(**{**spec.to_dict(), "images": False})
    table = clip_table(frames, fps, duration, spec)
    usable = usable_frames(frames, fps, duration, spec)
    assert table.row.dtype == np.int64 and table.length.dtype == np.int32 and table.start.dtype == np.int32
    assert np.all(np.diff(table.row) >= 0)  # in row order
    for r in range(len(frames)):
        mine = table.row == r
        lengths, starts = table.length[mine], table.start[mine]
        if frames[r] <= 0:  # an image: one 1-frame clip, or none when left out
            assert len(lengths) == (1 if spec.images else 0)
            assert np.all(lengths == 1) and np.all(starts == 0)
            continue
        fits = [f for f in spec.frames if f <= usable[r]]
        if not fits:
            assert not mine.any()
            continue
        F = max(fits)  # the largest bucket the usable length fills
        assert np.all(lengths == F)
        assert np.all(starts >= 0) and np.all(starts + F <= usable[r])  # every clip inside the video
        assert np.all(np.diff(starts) >= 0)
        n = int(usable[r])
        expected = {
            "head": [0],
            "chunk": list(range(0, n - F + 1, F)),
            "slide": list(range(0, n - F + 1, spec.stride)),
            "uniform": list(np.linspace(0, n - F, spec.count, dtype=int)) if spec.count > 1 else [0],
        }[spec.clip]
        assert list(starts) == expected
        for start in starts:  # every clip's frames exist in the source
            index = frame_indices(spec, start=int(start), length=F, n_frames=int(frames[r]), fps=float(fps[r]))
            assert len(index) == F and np.all(np.diff(index) >= 0)
            assert index[0] >= 0 and index[-1] < frames[r]


def test_usable_length_counts_target_rate_frames():
    spec = FrameSpec(frames=(1, 17, 33), fps=24)
    # 120 frames at 60 fps = 2 s = 48 frames at 24 fps; 30 at 30 fps = 24; 10 at 24 fps = 10; an image: 0
    usable = usable_frames(np.array([120, 30, 10, -1]), np.array([60, 30, 24, 0.0]), np.array([2, 1, 10 / 24, 0]), spec)
    assert list(usable) == [48, 24, 10, 0]
    table = clip_table(np.array([120, 30, 10, -1]), np.array([60, 30, 24, 0.0]), np.array([2, 1, 10 / 24, 0]), spec)
    assert list(table.length) == [33, 17, 1, 1]


def test_sixty_fps_at_twenty_four_takes_every_two_and_a_half_frames():
    spec = FrameSpec(frames=(17,), fps=24)
    index = frame_indices(spec, start=0, length=17, n_frames=120, fps=60)
    assert list(index[:6]) == [0, 2, 5, 7, 10, 12]
    np.testing.assert_array_equal(index, np.floor(np.arange(17) * 2.5).astype(int))
    later = frame_indices(spec, start=10, length=4, n_frames=120, fps=60)
    assert list(later) == [25, 27, 30, 32]


@settings(max_examples=200, deadline=None)
@given(source=RATES, target=RATES, start=st.integers(0, 50), length=st.integers(1, 40))
def test_constant_rate_indices_are_the_frame_on_screen(source, target, start, length):
    spec = FrameSpec(frames=(length,), fps=target)
    n_frames = math.ceil((start + length) * source / target) + 1
    index = frame_indices(spec, start=start, length=length, n_frames=n_frames, fps=source)
    t = np.arange(start, start + length) / target
    assert np.all(np.diff(index) >= 0)
    # frame index i is on screen from i / source to (i + 1) / source
    assert np.all(index / source <= t + 1e-9) and np.all(t < (index + 1) / source + 1e-9)
    if target <= source:
        assert np.all(np.diff(index) >= 1)  # slower target: never the same frame twice


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0]), min_size=2, max_size=80),
    target=RATES,
    base=RATES,
    start=st.integers(0, 10),
)
def test_variable_rate_indices_follow_timestamps(steps, target, base, start):
    times = np.concatenate([[0.0], np.cumsum(np.asarray(steps) / base)]).astype(np.float32)
    n = len(times)
    duration = float(times[-1]) + float(np.mean(steps)) / base
    spec = FrameSpec(frames=(1,), fps=target)
    usable = int(usable_frames(np.array([n]), np.array([n / duration]), np.array([duration]), spec)[0])
    if start >= usable:
        return
    length = usable - start
    index = frame_indices(spec, start=start, length=length, n_frames=n, fps=n / duration, frame_times=times)
    t = np.arange(start, start + length) / target
    assert np.all(np.diff(index) >= 0) and index[0] >= 0 and index[-1] < n
    assert np.all(times[index] <= t + 1e-5)  # the frame shown at t started at or before t
    nxt = np.minimum(index + 1, n - 1)
    assert np.all((index == n - 1) | (times[nxt] > t - 1e-5))  # ... and the next had not started


def test_variable_rate_by_timestamp_not_by_average():
    times = np.array([0.0, 0.1, 0.2, 0.6, 0.7, 0.8], np.float32)  # a 0.4 s pause after frame 2
    spec = FrameSpec(frames=(8,), fps=10)
    index = frame_indices(spec, start=0, length=8, n_frames=6, fps=6 / 0.9, frame_times=times)
    assert list(index) == [0, 1, 2, 2, 2, 2, 3, 4]


def test_own_rate_takes_consecutive_frames():
    spec = FrameSpec(frames=(5,), clip="slide", stride=3)
    table = clip_table(np.array([11]), np.array([25.0]), np.array([11 / 25]), spec)
    assert list(table.start) == [0, 3, 6]
    assert list(frame_indices(spec, start=6, length=5, n_frames=11, fps=25)) == [6, 7, 8, 9, 10]


def test_images_need_the_one_frame_bucket():
    with pytest.raises(ConfigError, match=r"holds 2 images.*frames=\(17, 33\) has no 1"):
        clip_table(np.array([-1, 50, 0]), np.array([0, 24, 0.0]), np.array([0, 2, 0.0]), FrameSpec(frames=(33, 17)))
    table = clip_table(np.array([-1, 50]), np.array([0, 24.0]), np.array([0, 50 / 24]), FrameSpec((17,), images=False))
    assert list(table.row) == [1]
    masked = np.ma.masked_array([7, 50], mask=[True, False])
    assert list(clip_table(masked, np.array([0, 24.0]), np.array([0, 50 / 24]), FrameSpec((1, 17))).length) == [1, 17]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"frames": ()}, "at least one frame bucket"),
        ({"frames": (0, 17)}, "every frame bucket must be a positive integer, got 0"),
        ({"frames": "17"}, "positive integer, got '1'"),
        ({"frames": (17,), "fps": -24}, "fps must be a positive frame rate or None.*-24"),
        ({"frames": (17,), "clip": "full"}, "clip must be one of head, uniform, slide, chunk, got 'full'"),
        ({"frames": (17,), "stride": 0}, "stride must be a positive integer, got 0"),
        ({"frames": (17,), "count": 1.5}, r"count .* got 1\.5"),
        ({"frames": (17,), "images": "yes"}, "images must be True"),
    ],
)
def test_frame_spec_refuses_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        FrameSpec(**options)


def test_frame_spec_sorts_and_fingerprints():
    spec = FrameSpec(frames=[33, 1, 17, 17], fps=24)
    assert spec.frames == (1, 17, 33)
    assert spec.fingerprint() == FrameSpec(frames=(1, 17, 33), fps=24.0).fingerprint()
    others = [FrameSpec((1, 17, 33), fps=25), FrameSpec((1, 17), fps=24), FrameSpec((1, 17, 33), fps=24, clip="chunk"),
              FrameSpec((1, 17, 33), fps=24, clip="slide", stride=2), FrameSpec((1, 17, 33), fps=24, images=False)]  # fmt: skip
    assert len({spec.fingerprint(), *(o.fingerprint() for o in others)}) == 1 + len(others)


# -- the planner over clips ------------------------------------------------------------------------------------------

from collections import Counter  # noqa: E402

from dali_arb.plan.batching import BatchSizing  # noqa: E402
from dali_arb.plan.buckets import BucketSpec  # noqa: E402
from dali_arb.plan.planner import make_planner  # noqa: E402
from dali_arb.plan.world import World  # noqa: E402

SPEC = BucketSpec(max_area=256 * 256, min_dim=128, max_dim=512, step=64, base=(256, 256))
FRAMES = FrameSpec(frames=(1, 9, 17), fps=24, clip="chunk")


def dataset(n: int, seed: int, video_share: float = 0.7):
    """``(assignment, (frames, fps, duration))`` of ``n`` rows, ``video_share`` of them videos."""
    rng = np.random.default_rng(seed)
    heights, widths = rng.integers(200, 900, n), rng.integers(200, 900, n)
    is_video = rng.random(n) < video_share
    frames = np.where(is_video, rng.integers(5, 120, n), -1)
    fps = np.where(is_video, rng.choice([24.0, 30.0, 60.0], n), np.nan)
    duration = np.where(is_video, frames / fps, np.nan)
    return SPEC.assign(heights, widths), (frames, fps, duration)


def plans_of(datasets, *, world, leftover, batch=4, repeats=None, epoch=0, spec=FRAMES, seed=3):
    planners = [
        make_planner([a for a, _ in datasets], [SPEC] * len(datasets), batch_size=batch, world=World(r, world),
                     leftover=leftover, repeats=repeats, seed=seed, frames=spec, videos=[v for _, v in datasets])
        for r in range(world)
    ]  # fmt: skip
    return planners, [p.epoch(epoch) for p in planners]


@pytest.mark.parametrize("leftover", ["nearest", "drop", "partial", "duplicate"])
@pytest.mark.parametrize("world", [1, 4])
def test_every_guarantee_with_clips(leftover, world):
    data = [dataset(300, seed=1)]
    planners, plans = plans_of(data, world=world, leftover=leftover)
    clips = planners[0].clips
    assert len(clips) > 300  # chunk cuts several clips from the longer videos
    steps = {len(p) for p in plans}
    assert len(steps) == 1  # equal steps on every rank
    for step in range(len(plans[0])):
        assert len({p.bucket_at(step) for p in plans}) == 1  # the same bucket on every rank
        assert len({p.frames_at(step) for p in plans}) == 1
        for p in plans:  # a step's frame count never exceeds any of its clips' own: served shorter, never longer
            assert np.all(clips.length[p.rows_at(step)] >= p.frames_at(step))
    served = Counter(np.concatenate([p.flat_rows for p in plans]).tolist())
    usable = set(planners[0].index.members.astype(int).tolist())
    first = plans[0]
    if leftover in ("nearest", "drop"):  # exactly once, counting clips: all but the trimmed ones
        assert set(served.values()) == {1}
        assert len(served) == len(usable) - first.trimmed - first.dropped
        assert first.trimmed < world * 4
    elif leftover == "partial":  # every clip at least once; repeats only to fill the ranks' slots
        assert set(served) == usable
        assert sum(served.values()) - len(usable) == first.duplicated
    else:
        assert sum(served.values()) == len(usable) - first.dropped + first.duplicated


def test_clip_batches_by_frames_times_pixels():
    data = [dataset(400, seed=2)]
    budget = 8 * 256 * 256
    planners, plans = plans_of(data, world=1, leftover="partial", batch=BatchSizing(batch_pixels=budget))
    planner, plan = planners[0], plans[0]
    for k in np.flatnonzero(planner.index.counts()):
        h, w = planner.index.sizes[k]
        assert planner.batch[k] == max(1, budget // (int(planner.frames[k]) * int(h) * int(w)))
    for step in range(len(plan)):
        h, w = plan.size(step)
        assert plan.batch_size_at(step) * plan.frames_at(step) * h * w <= max(budget, plan.frames_at(step) * h * w)
    assert {plan.frames_at(s) for s in range(len(plan))} == {1, 9, 17}


def test_frames_at_is_one_for_images():
    assignment, _ = dataset(100, seed=4)
    plan = make_planner([assignment], [SPEC], batch_size=4).epoch(0)
    assert plan.frames is None and plan.frames_at(0) == 1


def test_clip_plan_is_a_pure_function_resume_and_ranks_agree():
    data = [dataset(300, seed=5)]
    _, first = plans_of(data, world=2, leftover="nearest", epoch=1)
    _, again = plans_of(data, world=2, leftover="nearest", epoch=1)
    for a, b in zip(first, again):  # a fresh planner (a resume) serves the same clips at every step
        np.testing.assert_array_equal(a.flat_rows, b.flat_rows)
        np.testing.assert_array_equal(a.bucket, b.bucket)
    _, other = plans_of(data, world=2, leftover="nearest", epoch=2)
    assert not np.array_equal(first[0].flat_rows, other[0].flat_rows)  # another epoch, another order


def test_several_datasets_and_repeats_count_clips():
    data = [dataset(200, seed=6), dataset(150, seed=7, video_share=0.2)]
    planners, plans = plans_of(data, world=1, leftover="partial", repeats=[2, 1], batch=1)
    planner = planners[0]
    table = planner.clips
    offset = 200  # dataset 1's rows follow dataset 0's
    assert np.all(np.diff(table.row) >= 0) and table.row.max() < 350
    served = Counter(plans[0].flat_rows.tolist())
    first_clips = np.flatnonzero(table.row < offset)
    usable = set(planner.index.rows.to_global(0, planner.index.indexes[0].members).tolist())
    assert all(served[c] == 2 for c in first_clips if c in usable)  # repeats=2: each clip twice
    assert all(v == 1 for c, v in served.items() if table.row[c] >= offset)
    for step in range(len(plans[0])):
        assert np.all(table.length[plans[0].rows_at(step)] >= plans[0].frames_at(step))


def test_images_excluded_and_uniform_count():
    data = [dataset(200, seed=8)]
    spec = FrameSpec(frames=(9, 17), fps=24, clip="uniform", count=3, images=False)
    planners, plans = plans_of(data, world=1, leftover="partial", spec=spec)
    frames = data[0][1][0]
    table = planners[0].clips
    assert np.all(frames[table.row] > 0)  # no image
    assert set(Counter(table.row.tolist()).values()) == {3}
    assert {plans[0].frames_at(s) for s in range(len(plans[0]))} <= {9, 17}


def test_frames_needs_video_columns():
    assignment, columns = dataset(50, seed=9)
    with pytest.raises(ConfigError, match=r"give the .frames, fps, duration. columns of each of the 1 datasets"):
        make_planner([assignment], [SPEC], batch_size=2, frames=FRAMES)
    with pytest.raises(ConfigError, match="video columns have 49 rows, the bucket index 50"):
        make_planner([assignment], [SPEC], batch_size=2, frames=FRAMES, videos=[tuple(c[:49] for c in columns)])


# -- from videos on disk to a plan: the manifest's columns, the loader's planner and the CLI ------------------------


@pytest.fixture(scope="module")
def video_manifest(tmp_path_factory):
    pytest.importorskip("av")
    import shutil

    from dali_arb.index import build_index
    from dali_arb.tools.clips import make_clip

    folder = tmp_path_factory.mktemp("videos")
    data = folder / "data"
    data.mkdir()
    make_clip(data / "a60.mp4", fps=60, frames=90, size=(128, 72))  # 1.5 s: 36 frames at 24 fps
    make_clip(data / "b30.webm", codec="vp9", fps=30, frames=24, size=(96, 64))  # 0.8 s: 20 frames at 24 fps
    make_clip(data / "c24.avi", codec="mjpeg", fps=24, frames=12, size=(64, 64))  # 12 frames
    make_clip(data / "d_vfr.mp4", fps=30, frames=40, size=(64, 64), vfr=True)
    samples = __import__("pathlib").Path(__file__).parent.parent / "dali_arb" / "samples"
    shutil.copy(samples / "coffee.jpg", data)
    build_index([str(data)], folder / "m.parquet", workers=1)
    return folder / "m.parquet"


def test_loader_config_plans_clips_from_a_manifest(video_manifest):
    from dali_arb.data.manifest import Manifest
    from dali_arb.loader.planning import LoaderConfig, build_planner

    spec = FrameSpec(frames=(1, 9, 17), fps=24, clip="chunk")
    manifest = Manifest.open(video_manifest)  # mapped through the node cache
    assert {"frames", "fps", "duration"} <= set(manifest.table.column_names)  # mapped too: no Parquet read per process
    frames, fps, _ = manifest.video_columns()
    keys = manifest.keys_at(np.arange(len(manifest)))
    by_key = dict(zip(keys, zip(frames.tolist(), fps.tolist())))
    assert by_key["coffee"][0] == -1 and by_key["a60"] == (90, 60.0) and by_key["b30"] == (24, 30.0)
    config = LoaderConfig(batch_size=2, spec=BucketSpec(), seed=0, rank=0, world_size=1, leftover="partial",
                          sync_ranks=True, crop="random", flip=0.0, frames=spec)  # fmt: skip
    planner = build_planner(config, manifest)
    table = planner.clips
    clips = Counter(keys[r] for r in table.row.tolist())
    assert clips == {"a60": 2, "b30": 1, "c24": 1, "d_vfr": 2, "coffee": 1}  # 36 -> 2x17, 20 -> 17, 12 -> 9
    plan = planner.epoch(0)
    assert sorted(plan.flat_rows.tolist()) == list(range(len(table)))  # every clip once
    assert config.to_dict()["frames"] == spec.fingerprint()
    other = LoaderConfig(**{**config.__dict__, "frames": None})
    assert "frames" not in other.to_dict()  # an image loader's state is unchanged


def test_cli_buckets_and_plan_with_frames(video_manifest, capsys):
    import json

    from dali_arb.cli import main

    assert main(["buckets", str(video_manifest), "--frames", "1,9,17", "--fps", "24", "--clip", "chunk", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clips"] == 7 and report["videos"] == 4 and report["clips_from_videos"] == 6
    assert {b["frames"] for b in report["buckets"]} == {1, 9, 17}
    assert sum(b["clips"] for b in report["buckets"]) == 7
    assert main(["plan", str(video_manifest), "--frames", "1,9,17", "--fps", "24", "--clip", "chunk", "-b", "1"]) == 0
    steps = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(steps) == 7 and all(len(s["ids"]) == 1 and len(s["starts"]) == 1 for s in steps)
    served = sorted((s["ids"][0], s["starts"][0], s["frames"]) for s in steps)
    assert served[:4] == [("a60", 0, 17), ("a60", 17, 17), ("b30", 0, 17), ("c24", 0, 9)]
    assert main(["buckets", "--frames", "1,17", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["buckets"]
    assert {b["frames"] for b in listed} == {1, 17} and len(listed) == 2 * len(BucketSpec().sizes)


def test_cli_refuses_clip_options_without_frames(video_manifest, capsys):
    from dali_arb.cli import main

    assert main(["plan", str(video_manifest), "--clip", "slide"]) != 0
    assert "--clip cut clips from videos: give --frames too" in capsys.readouterr().err
    assert main(["plan", str(video_manifest), "--frames", "9,17"]) != 0
    assert "holds 1 images, which are 1-frame samples" in capsys.readouterr().err


def test_a_duration_longer_than_the_frames_is_not_trusted():
    spec = FrameSpec(frames=(1, 17), fps=24)
    # 24 frames at 24 fps last 1 s whatever a metadata duration of 3 s says: 24 target frames, not 72
    assert list(usable_frames(np.array([24]), np.array([24.0]), np.array([3.0]), spec)) == [24]
    table = clip_table(np.array([24]), np.array([24.0]), np.array([3.0]), FrameSpec((1, 17), fps=24, clip="chunk"))
    for start, length in zip(table.start, table.length):
        assert frame_indices(spec, start=int(start), length=int(length), n_frames=24, fps=24.0)[-1] < 24


@pytest.mark.parametrize("leftover", ["nearest", "drop", "partial"])
def test_independent_ranks_with_clips(leftover):
    assignment, columns = dataset(300, seed=1)
    planners = [
        make_planner([assignment], [SPEC], batch_size=4, world=World(r, 4), leftover=leftover, sync_ranks=False,
                     frames=FRAMES, videos=[columns])
        for r in range(4)
    ]  # fmt: skip
    plans = [p.epoch(0) for p in planners]
    assert len({len(p) for p in plans}) == 1  # equal steps on every rank
    served = np.concatenate([p.flat_rows for p in plans])
    clips = planners[0].clips
    if leftover != "partial":
        assert len(np.unique(served)) == len(served)  # no clip twice
    else:
        assert set(served.tolist()) == set(range(len(clips)))  # every clip at least once
    for p in plans:
        for step in range(len(p)):
            assert np.all(clips.length[p.rows_at(step)] >= p.frames_at(step))


# -- batch-size tables keyed by frames ------------------------------------------------------------------------------
def test_batch_size_table_keyed_by_frames():
    """``(frames, width, height)`` entries size one frame count's bucket and take precedence over the ``(width,
    height)`` entry, which still sizes every other frame count; text keys ``"FxWxH"`` are the same table."""
    sizing = BatchSizing(batch_sizes={(512, 512): 8, (33, 512, 512): 2, "17x512x512": 4, (768, 512): 6})
    sizes = np.array([[512, 512], [512, 512], [512, 512], [512, 768], [512, 768]])
    frames = np.array([1, 17, 33, 33, 1])
    assert sizing.per_bucket(sizes, frames).tolist() == [8, 4, 2, 6, 6]
    assert sizing.per_bucket(sizes[:1]).tolist() == [8]  # images: the (width, height) entries
    assert sizing.largest(sizes, frames) == 8
    with pytest.raises(ConfigError, match=r"no entry for bucket\(s\) 9x640x512 \(frames x width x height\)"):
        sizing.per_bucket(np.array([[512, 640]]), np.array([9]))
    only_frames = BatchSizing(batch_sizes={(33, 512, 512): 2})
    with pytest.raises(ConfigError, match=r"17x512x512"):
        only_frames.per_bucket(sizes[:2], np.array([33, 17]))
    # the state's form: old tables read as they were written, frame entries as [f, w, h, b]; and back
    data = sizing.to_dict()
    assert data["batch_sizes"] == [[512, 512, 8], [768, 512, 6], [17, 512, 512, 4], [33, 512, 512, 2]]
    assert BatchSizing.from_dict(data) == sizing
    assert BatchSizing(batch_sizes={(512, 512): 8}).to_dict()["batch_sizes"] == [[512, 512, 8]]
    assert sizing.scaled(0.5).per_bucket(sizes, frames).tolist() == [4, 2, 1, 3, 3]
    for bad, match in (({(0, 512, 512): 2}, "must be positive"), ({(1, 2, 3, 4): 2}, "or \\(frames, width"),
                       ({"33x512": 2, (33, 512): 3}, "twice"), ({"abc": 1}, "FxWxH|frames, width")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            BatchSizing(batch_sizes=bad)


def test_frames_keyed_table_plans_and_prints(tmp_path, capsys):
    """A planner over clips takes each frame bucket's batch from the table, and ``buckets --frames --batch-sizes
    FILE`` reads ``FxWxH=B`` lines and prints each bucket's clips and pixels per step."""
    import json

    from dali_arb.cli import main
    from dali_arb.cli.batching import read_batch_sizes

    table = {(w, h): 4 for h, w in SPEC.sizes.tolist()} | {(17, w, h): 1 for h, w in SPEC.sizes.tolist()}
    planners, plans = plans_of(
        [dataset(300, seed=5)], world=1, leftover="partial", batch=BatchSizing(batch_sizes=table)
    )
    planner, plan = planners[0], plans[0]
    for k in np.flatnonzero(planner.index.counts()):
        assert planner.batch[k] == (1 if planner.frames[k] == 17 else 4)
    assert {plan.batch_size_at(s) for s in range(len(plan)) if plan.frames_at(s) == 17} == {1}
    path = tmp_path / "sizes.txt"
    path.write_text("512x512=4  # every frame count\n33x512x512 = 1\n17x512x512=2\n")
    assert read_batch_sizes(path) == {(512, 512): 4, (33, 512, 512): 1, (17, 512, 512): 2}
    path.write_text("33x512x0=1\n")
    with pytest.raises(ConfigError, match="FRAMESxWIDTHxHEIGHT=CLIPS"):
        read_batch_sizes(path)
    path.write_text("512x512=4\n33x512x512=1\n")
    args = ["buckets", "--frames", "1,17,33", "--bucket-sizes", "512x512", "--batch-sizes", str(path)]
    assert main([*args, "--json"]) == 0
    listed = {b["frames"]: b for b in json.loads(capsys.readouterr().out)["buckets"]}
    assert {f: b["clips_per_step"] for f, b in listed.items()} == {1: 4, 17: 4, 33: 1}
    assert listed[33]["pixels_per_step"] == 33 * 512 * 512
    assert main(args) == 0
    assert capsys.readouterr().out.split() == ["1x512x512:4", "17x512x512:4", "33x512x512:1"]


def test_cli_buckets_frames_plot_draws_a_panel_per_frame_bucket(video_manifest, tmp_path, capsys):
    """``buckets MANIFEST --frames ... --plot PNG``: a PNG with one panel per frame bucket; what it draws
    (:func:`clip_bars`) is the report's clips, split into full batches and leftovers, per (frames, bucket)."""
    import json

    from PIL import Image

    from dali_arb.cli import main
    from dali_arb.tools.plots import clip_bars

    png = tmp_path / "clips.png"
    args = ["buckets", str(video_manifest), "--frames", "1,9,17", "--fps", "24", "--clip", "chunk", "-b", "2"]
    assert main([*args, "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.height > 3 * 1.9 * 120 * 0.9  # three panels tall
    bars = clip_bars(report)
    assert bars["frames"] == [1, 9, 17]
    assert int(bars["full"].sum() + bars["leftover"].sum()) == report["clips"] == 7
    for row in report["buckets"]:
        j, k = bars["frames"].index(row["frames"]), bars["labels"].index(f"{row['width']}x{row['height']}")
        assert bars["leftover"][j, k] == row["leftover"] and bars["full"][j, k] == row["clips"] - row["leftover"]
    assert main([*args, "--plot", str(tmp_path / "b")]) == 0
    assert f"plot written to {tmp_path / 'b.png'}" in capsys.readouterr().out and (tmp_path / "b.png").exists()
    assert main(["buckets", "--frames", "1,9", "--plot", str(png)]) != 0
    assert "give the manifest too" in capsys.readouterr().err
    assert main([*args, "--plot", str(tmp_path / "missing" / "c.png")]) != 0
    assert "missing" in capsys.readouterr().err
