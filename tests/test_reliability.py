"""Regression tests for what a hostile user or their data did to earlier versions (issue 10).

Each test failed before its fix; the comment on each names what the user saw then.
"""

from __future__ import annotations

import numpy as np
import pytest

from dali_arb import BucketSpec, ConfigError, Planner

from .conftest import random_sizes


# -- 13. more than 32,767 buckets: the int16 bucket index overflowed and images vanished uncounted --
def test_tens_of_thousands_of_buckets_keep_every_image():
    spec = BucketSpec(min_dim=8, step=8, max_dim=160_000, max_area=160_000 * 64, base=(64, 64), max_aspect_error=np.inf)
    assert len(spec.sizes) > 2**15
    heights, widths = random_sizes(4000, seed=1)
    heights = np.concatenate([heights, [8, 16]])  # extreme panoramas land on buckets numbered past 32,767
    widths = np.concatenate([widths, [150_000, 140_000]])
    assignment = spec.assign(heights, widths)
    assert (assignment.bucket >= 0).all() and assignment.bucket.max() >= 2**15
    plan = Planner(assignment, batch_size=2, leftover="duplicate").epoch(0)
    served = set(plan.rows.ravel().tolist())
    assert served == set(range(len(heights)))
    assert (plan.bucket >= 0).all()


# -- 14. --min-dim 300 / --step 48 gave bucket sides that are not multiples of step -------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_dim": 300}, r"min_dim \(300\) must be a multiple of step \(64\).*--min-dim 256 or 320"),
        ({"step": 48}, r"min_dim \(256\) must be a multiple of step \(48\).*--min-dim 240 or 288"),
        ({"step": 48, "min_dim": 240}, r"base 512x512 must have sides that are multiples of step \(48\); use --base 528x528"),
    ],
)
def test_bucket_sides_are_multiples_of_step_or_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        BucketSpec(**options)
    ok = BucketSpec(step=48, min_dim=240, base=(480, 480))
    assert (ok.sizes % 48 == 0).all()
