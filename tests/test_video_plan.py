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
