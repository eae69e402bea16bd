"""Issue 18, the node's cache: content verified (f10), a full disk is one line (f15), builders of one content
never undo each other (f16), a URL manifest's local copy is named by its ETag (f25g), temporary files are
exclusive (f24's rule)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import BucketSpec, Manifest
from dali_arb.data.cache import CACHE_FORMAT, ManifestCache, bucket_index
from dali_arb.data.cachefolder import local_manifest
from dali_arb.errors import ManifestError

from .test_dataplane import ROOT, odd_manifest


# -- f10: a cache damaged without changing its size -------------------------------------------------------------
def _swap_keys(folder: Path, a: int, b: int) -> None:
    """Swap the bytes of keys ``a`` and ``b`` (of one length) in place: every file keeps its size."""
    offsets = np.load(folder / "key.offsets.npy")
    data = bytearray((folder / "key.bytes").read_bytes())
    sa, sb = slice(offsets[a], offsets[a + 1]), slice(offsets[b], offsets[b + 1])
    assert sa.stop - sa.start == sb.stop - sb.start and data[sa] != data[sb]
    data[sa], data[sb] = data[sb], data[sa]
    stat = (folder / "key.bytes").stat()
    with open(folder / "key.bytes", "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    os.utime(folder / "key.bytes", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime


def test_f10_a_cache_with_two_keys_swapped_is_rebuilt_not_served(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet")
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    sizes = {p.name: p.stat().st_size for p in cache.folder.iterdir()}
    _swap_keys(cache.folder, 1, 2)
    assert {p.name: p.stat().st_size for p in cache.folder.iterdir()} == sizes
    again = Manifest.open(path, cache_dir=tmp_path / "cache")
    assert again.keys_at(np.arange(5)) == Manifest.read(path).keys_at(np.arange(5))


def test_f10_a_worker_reopening_a_cache_damaged_in_place_is_refused(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet")
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    ManifestCache.at(cache.folder, manifest_path=str(path), signature=cache.signature)
    _swap_keys(cache.folder, 1, 2)
    with pytest.raises(ManifestError, match="was removed or damaged while a loader used it"):
        ManifestCache.at(cache.folder, manifest_path=str(path), signature=cache.signature)


def test_f10_a_bucket_index_damaged_in_place_is_rebuilt(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet", n=2000)
    spec = BucketSpec()
    index = bucket_index(Manifest.open(path, cache_dir=tmp_path / "cache"), spec)
    members = np.asarray(index.members).copy()
    folder = next((Manifest.open(path, cache_dir=tmp_path / "cache").cache.folder / "buckets").iterdir())
    data = np.load(folder / "members.npy")
    data[[0, -1]] = data[[-1, 0]]
    with open(folder / "members.npy", "r+b") as fh:
        np.lib.format.write_array(fh, data)
    again = bucket_index(Manifest.open(path, cache_dir=tmp_path / "cache"), spec)
    assert np.array_equal(np.asarray(again.members), members)


def test_f10_content_is_verified_once_per_boot_then_by_the_files_identity(tmp_path, monkeypatch):
    """A rank start must not hash every file of a 100M-row cache: a whole verification is recorded for this boot and
    the files' stat signatures; another boot (or a file whose ctime moved) verifies again."""
    import dali_arb.data.cache as dataplane

    path = odd_manifest(tmp_path / "m.parquet")
    ManifestCache.open(path, cache_dir=tmp_path / "cache")
    hashed: list[str] = []
    real = dataplane.file_crc
    monkeypatch.setattr(dataplane, "file_crc", lambda p: hashed.append(Path(p).name) or real(p))
    ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert hashed == []  # same boot, untouched files: stat only
    monkeypatch.setattr(dataplane, "boot_id", lambda: "another-boot")
    ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert "key.bytes" in hashed and "height.npy" in hashed
    hashed.clear()
    ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert hashed == []


