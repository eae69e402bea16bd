"""Shared fixtures: small manifests and images made on the spot."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dali_arb import BucketSpec
from dali_arb.data.manifest import SCHEMA, Manifest
from dali_arb.index import build_index

from .images import save_jpeg


@pytest.fixture(autouse=True)
def _fresh_store_health():
    """Each test a new run for the stores' health: a loopback server that died in one test must not make a later
    server on the same port (the same store name) look silent past its deadline."""
    yield
    from dali_arb.data.storage.retries import HEALTH

    HEALTH.reset()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test (and the processes it starts) caches manifests in a folder of this session, not ~/.cache."""
    import os

    os.environ["DALI_ARB_CACHE"] = str(tmp_path_factory.mktemp("dali_arb_cache"))


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


# Real JPEG files (photo-like), some EXIF-rotated, with captions; small buckets keep the CPU tests fast.
SMALL = BucketSpec(max_area=160 * 240, min_dim=64, max_dim=320, step=32, base=(160, 160))

#: The loader options most tests use: small buckets, the CPU, no workers, uint8, and "nearest" (what they assert:
#: full batches; "auto" has tests of its own).
SMALL_LOADER = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
                "leftover": "nearest"}  # fmt: skip


def small_loader(manifest, **kw):
    """A ``DALIBucketIterator`` over ``manifest`` (a path, URL or Manifest) with :data:`SMALL_LOADER`, ``kw`` on top."""
    from dali_arb import DALIBucketIterator

    return DALIBucketIterator(manifest if isinstance(manifest, (str, Manifest)) else str(manifest),
                              **{**SMALL_LOADER, **kw})  # fmt: skip


SIZES = [(300, 200), (200, 300), (240, 240), (400, 150), (150, 400), (320, 180), (180, 320), (260, 200), (210, 280),
         (500, 160), (160, 500), (330, 250), (250, 330), (280, 210), (120, 90), (90, 120), (222, 333), (333, 222)]  # fmt: skip


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    folder.mkdir()
    for i, (w, h) in enumerate(SIZES * 2):
        orientation = 6 if i % 7 == 3 else (8 if i % 11 == 5 else None)
        # stored sideways when rotated: the displayed size is (w, h)
        stored = (h, w) if orientation in (6, 8) else (w, h)
        save_jpeg(folder / f"img{i:03d}.jpg", *stored, seed=i, orientation=orientation)
        (folder / f"img{i:03d}.txt").write_text(f"caption {i}", encoding="utf-8")
    manifest = root / "m.parquet"
    build_index([str(folder)], manifest, progress=False)
    return folder, manifest


def copy_photos(src, dst, count: int | None = None):
    """The first ``count`` JPEGs of ``src`` (and their captions) copied into a new folder ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.jpg"))[:count]:
        (dst / f.name).write_bytes(f.read_bytes())
        caption = f.with_suffix(".txt")
        if caption.exists():
            (dst / caption.name).write_bytes(caption.read_bytes())
    return dst


@pytest.fixture
def fresh_dataset(tmp_path, dataset):
    """A private copy of the dataset's photos and its own manifest: ``(folder, manifest)``, free to damage."""
    folder = copy_photos(dataset[0], tmp_path / "photos")
    manifest = tmp_path / "m.parquet"
    build_index([str(folder)], manifest, progress=False)
    return folder, manifest


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (2 CPUs) for a module's tests: the engine uses a session already open and leaves it open; this
    shuts it down at the module's end if it started it. Its workers take S3's address and keys from the environment
    when it starts: a test that gives them S3 requests its server's fixture first."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()
