"""The data plane: manifests converted once into memory-mapped columns, keyed by content, shared safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import BucketSpec, Manifest, Planner, World
from dali_arb.data.cache import CACHE_ENV, CACHE_FORMAT, ManifestCache, bucket_index, cache_root
from dali_arb.data.manifest import PINNED_COLUMNS
from dali_arb.errors import ManifestError, ResourceError

from .conftest import random_sizes

ROOT = Path(__file__).resolve().parent.parent


def odd_manifest(path: Path, n: int = 301, *, seed: int = 0) -> Path:
    """A manifest with every awkward thing: null captions and sources, runs of one shard, unicode,
    empty strings, row groups whose sizes are not multiples of 8."""
    rng = np.random.default_rng(seed)
    h, w = random_sizes(n, seed=seed)
    table = pa.table(
        {
            "key": [f"shard{i // 37:03d}/ключ-{i}" for i in range(n)],
            "width": pa.array(w, pa.int64()),
            "height": pa.array(h, pa.int32()),
            "caption": [
                None if i % 11 == 0 else ("" if i % 13 == 0 else f"a photo ✓ {i} " * (i % 4)) for i in range(n)
            ],
            "source": [None if i % 29 == 5 else f"/data/shard{i // 37:03d}.tar" for i in range(n)],
            "offset": pa.array(
                [None if i % 17 == 0 else int(v) for i, v in enumerate(rng.integers(0, 2**40, n))], pa.int64()
            ),
            "length": pa.array([None if i % 19 == 0 else 1000 + i for i in range(n)], pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=23)
    return path


@pytest.fixture
def small_steps(monkeypatch):
    import dali_arb.data.cache as dataplane

    monkeypatch.setattr(dataplane, "BUILD_ROWS", 40)  # many build steps, none a multiple of the row groups


@pytest.mark.parametrize("drop", [[], ["caption"], ["source", "offset", "length"], ["caption", "source"]])
def test_a_mapped_manifest_holds_what_the_file_holds(tmp_path, small_steps, drop):
    path = odd_manifest(tmp_path / "m.parquet")
    if drop:
        pq.write_table(pq.read_table(path).drop_columns(drop), path, row_group_size=23)
    memory = Manifest.read(path)
    mapped = Manifest.open(path, cache_dir=tmp_path / "cache")
    assert mapped.cache is not None and len(mapped) == len(memory)
    for name in ("key", "caption", "source"):
        if name in memory.table.column_names:
            assert mapped.table.column(name).to_pylist() == memory.table.column(name).to_pylist(), name
        else:
            assert name not in mapped.table.column_names
    assert np.array_equal(mapped.heights, memory.heights) and np.array_equal(mapped.widths, memory.widths)
    for name, missing in (("offset", 0), ("length", -1)):
        assert np.array_equal(mapped.int_column(name, missing), memory.int_column(name, missing))
    rows = np.array([300, 0, 5, 121, 5])
    assert mapped.keys_at(rows) == memory.keys_at(rows)
    assert mapped.column_at("caption", rows) == memory.column_at("caption", rows)
    # the pinned fingerprint is stored when the cache is built; it must be the one the table gives
    assert mapped.fingerprint(PINNED_COLUMNS) == memory.fingerprint(PINNED_COLUMNS)


def test_mapped_columns_are_views_of_the_cache_files_not_private_copies(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet", n=50_000)
    before = pa.total_allocated_bytes()
    mapped = Manifest.open(path, cache_dir=tmp_path / "cache")
    mapped.keys_at(np.arange(0, 50_000, 997))
    assert isinstance(mapped.heights, np.memmap) and isinstance(mapped.widths, np.memmap)
    assert not mapped.int_column("offset", 0).flags.owndata and not mapped.int_column("length", -1).flags.owndata
    assert pa.total_allocated_bytes() - before < 50_000  # Arrow allocated nothing per row
    index = bucket_index(mapped, BucketSpec())
    assert isinstance(index.members, np.memmap) and isinstance(index.bucket, np.memmap)


def test_every_mapping_of_the_cache_is_advised_random_access(tmp_path):
    """Rows are read at random: every cache file a loader maps carries MADV_RANDOM (``rr`` in smaps), or a
    cold cache reads megabytes of read-ahead from disk per row served (84 MiB for 64 caption rows here)."""
    path = odd_manifest(tmp_path / "m.parquet")
    m = Manifest.open(path, cache_dir=tmp_path / "cache")
    index = bucket_index(m, BucketSpec())
    m.keys_at(np.arange(3)), m.column_at("caption", np.arange(3)), int(index.members[0])  # touch the mappings
    flags: dict[str, str] = {}
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if len(head) >= 6 and "-" in head[0] and str(tmp_path / "cache") in line:
            mapping = head[5]
        elif line.startswith("VmFlags:") and mapping is not None:
            flags[Path(mapping).name] = line
            mapping = None
    assert {"key.bytes", "caption.bytes", "key.offsets.npy", "height.npy", "members.npy"} <= flags.keys(), flags
    assert all(" rr" in vm for vm in flags.values()), {name: vm for name, vm in flags.items() if " rr" not in vm}


def test_the_cache_is_built_once_and_found_again_by_content(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet")
    first = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    stamp = (first.folder / "meta.json").stat().st_mtime_ns
    again = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert again.folder == first.folder and (first.folder / "meta.json").stat().st_mtime_ns == stamp
    os.utime(path)  # touched, same content: re-hashed, same cache
    assert ManifestCache.open(path, cache_dir=tmp_path / "cache").folder == first.folder
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(path.read_bytes())  # another path, same content: the same cache
    assert ManifestCache.open(copy, cache_dir=tmp_path / "cache").folder == first.folder
    odd_manifest(path, seed=1)  # rewritten: another cache, with the new rows
    changed = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert changed.folder != first.folder
    assert changed.manifest().keys_at([0]) == Manifest.read(path).keys_at([0])
    root = tmp_path / "cache" / f"v{CACHE_FORMAT}"
    assert root.is_dir() and not list(root.glob(".build-*"))


def test_bucket_index_is_cached_per_options_and_plans_as_the_in_memory_one(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet", n=2000)
    mapped = Manifest.open(path, cache_dir=tmp_path / "cache")
    memory = Manifest.read(path)
    for spec in (BucketSpec(), BucketSpec(no_upscale=True, max_area=1024 * 1024)):
        plans = [
            Planner(bucket_index(m, spec), batch_size=4, world=World(1, 3), seed=5, leftover=leftover).epoch(2)
            for m in (mapped, memory)
            for leftover in ("nearest",)
        ]
        assert np.array_equal(plans[0].rows, plans[1].rows) and np.array_equal(plans[0].bucket, plans[1].bucket)
    assert len(list((mapped.cache.folder / "buckets").iterdir())) == 2


def test_the_bucket_index_cache_holds_the_served_percentiles_so_no_rank_reads_every_row(tmp_path, monkeypatch):
    """A loader sized its buffers by sampling a million rows spread over the manifest in every rank at start-up:
    every page of the length column and of the bucket members (92 B/row of a node's memory at 4M rows)."""
    from dali_arb import DALIBucketIterator
    from dali_arb.data.manifest import ManifestSet

    path = odd_manifest(tmp_path / "m.parquet", n=2000)
    index = bucket_index(Manifest.open(path, cache_dir=tmp_path / "cache"), BucketSpec())
    memory = Manifest.read(path)
    rows = index.members
    lengths = memory.int_column("length", -1)[rows]
    assert index.served_p99 == pytest.approx(
        {
            "height": np.percentile(memory.heights[rows], 99),
            "width": np.percentile(memory.widths[rows], 99),
            "length": np.percentile(lengths[lengths > 0], 99),
        }
    )
    assert bucket_index(memory, BucketSpec()).served_p99 is None  # an index made in memory: the loader samples

    options = {"batch_size": 4, "device": "cpu", "workers": 2, "worker_kind": "process", "rank": 0, "world_size": 1}
    sampled = DALIBucketIterator(memory, **options)  # samples every usable row here (2000 < the sample size)

    def no_row_reads(*args, **kwargs):
        raise AssertionError("a loader over a cached manifest read rows to size its buffers")

    monkeypatch.setattr(ManifestSet, "ints_at", no_row_reads)
    cached = DALIBucketIterator(str(path), cache_dir=tmp_path / "cache", **options)
    assert cached._served_p99 == pytest.approx(sampled._served_p99)
    assert cached._read_ahead_plan == sampled._read_ahead_plan


@pytest.mark.parametrize("damage", ["truncate", "meta", "missing", "foreign"])
def test_a_damaged_cache_is_rebuilt_never_served(tmp_path, damage):
    path = odd_manifest(tmp_path / "m.parquet")
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    folder = cache.folder
    if damage == "truncate":
        data = (folder / "key.bytes").read_bytes()
        (folder / "key.bytes").write_bytes(data[: len(data) // 2])
    elif damage == "meta":
        (folder / "meta.json").write_text("{not json")
    elif damage == "missing":
        (folder / "height.npy").unlink()
    else:  # a cache of another manifest put under this one's name
        other = ManifestCache.open(odd_manifest(tmp_path / "o.parquet", seed=3), cache_dir=tmp_path / "cache")
        meta = json.loads((other.folder / "meta.json").read_text())
        meta["files"] = json.loads((folder / "meta.json").read_text())["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
    mapped = Manifest.open(path, cache_dir=tmp_path / "cache")
    memory = Manifest.read(path)
    assert mapped.table.column("key").to_pylist() == memory.table.column("key").to_pylist()
    assert np.array_equal(mapped.heights, memory.heights)


def test_the_cache_folder_comes_from_the_option_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from_env"))
    assert cache_root() == tmp_path / "from_env"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dali_arb"


def test_cli_plan_uses_the_cache_dir_it_is_given(tmp_path, capsys):
    from dali_arb.cli import main

    path = odd_manifest(tmp_path / "m.parquet", n=400)
    assert main(["plan", str(path), "-b", "4", "--cache-dir", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 10 and list((tmp_path / "c" / f"v{CACHE_FORMAT}").iterdir())
    assert main(["plan", str(path), "-b", "4", "--cache-dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def _as_ordinary_writer() -> None:
    """In a child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that even root is refused
    writing into a folder of mode 555."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def _plan_in_child(path: Path, cache: Path, **extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dali_arb", "plan", str(path), "-b", "4", "--cache-dir", str(cache)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, **extra)


def test_a_read_only_cache_folder_is_refused_in_one_line_unless_it_holds_the_cache(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet", n=400)
    cache = tmp_path / "ro"
    cache.mkdir()
    os.chmod(cache, 0o555)
    try:
        done = _plan_in_child(path, cache, preexec_fn=_as_ordinary_writer)
        assert done.returncode == 1 and done.stdout == ""
        line = done.stderr.strip()
        assert "\n" not in line and str(cache) in line and "DALI_ARB_CACHE" in line and "Traceback" not in line
        os.chmod(cache, 0o755)
        assert _plan_in_child(path, cache).returncode == 0  # built by someone who may write
        os.chmod(cache, 0o555)
        for folder in cache.rglob("*"):
            if folder.is_dir():
                os.chmod(folder, 0o555)
        done = _plan_in_child(path, cache, preexec_fn=_as_ordinary_writer)  # read-only, but whole: used
        assert done.returncode == 0, done.stderr
    finally:
        for folder in [cache, *cache.rglob("*")]:
            if folder.is_dir():
                os.chmod(folder, 0o755)


def test_a_cache_folder_that_runs_out_of_room_is_refused_in_one_line(tmp_path):
    import resource

    path = odd_manifest(tmp_path / "m.parquet", n=3000)

    def small_files() -> None:  # any file over 4 KiB fails with EFBIG, as a full disk fails with ENOSPC
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = _plan_in_child(path, tmp_path / "c", preexec_fn=small_files)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "cannot build the cache of manifest" in line and "DALI_ARB_CACHE" in line
    left = [p.name for p in (tmp_path / "c" / f"v{CACHE_FORMAT}").iterdir()]
    assert not [name for name in left if name.startswith(".build-") or len(name) == 32]  # no partial or whole cache


OPEN_SCRIPT = """
import sys, time
from dali_arb import Manifest
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])
print(m.cache.folder.name, m.fingerprint(("width", "height", "source", "offset", "length")), m.keys_at([7])[0])
"""


def test_eight_processes_opening_at_once_share_one_cache(tmp_path):
    import time

    path = odd_manifest(tmp_path / "m.parquet", n=20_000)
    start = str(time.time() + 1.5)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_SCRIPT, str(path), str(tmp_path / "c"), start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(8)
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1
    memory = Manifest.read(path)
    folder, pinned, key = outputs[0][0].split()
    assert pinned == memory.fingerprint(PINNED_COLUMNS) and key == memory.keys_at([7])[0]
    assert [
        p.name for p in (tmp_path / "c" / f"v{CACHE_FORMAT}").iterdir() if not p.name.startswith(("by-", "locks"))
    ] == [folder]


def test_a_manifest_changed_while_a_worker_reopens_the_cache_is_refused(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet")
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    ManifestCache.at(cache.folder, manifest_path=str(path), signature=cache.signature)  # unchanged: fine
    os.utime(path, ns=(1, 1))  # touched only: the content is checked, and is the same
    ManifestCache.at(cache.folder, manifest_path=str(path), signature=cache.signature)
    odd_manifest(path, seed=2)
    with pytest.raises(ManifestError, match="changed on disk after the loader was built"):
        ManifestCache.at(cache.folder, manifest_path=str(path), signature=cache.signature)
    (cache.folder / "key.bytes").unlink()
    with pytest.raises(ManifestError, match="was removed or damaged while a loader used it"):
        ManifestCache.at(cache.folder)


def test_cache_errors_are_dali_arb_errors():
    assert issubclass(ResourceError, Exception) and issubclass(ManifestError, Exception)
