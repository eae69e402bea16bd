"""Issue 22's last gaps: the local engine reads independent units (tar shards, metadata ranges) side by side in its
pool, with the manifest it wrote one unit after another (byte for byte); and ``-o s3://prefix/ --engine ray
--update`` keeps unchanged parts whole in the store, as ``-o DIR/`` does, equal to a fresh index."""

from __future__ import annotations

import io
import multiprocessing
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from dali_arb.data.parts import read_index
from dali_arb.data.storage import list_prefix
from dali_arb.index import build_index, driver
from dali_arb.index.run import IndexRun

from .test_update_parts import check_fresh, make_shard, make_sources, rejects, rows

# -- the local engine: units side by side ---------------------------------------------------------------------------


def more_sources(root: Path) -> list[str]:
    """``make_sources`` with four more shards between its shards and its metadata: one cut short mid-member (an
    unreadable shard), one repeating keys of earlier shards (duplicates across shards read side by side)."""
    photos, first, second, meta = make_sources(root)
    extra = [
        make_shard(root / "shards" / f"1{i}.tar", [(f"x{i}{j}", 44 + j, 55 + i) for j in range(4)]) for i in (0, 1)
    ]
    whole = Path(make_shard(root / "shards" / "cut.tar", [(f"c{j}", 40 + j, 50) for j in range(6)]))
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2 + 100])  # (stops inside a member)
    repeats = make_shard(root / "shards" / "13.tar", [("s1", 90, 91), ("x10", 92, 93), ("y0", 94, 95)])
    return [photos, first, extra[0], str(whole), second, extra[1], repeats, meta]


def test_workers_read_shards_side_by_side_into_the_same_manifest_bytes(tmp_path) -> None:
    sources = more_sources(tmp_path / "data")
    serial = build_index(sources, tmp_path / "one.parquet", workers=1, progress=False)
    side = build_index(sources, tmp_path / "two.parquet", workers=2, progress=False)
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert (tmp_path / "one.parquet.rejects.jsonl").read_bytes() == (
        tmp_path / "two.parquet.rejects.jsonl"
    ).read_bytes()
    assert (serial.rows, serial.rejected, serial.files_seen) == (side.rows, side.rejected, side.files_seen)
    reasons = (tmp_path / "two.parquet.rejects.jsonl").read_text()
    assert "cut.tar" in reasons and "unreadable tar shard" in reasons  # (the cut shard: rejected, the others read)
    keys = set(rows(tmp_path / "two.parquet"))
    assert {"x00", "x13", "x10", "y0", "t2", "m39"} <= {r[0] for r in keys}


