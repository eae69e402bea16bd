import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_arb import BucketSpec, ConfigError, format_size, parse_size
from dali_arb.plan.buckets import REJECT_ASPECT, REJECT_TOO_SMALL

NOVELAI = (
    "256x1024 320x1024 384x1024 384x960 384x896 448x832 512x768 512x704 512x512 576x640 "
    "640x576 704x512 768x512 832x448 896x384 960x384 1024x384 1024x320 1024x256"
).split()


def test_defaults_are_novelai_nineteen():
    spec = BucketSpec()
    assert [format_size(h, w) for h, w in spec.sizes] == NOVELAI


def test_generated_buckets_respect_the_options():
    spec = BucketSpec(max_area=1024 * 1024, min_dim=512, max_dim=2048, step=64, base=(1024, 1024))
    sizes = spec.sizes
    assert (sizes % 64 == 0).all()
    assert (sizes >= 512).all() and (sizes <= 2048).all()
    assert (sizes[:, 0] * sizes[:, 1] <= 1024 * 1024).all()
    assert (1024, 1024) in spec.resolutions()
    # symmetric: every bucket has its transpose
    assert {(w, h) for h, w in spec.resolutions()} == set(spec.resolutions())


def test_parse_and_format_size_are_w_by_h():
    assert parse_size("768x512") == (512, 768)
    assert format_size(512, 768) == "768x512"
    with pytest.raises(ConfigError, match="'768-512'"):
        parse_size("768-512")


def test_assignment_is_symmetric_in_log_aspect():
    # NovelAI's linear w/h distance sends 3:2 and 2:3 to non-mirrored buckets; log distance must not.
    spec = BucketSpec()
    rng = np.random.default_rng(0)
    h = rng.integers(200, 3000, 2000)
    w = rng.integers(200, 3000, 2000)
    a = spec.assign(h, w)
    b = spec.assign(w, h)
    sizes = spec.sizes
    kept = (a.bucket >= 0) & (b.bucket >= 0)
    assert (sizes[a.bucket[kept]] == sizes[b.bucket[kept]][:, ::-1]).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20000), st.integers(1, 20000)), min_size=1, max_size=50))
def test_assignment_is_nearest_bucket_in_log_aspect(dims):
    spec = BucketSpec(max_aspect_error=math.inf)
    h = np.array([d[0] for d in dims])
    w = np.array([d[1] for d in dims])
    a = spec.assign(h, w)
    bucket_log = np.log(spec.sizes[:, 1] / spec.sizes[:, 0])
    brute = np.abs(np.log(w / h)[:, None] - bucket_log[None, :]).min(axis=1)
    chosen = np.abs(np.log(w / h) - bucket_log[a.bucket])
    assert np.allclose(chosen, brute)


def test_aspect_error_rejects_are_counted_not_lost():
    spec = BucketSpec(max_aspect_error=0.2)
    h = np.array([512, 100, 512, 4000])
    w = np.array([512, 2000, 768, 500])
    a = spec.assign(h, w)
    assert a.bucket.tolist()[0] >= 0 and a.bucket[2] >= 0
    assert a.bucket[1] == -1 and a.bucket[3] == -1
    assert a.rejected(REJECT_ASPECT) == 2
    assert a.counts().sum() == 2


def test_no_upscale_never_enlarges_and_keeps_few_buckets():
    spec = BucketSpec(no_upscale=True)
    rng = np.random.default_rng(3)
    h = rng.integers(150, 1400, 20000)
    w = rng.integers(150, 1400, 20000)
    a = spec.assign(h, w)
    kept = a.bucket >= 0
    sizes = a.sizes[a.bucket[kept]]
    assert (sizes[:, 0] <= h[kept]).all() and (sizes[:, 1] <= w[kept]).all()
    # kohya's bucket_no_upscale makes one bucket per distinct small size rounded to the step
    kohya = {(int(y) // 64 * 64, int(x) // 64 * 64) for y, x in zip(h, w) if y < 1024 and x < 1024}
    used = len(np.unique(a.bucket[kept]))
    assert used < len(kohya) / 2
    # images already big enough keep the spec's own buckets
    big = spec.assign(np.array([2000]), np.array([3000]))
    assert tuple(big.sizes[big.bucket[0]]) == (512, 768)


def test_no_upscale_rejects_images_below_the_smallest_bucket():
    a = BucketSpec(no_upscale=True).assign(np.array([40, 600]), np.array([40, 600]))
    assert a.bucket[0] == -1 and a.reject_code[0] == REJECT_TOO_SMALL
    assert a.bucket[1] >= 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_dim": 2048}, "min_dim (2048) must not exceed max_dim (1024)"),
        ({"max_area": 1000}, "max_area (1000) is smaller than min_dim**2"),
        ({"step": 0}, "step must be a positive integer, got 0"),
        ({"max_area": -5}, "got -5"),
        ({"base": "5x"}, "'5x'"),
        ({"max_aspect_error": 0}, "max_aspect_error must be a positive number, got 0"),
    ],
)
def test_impossible_options_name_the_value(options, message):
    with pytest.raises(ConfigError) as info:
        BucketSpec(**options)
    assert message in str(info.value)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        BucketSpec(512 * 768)  # type: ignore[misc]


def test_non_positive_image_sizes_are_errors():
    with pytest.raises(ConfigError, match="height 0"):
        BucketSpec().assign(np.array([0, 5]), np.array([5, 5]))