# -- f15: a cache folder that fills up mid-build -------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_f15_a_cache_folder_that_fills_mid_build_fails_in_one_line_and_leaves_nothing(tmp_path, small_tmpfs):
    path = odd_manifest(tmp_path / "m.parquet", n=80_000)  # the fixed columns alone overfill it
    command = [sys.executable, "-m", "dali_arb", "plan", str(path), "-b", "4", "--cache-dir", str(small_tmpfs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and "No space left on device" in line, line
    assert str(small_tmpfs) in line and "DALI_ARB_CACHE" in line
    left = [p.name for p in (small_tmpfs / f"v{CACHE_FORMAT}").iterdir()]
    assert not [name for name in left if name.startswith((".build-", ".stale-")) or len(name) == 32], left


def test_f15_build_folders_of_dead_builders_are_removed_by_the_next_build(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet")
    root = tmp_path / "cache" / f"v{CACHE_FORMAT}"
    dead = root / f".build-{'0' * 32}-999999-1"
    (dead / "buckets").mkdir(parents=True)
    (dead / "key.bytes").write_bytes(b"x" * 100_000)
    stale = root / f".stale-{'1' * 32}-999999-1"
    stale.mkdir()
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert not dead.exists() and not stale.exists()
    gone = cache.folder / "buckets" / ".build-0123-999999-1"
    gone.mkdir(parents=True)
    bucket_index(cache.manifest(), BucketSpec())
    assert not gone.exists()


# -- f16: builders of one content on several paths ---------------------------------------------------------------
RACE_SCRIPT = """
import os, sys, time
from dali_arb import Manifest
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])
print(m.cache.folder.name, os.stat(m.cache.folder / "meta.json").st_ino, m.keys_at([7])[0], len(m))
"""


@pytest.mark.slow
def test_f16_copies_and_hardlinks_of_one_manifest_opened_at_once_share_one_cache_built_once(tmp_path):
    path = odd_manifest(tmp_path / "m.parquet", n=60_000)
    names = [path]
    for i in range(2):
        copy = tmp_path / f"copy{i}.parquet"
        copy.write_bytes(path.read_bytes())
        link = tmp_path / f"link{i}.parquet"
        os.link(path, link)
        names += [copy, link]
    sym = tmp_path / "sym.parquet"
    sym.symlink_to(tmp_path / "copy0.parquet")
    names.append(sym)
    memory = Manifest.read(path)
    for trial in range(2):
        cache = tmp_path / f"c{trial}"
        start = str(time.time() + 2.0)
        children = [
            subprocess.Popen(
                [sys.executable, "-c", RACE_SCRIPT, str(name), str(cache), start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for name in names
        ]
        outputs = [child.communicate(timeout=300) for child in children]
        assert all(child.returncode == 0 for child in children), [err[-1500:] for _, err in outputs]
        seen = {tuple(out.split()) for out, _ in outputs}
        assert len(seen) == 1, seen  # one folder, one meta.json (never replaced), the same rows
        folder, inode, key, rows = seen.pop()
        assert key == memory.keys_at([7])[0] and int(rows) == len(memory)
        root = cache / f"v{CACHE_FORMAT}"
        assert os.stat(root / folder / "meta.json").st_ino == int(inode)
        assert [p.name for p in root.iterdir() if not p.name.startswith(("by-", "locks"))] == [folder]


def test_f16_an_installed_whole_cache_is_never_replaced_by_a_later_build(tmp_path, monkeypatch):
    """A second builder (another path, same content) that built while the first installed keeps the first's."""
    import dali_arb.data.cache as dataplane

    path = odd_manifest(tmp_path / "m.parquet")
    first = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    inode = (first.folder / "meta.json").stat().st_ino
    built = tmp_path / "cache" / f"v{CACHE_FORMAT}" / ".build-late"
    built.mkdir()
    dataplane._build_columns(path, built, first.folder.name)
    dataplane._install(built, first.folder)
    assert (first.folder / "meta.json").stat().st_ino == inode and not built.exists()
    assert first.manifest().keys_at([3]) == Manifest.read(path).keys_at([3])


# -- f25g: a URL manifest rewritten within one second, at the same size -----------------------------------------------
def _same_size_manifest(keys: list[str]) -> bytes:
    out = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "width": pa.array([300] * len(keys), pa.int32()),
                "height": pa.array([200] * len(keys), pa.int32()),
            }
        ),
        out,
    )
    return out.getvalue()


@pytest.mark.slow
def test_f25g_a_url_manifest_rewritten_in_the_same_second_at_the_same_size_is_fetched_again(tmp_path, monkeypatch):
    import boto3
    import obstore
    from obstore.store import S3Store

    from support.loopback import moto_s3

    first = _same_size_manifest([f"a{i:03d}" for i in range(50)])
    second = _same_size_manifest([f"b{i:03d}" for i in range(50)])
    assert len(first) == len(second) and first != second
    with moto_s3():
        boto3.client("s3").create_bucket(Bucket="data")
        store = S3Store("data", client_options={"allow_http": True})
        url = "s3://data/m.parquet"
        for attempt in range(5):  # until both writes fall in one second of Last-Modified (the case that was stale)
            cache = tmp_path / f"c{attempt}"
            obstore.put(store, "m.parquet", first)
            before = obstore.head(store, "m.parquet")["last_modified"]
            assert Manifest.open(url, cache_dir=cache).keys_at([0]) == ["a000"]
            obstore.put(store, "m.parquet", second)
            if obstore.head(store, "m.parquet")["last_modified"] == before:
                break
        else:
            pytest.skip("could not rewrite the object within one second")
        assert Manifest.open(url, cache_dir=cache).keys_at([0]) == ["b000"]
        assert Manifest.read(url).keys_at([0]) == ["b000"]
        copies = list((cache / f"v{CACHE_FORMAT}" / "remote").iterdir())
        assert len(copies) == 2 and not [p for p in copies if "partial" in p.name or p.name.startswith(".")], copies
        obstore.put(store, "m.parquet", first)  # rewritten back: the first copy (same ETag) is used again
        assert Manifest.open(url, cache_dir=cache).keys_at([0]) == ["a000"]

        # rewritten between the HEAD and the GET: the GET holds the HEAD's ETag (If-Match), so the copy named by the
        # old version never holds the new bytes; the object is looked at again
        import dali_arb.data.cachefolder as dataplane

        real = dataplane._remote_version
        stale = [real(url)]
        obstore.put(store, "m.parquet", second)
        monkeypatch.setattr(dataplane, "_remote_version", lambda u: stale.pop() if stale else real(u))
        local = Path(local_manifest(url, cache_dir=tmp_path / "raced"))
        assert local.read_bytes() == second
        assert [p.name for p in local.parent.iterdir()] == [local.name]


def test_f25g_without_an_etag_the_copy_is_named_by_size_and_last_modified_and_says_so(tmp_path):
    from support.loopback import RangeHTTPServer

    site = tmp_path / "site"
    site.mkdir()
    (site / "m.parquet").write_bytes(_same_size_manifest(["a", "b"]))
    with RangeHTTPServer(site) as http, pytest.warns(UserWarning, match="no ETag"):
        local = Path(local_manifest(f"{http.url}/m.parquet", cache_dir=tmp_path / "cache"))
    assert local.read_bytes() == (site / "m.parquet").read_bytes()


# -- f24's rule: temporary files are created exclusively, never through a planted link ------------------------------
def test_f24_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    from dali_arb.data.cache import _digest

    path = odd_manifest(tmp_path / "m.parquet")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    root = tmp_path / "cache" / f"v{CACHE_FORMAT}"
    (root / "by-path").mkdir(parents=True)
    record = f"{_digest(str(path.resolve()))}.json"
    (root / "by-path" / f".{record}.{os.getpid()}.partial").symlink_to(victim)
    cache = ManifestCache.open(path, cache_dir=tmp_path / "cache")
    assert victim.read_text() == "keep me"
    assert json.loads((root / "by-path" / record).read_text())["content"] == cache.folder.name
