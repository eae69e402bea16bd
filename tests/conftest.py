"""Shared fixtures: small manifests and images made on the spot."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dali_arb.manifest import SCHEMA, Manifest


def gpu_available() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return GetCUDADeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU visible to DALI")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_sizes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(heights, widths)`` of ``n`` images, 200..3000 pixels a side."""
    rng = np.random.default_rng(seed)
    return rng.integers(200, 3000, n), rng.integers(200, 3000, n)


def write_size_manifest(path, heights, widths, *, keys=None) -> str:
    n = len(heights)
    table = pa.table(
        {
            "key": keys or [f"img{i:06d}" for i in range(n)],
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "caption": [f"caption {i}" for i in range(n)],
            "source": pa.nulls(n, pa.string()),
            "offset": pa.nulls(n, pa.int64()),
            "length": pa.nulls(n, pa.int64()),
            "mtime_ns": pa.nulls(n, pa.int64()),
        },
        schema=SCHEMA,
    )
    Manifest(table).write(path)
    return str(path)


@pytest.fixture
def size_manifest(tmp_path):
    heights, widths = random_sizes(3000, seed=7)
    return write_size_manifest(tmp_path / "m.parquet", heights, widths)