def test_workers_run_units_side_by_side_into_the_same_parts(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("dali_arb.index.units.PART_ROWS", 10)  # (the metadata file: four units)
    sources = more_sources(tmp_path / "data")
    build_index(sources, f"{tmp_path / 'one'}/", workers=1, progress=False)
    summary = build_index(sources, f"{tmp_path / 'two'}/", workers=2, progress=False)
    one, two = read_index(tmp_path / "one"), read_index(tmp_path / "two")
    assert [(p.rows, p.fingerprint, p.rejected, p.unit) for p in one.parts] == [
        (p.rows, p.fingerprint, p.rejected, p.unit) for p in two.parts
    ]
    for a, b in zip(one.parts, two.parts):
        if a.rejects:
            assert (tmp_path / "one" / a.rejects).read_bytes() == (tmp_path / "two" / b.rejects).read_bytes()
    assert summary.parts_written == len(two.parts) and rows(tmp_path / "two") == rows(tmp_path / "one")
    check_fresh(sources, tmp_path / "two", tmp_path)


def test_shards_in_object_storage_are_read_ahead_into_the_same_manifest_bytes(tmp_path, monkeypatch) -> None:
    """Shards in s3:// (moto; one holding a member that is not an image) into one file: each read whole in a worker
    (``readers.remote_shard_job``), several at once, the same bytes and counts as with one worker."""
    import boto3

    from support.loopback import moto_s3

    local = [make_shard(tmp_path / f"{i}.tar", [(f"k{i}{j}", 40 + j, 50 + i) for j in range(3)]) for i in range(4)]
    with tarfile.open(local[2], "a") as tar:
        info = tarfile.TarInfo("bad.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with moto_s3():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        for i, path in enumerate(local):
            s3.upload_file(path, "data", f"shards/{i}.tar")
        sources = ["s3://data/shards/{0..3}.tar"]
        one = build_index(sources, tmp_path / "one.parquet", workers=1, progress=False)
        submitted: list[tuple] = []  # (key, tasks submitted and not taken after it)
        ahead = IndexRun.ahead

        def recorded(run, key, fn, task):
            ahead(run, key, fn, task)
            submitted.append((key, run.pending_ahead))

        monkeypatch.setattr(IndexRun, "ahead", recorded)
        two = build_index(sources, tmp_path / "two.parquet", workers=2, progress=False)
    assert [key for key, _ in submitted] == [("remote_shard", f"s3://data/shards/{i}.tar") for i in range(4)]
    assert max(pending for _, pending in submitted) == 2  # (two shards in flight, never more)
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert (tmp_path / "one.parquet.rejects.jsonl").read_bytes() == (
        tmp_path / "two.parquet.rejects.jsonl"
    ).read_bytes()
    assert (one.rows, one.rejected, one.fetched_objects, one.fetched_bytes) == (
        12,
        1,
        4,
        sum(map(os.path.getsize, local)),
    )
    assert (two.rows, two.rejected, two.fetched_objects, two.fetched_bytes) == (12, 1, 4, one.fetched_bytes)
    assert "s3://data/shards/2.tar:bad.jpg" in (tmp_path / "two.parquet.rejects.jsonl").read_text()


def _meet(barrier: str, shard: str) -> None:
    """Mark ``shard`` begun in the folder ``barrier`` and wait (up to 20 s) until two shards have begun; then mark it
    met in ``barrier/../met`` (not when it waited alone)."""
    Path(barrier, Path(shard).name).touch()
    deadline = time.monotonic() + 20
    while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    if len(os.listdir(barrier)) >= 2:
        Path(barrier).parent.joinpath("met", Path(shard).name).touch()


def _waiting_shard_task(args: tuple):
    from dali_arb.index.shards import shard_task

    _meet(os.environ["ENGINES_TEST_BARRIER"], args[0])
    return shard_task(args)


@pytest.mark.parametrize("in_parts", [False, True])
def test_two_shards_are_read_at_once_with_two_workers(tmp_path, monkeypatch, in_parts) -> None:
    """Each shard's task waits until a second shard's has begun: read one shard after another, the first would wait
    out its 20 s alone."""
    shards = [make_shard(tmp_path / f"{i}.tar", [(f"k{i}{j}", 40 + j, 50) for j in range(3)]) for i in range(3)]
    barrier = tmp_path / "begun"
    barrier.mkdir()
    (tmp_path / "met").mkdir()
    monkeypatch.setenv("ENGINES_TEST_BARRIER", str(barrier))
    monkeypatch.setattr("dali_arb.index.readers.shard_task", _waiting_shard_task)
    fork = multiprocessing.get_context("fork")  # (the workers inherit the patched functions)
    monkeypatch.setattr(driver, "_pool", lambda workers, remote: ProcessPoolExecutor(workers, mp_context=fork))
    out = f"{tmp_path / 'parts'}/" if in_parts else tmp_path / "m.parquet"
    summary = build_index(shards, out, workers=2, progress=False)
    assert summary.rows == 9 and len(os.listdir(barrier)) == 3
    assert sorted(os.listdir(tmp_path / "met")) == ["0.tar", "1.tar", "2.tar"]  # (none waited alone)


# -- the Ray engine into object storage: --update keeps parts --------------------------------------------------------

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def s3():
    from support.loopback import moto_bucket

    with moto_bucket("keep") as server:
        yield server


def stored(prefix: str) -> dict[str, tuple]:
    """``{name: (ETag, mtime)}`` of the objects under ``prefix``."""
    return {info.url[len(prefix) :]: (info.etag, info.mtime_ns) for info in list_prefix(prefix)}


def written_again(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    """The names in ``after`` that are new or were put again since ``before``."""
    return {name for name, seen in after.items() if before.get(name) != seen}


def test_ray_update_into_the_store_keeps_unchanged_parts_and_equals_a_fresh_index(tmp_path, s3, ray_session,
                                                                                    monkeypatch) -> None:  # fmt: skip
    monkeypatch.setattr("dali_arb.index.units.GROUPS_PER_UNIT", 1)  # (many parts: folder slices, metadata ranges)
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 4)
    monkeypatch.setattr("dali_arb.index.units.PART_ROWS", 10)
    url = "s3://keep/m/"
    photos, first, second, meta = make_sources(tmp_path / "data")
    sources = [photos, first, second, meta]
    fresh = build_index(sources, url, engine="ray", progress=False)
    index = read_index(url)
    assert fresh.parts_written == len(index.parts) > 5 and all(p.unit for p in index.parts if p.rows)
    before = stored(url)
    time.sleep(1.1)  # (an object put again gets a later LastModified: the store's clock counts seconds)

    same = build_index(sources, url, engine="ray", update=True, progress=False)
    assert (same.parts_reused, same.parts_written) == (len(index.parts), 0)
    assert same.reused == same.rows == fresh.rows and same.rejected == fresh.rejected
    assert same.reject_reasons == fresh.reject_reasons
    assert written_again(before, stored(url)) == {"_manifest.json"}  # no part, no rejects file put again
    check_fresh_store(sources, url, tmp_path)

    # a shard before the others repeating a key of the second shard (whose kept part then loses it), an image
    # changed, the metadata gone, a shard added at the end
    before, earlier = stored(url), read_index(url)
    time.sleep(1.1)
    early = make_shard(tmp_path / "data" / "early.tar", [("t1", 70, 71), ("e1", 72, 73)])
    os.utime(Path(photos) / "img05.jpg", ns=(10**18, 10**18))
    late = make_shard(tmp_path / "data" / "late.tar", [("z1", 74, 75), ("s2", 76, 77)])
    changed = [early, photos, first, second, late]
    summary = build_index(changed, url, engine="ray", update=True, progress=False)
    after, index = read_index(url), stored(url)
    kept = {p.path for p in after.parts} & {p.path for p in earlier.parts}
    assert summary.parts_reused == len(kept) > 0 and summary.parts_written == len(after.parts) - len(kept)
    assert written_again(before, index) == {"_manifest.json"} | {
        name for p in after.parts if p.path not in kept for name in (p.path, p.rejects) if name
    }
    assert not {p.path for p in earlier.parts if "meta.parquet" in (p.unit or {}).get("source", "")} & set(index)
    check_fresh_store(changed, url, tmp_path)
    assert any(source.endswith("00001.tar") and "'t1'" in reason for source, reason in rejects_of_store(url))


def check_fresh_store(sources: list[str], url: str, tmp_path: Path) -> None:
    """The manifest in parts at ``url`` holds the rows (in order) and rejects of a fresh local index of ``sources``."""
    from dali_arb.data.manifest import Manifest

    fresh = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    build_index(sources, f"{fresh}/", workers=1, progress=False)
    assert rows(url) == rows(fresh)
    assert rejects_of_store(url) == rejects(fresh)
    assert Manifest.read(url).table.column("key").to_pylist() == Manifest.read(fresh).table.column("key").to_pylist()


def rejects_of_store(url: str) -> list[tuple]:
    import json

    from dali_arb.data.storage import get_bytes

    lines = [json.loads(line) for p in read_index(url).rejects_paths() for line in get_bytes(p).decode().splitlines()]
    return sorted((str(r["source"]), r["reason"]) for r in lines)


def test_the_heads_of_shards_in_object_storage_are_read_several_at_once_in_order(monkeypatch) -> None:
    """A unit's identity of a shard in s3:// is a HEAD (``--update`` decides by it): read by several threads at once
    (each call here waits for a second one to be in flight: one after another, the barrier breaks), given in order."""
    import threading

    from dali_arb.index import units

    barrier = threading.Barrier(2, timeout=10)

    def head(url: str) -> list:
        barrier.wait()
        return [url, 1, 2, "etag"]

    monkeypatch.setattr(units, "_head_identity", head)
    urls = [f"s3://b/{i}.tar" for i in range(6)]
    assert [found[0] for found in units._head_identities(urls)] == urls
