"""``dali-arb index SOURCES -o DIR/ --update`` keeps the parts of unchanged units whole (``index/units.py``), with
both engines, and the result equals a fresh index row for row; one big Parquet metadata file is split by row groups
into several units (several Ray tasks)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.data.manifest import Manifest
from dali_arb.data.parts import read_index
from dali_arb.index import build_index

from .images import jpeg_bytes, save_jpeg

#: Columns compared with a fresh index (everything a row says of its image; ctime differs only by when it was read).
COMPARED = ["key", "width", "height", "caption", "source", "offset", "length", "mtime_ns", "source_size", "etag"]


@pytest.fixture
def small_units(monkeypatch):
    """Folder slices of about 4 files and metadata units of about 10 rows, so that a small data set has many parts."""
    monkeypatch.setattr("dali_arb.index.units.GROUPS_PER_UNIT", 1)
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 4)
    monkeypatch.setattr("dali_arb.index.units.PART_ROWS", 10)


def make_shard(path: Path, samples: list[tuple[str, int, int]]) -> str:
    """A webdataset shard of ``(key, width, height)`` JPEGs, each with a caption."""
    with tarfile.open(path, "w") as tar:
        for key, width, height in samples:
            for name, data in ((f"{key}.jpg", jpeg_bytes(width, height, seed=width)), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def make_sources(root: Path) -> list[str]:
    """A folder of 20 JPEGs (a subfolder, captions, a broken file), two shards (a key of the first again in the
    second: a duplicate across sources) and a metadata file of 40 rows in row groups of 5 (one bad size)."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(20):
        folder = photos / ("sub" if i % 4 == 0 else "")
        save_jpeg(folder / f"img{i:02d}.jpg", 40 + 4 * i, 30 + 3 * i, seed=i)
        if i % 3 == 0:
            (folder / f"img{i:02d}.txt").write_text(f"caption {i}")
    (photos / "broken.jpg").write_bytes(b"not a picture")
    shards = root / "shards"
    shards.mkdir()
    first = make_shard(shards / "00000.tar", [(f"s{i}", 50 + i, 70 + i) for i in range(5)])
    second = make_shard(shards / "00001.tar", [("s0", 33, 44), ("t1", 80, 60), ("t2", 81, 61)])
    widths = [100 + i for i in range(40)]
    widths[7] = 0  # a bad size: a reject
    meta = root / "meta.parquet"
    pq.write_table(pa.table({"key": [f"m{i:02d}" for i in range(40)], "width": widths, "height": [90] * 40,
                             "caption": [f"meta {i}" for i in range(40)]}), meta, row_group_size=5)  # fmt: skip
    return [str(photos), first, second, str(meta)]


def rows(manifest) -> list[tuple]:
    table = Manifest.read(manifest).table
    return sorted(zip(*(table.column(c).to_pylist() for c in COMPARED)), key=lambda r: r[0])


def rejects(manifest: Path) -> list[tuple]:
    listing = read_index(manifest)
    lines = [json.loads(line) for path in listing.rejects_paths() for line in Path(path).read_text().splitlines()]
    return sorted((str(r["source"]), r["reason"]) for r in lines)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """``{part: (inode, mtime_ns)}`` of the parts a manifest in parts lists."""
    return {
        p.path: (os.stat(folder / p.path).st_ino, os.stat(folder / p.path).st_mtime_ns)
        for p in read_index(folder).parts
    }


def check_fresh(sources: list[str], out: Path, tmp_path: Path, engine: str = "local") -> None:
    """The manifest at ``out`` holds the rows and rejects a fresh index of ``sources`` holds."""
    fresh = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    build_index(sources, f"{fresh}/", engine=engine, workers=1, progress=False)
    assert rows(out) == rows(fresh)
    assert rejects(out) == rejects(fresh)
    assert Manifest.read(out).table.column("key").to_pylist() == Manifest.read(fresh).table.column("key").to_pylist()


def test_metadata_is_split_by_row_groups_into_units(tmp_path, small_units) -> None:
    sources = make_sources(tmp_path / "data")
    build_index(sources[3:], f"{tmp_path / 'out'}/", workers=1, progress=False)
    listing = read_index(tmp_path / "out")
    metadata = [p for p in listing.parts if p.unit and p.unit["kind"] == "metadata"]
    assert [p.rows for p in metadata] == [9, 10, 10, 10]  # row groups of 5, units of 10 rows; m07 rejected
    build_index(sources[3:], tmp_path / "one.parquet", workers=1, progress=False)
    assert rows(tmp_path / "out") == rows(tmp_path / "one.parquet")


def test_row_group_ranges_cover_the_file_in_whole_row_groups(tmp_path) -> None:
    from dali_arb.index.metadata import has_paths, row_group_ranges

    table = pa.table({"key": [f"k{i}" for i in range(23)], "width": [64] * 23, "height": [48] * 23})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=5)  # row groups of 5, 5, 5, 5, 3 rows
    assert row_group_ranges(tmp_path / "m.parquet", 10) == [(0, 2), (2, 4), (4, 5)]
    assert row_group_ranges(tmp_path / "m.parquet", 7) == [(0, 2), (2, 4), (4, 5)]
    assert row_group_ranges(tmp_path / "m.parquet", 100) == []  # one range: the file as it is
    pq.write_table(table, tmp_path / "one.parquet")
    assert row_group_ranges(tmp_path / "one.parquet", 5) == []  # one row group is never split
    (tmp_path / "m.csv").write_text("key,width,height,path\nk0,64,48,a.jpg\n")
    assert row_group_ranges(tmp_path / "m.csv", 1) == [] and has_paths(tmp_path / "m.csv")
    assert not has_paths(tmp_path / "m.parquet")


def test_update_keeps_the_parts_of_unchanged_sources_whole(tmp_path, small_units) -> None:
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    first = build_index(sources, f"{out}/", workers=1, progress=False)
    before, listing = files_of(out), read_index(out)
    assert first.parts_written == len([p for p in listing.parts if p.unit]) > 8 and first.parts_reused == 0
    again = build_index(sources, f"{out}/", update=True, workers=1, progress=False)
    kept = read_index(out)
    # every unit's part kept: the same file (inode, mtime), name and fingerprint; only the run's rejects part is new
    assert again.parts_written == 0 and again.parts_reused == first.parts_written
    assert {k: v for k, v in files_of(out).items() if "rejects" not in k} == {
        k: v for k, v in before.items() if "rejects" not in k
    }
    assert [(p.path, p.fingerprint) for p in kept.parts if p.unit] == [
        (p.path, p.fingerprint) for p in listing.parts if p.unit
    ]
    assert (again.rows, again.rejected, again.reject_reasons) == (first.rows, first.rejected, first.reject_reasons)
    assert again.reused == again.rows and "unchanged kept, 0 written" in again.line()
    check_fresh(sources, out, tmp_path)


def test_touched_added_and_removed_sources_rewrite_only_their_parts(tmp_path, small_units) -> None:
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    build_index(sources, f"{out}/", workers=1, progress=False)
    units_before = {p.path: p.unit for p in read_index(out).parts if p.unit}
    photos, first_shard = Path(sources[0]), sources[1]
    os.utime(first_shard, ns=(10**18, 10**18))  # touched: its part is written again
    save_jpeg(photos / "sub" / "new.jpg", 77, 55, seed=5)  # added to the folder: its slice is written again
    (photos / "img05.jpg").unlink()  # removed: its slice too
    extra = make_shard(tmp_path / "data" / "shards" / "00002.tar", [("u0", 90, 91)])  # a new source: a new part
    sources = [*sources, extra]
    before = files_of(out)
    summary = build_index(sources, f"{out}/", update=True, workers=1, progress=False)
    after = read_index(out)
    kept = [p for p in after.parts if p.path in before]
    written = [p for p in after.parts if p.unit and p.path not in before]
    assert summary.parts_reused == len(kept) and summary.parts_written == len(written)
    assert all(files_of(out)[p.path] == before[p.path] for p in kept)
    # the touched shard, the new shard, the slices of the folder that changed (one or two each), and the second
    # shard: it lost s0 to the touched one (so it is read again, in case s0 is no longer there); nothing else
    kinds = sorted(p.unit["source"] for p in written)
    assert kinds.count(first_shard) == kinds.count(extra) == kinds.count(sources[2]) == 1
    assert 2 <= kinds.count(str(photos)) <= 4 and len(written) <= 7
    assert not any(p.unit["source"] == sources[3] for p in written)  # (untouched: kept)
    assert sum(1 for u in units_before.values() if u["source"] == str(photos)) >= 4  # (many slices, few rewritten)
    check_fresh(sources, out, tmp_path)
    # a source given no more: its parts go, the files with them
    gone = [p.path for p in after.parts if p.unit and p.unit["source"] == sources[3]]
    build_index(sources[:3], f"{out}/", update=True, workers=1, progress=False)
    assert gone and not any((out / name).exists() for name in gone)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    listing = read_index(out)
    assert names == sorted([*(p.path for p in listing.parts), *(p.rejects for p in listing.parts if p.rejects)])
    check_fresh(sources[:3], out, tmp_path)


def test_a_part_that_lost_a_duplicate_gets_it_back_when_the_earlier_source_goes(tmp_path, small_units) -> None:
    """Shard 00001 holds ``s0``, which shard 00000 holds first: its part lost that row. Without 00000, a fresh index
    keeps 00001's ``s0``, so 00001's part must not be kept as it was (nor its rows taken from the earlier manifest)."""
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    build_index(sources, f"{out}/", workers=1, progress=False)
    second = next(p for p in read_index(out).parts if p.unit and p.unit["source"] == sources[2])
    assert second.unit["dropped"] == 1 and second.rows == 2
    # with every earlier part kept, it is kept too (its keys are still taken by the same rows)
    build_index(sources, f"{out}/", update=True, workers=1, progress=False)
    assert second.path in [p.path for p in read_index(out).parts]
    without_first = [sources[0], *sources[2:]]
    summary = build_index(without_first, f"{out}/", update=True, workers=1, progress=False)
    assert ("s0", 33, 44) in [r[:3] for r in rows(out)] and summary.parts_written == 1
    check_fresh(without_first, out, tmp_path)


def test_into_a_file_a_shard_that_lost_a_duplicate_is_read_again_when_the_earlier_source_goes(tmp_path) -> None:
    """The same for a manifest file (``-o m.parquet --update``): the second shard's earlier rows lack ``s0`` (its
    rejects say so), so they are not reused once the first shard is gone."""
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "m.parquet"
    build_index(sources[1:3], out, workers=1, progress=False)
    summary = build_index(sources[2:3], out, update=True, workers=1, progress=False)
    assert ("s0", 33, 44) in [r[:3] for r in rows(out)] and summary.rows == 3
    build_index(sources[2:3], tmp_path / "fresh.parquet", workers=1, progress=False)
    assert rows(out) == rows(tmp_path / "fresh.parquet")


def test_a_kept_part_that_a_new_earlier_source_shadows_loses_the_row(tmp_path, small_units) -> None:
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    build_index(sources[1:], f"{out}/", workers=1, progress=False)
    earlier = make_shard(tmp_path / "data" / "first.tar", [("t2", 64, 64), ("m03", 65, 65)])
    summary = build_index([earlier, *sources[1:]], f"{out}/", update=True, workers=1, progress=False)
    # the second shard's and a metadata range's parts rewritten without the rows the new shard holds first
    assert summary.parts_written == 3 and summary.reject_reasons["duplicate key"] == 3
    check_fresh([earlier, *sources[1:]], out, tmp_path)


def test_an_update_reads_earlier_rows_only_for_the_units_it_does_not_keep(tmp_path, small_units, monkeypatch):
    """Keeping every part reads no earlier row (not the manifest, not a part); a changed folder slice reads that
    folder's earlier rows and still takes its unchanged files' sizes from them."""
    from dali_arb.data.manifest import Manifest as ManifestClass
    from dali_arb.index.units import EarlierRows

    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    build_index(sources, f"{out}/", workers=1, progress=False)
    asked: list[str] = []
    real_table = EarlierRows.table

    def table(self, source, columns=None):
        asked.append(source)
        return real_table(self, source, columns)

    def no_read(*args, **kwargs):
        raise AssertionError("the whole earlier manifest was read")

    monkeypatch.setattr(EarlierRows, "table", table)
    monkeypatch.setattr(ManifestClass, "read", no_read)
    summary = build_index(sources, f"{out}/", update=True, workers=1, progress=False)
    assert summary.parts_written == 0 and asked == []
    photos = Path(sources[0])
    save_jpeg(photos / "img06.jpg", 99, 98, seed=9)  # one image changed: its slice is indexed again
    os.utime(photos / "img06.jpg", ns=(10**18, 10**18))
    before = files_of(out)
    summary = build_index(sources, f"{out}/", update=True, workers=1, progress=False)
    # the slice, and the second shard: it lost s0 to a part after the slice (a part that lost rows is read again
    # when any part before it changed); its earlier rows lack s0, so they are not read either
    assert set(asked) == {str(photos)} and summary.parts_written == 2
    listing = read_index(out)
    written = [p for p in listing.parts if p.unit and p.path not in before]
    assert [p.unit["source"] for p in written] == [str(photos), sources[2]]
    kept_rows = sum(p.rows for p in listing.parts if p.path in before)
    # the kept parts' rows, and the rewritten slice's unchanged images (all but img06) from the earlier rows
    assert summary.reused == kept_rows + written[0].rows - 1
    monkeypatch.undo()
    assert ("img06", 99, 98) in [r[:3] for r in rows(out)]
    check_fresh(sources, out, tmp_path)


def test_update_without_parts_options_reads_every_source(tmp_path, small_units) -> None:
    """A path column in metadata: its images may change under it, so its parts are never kept (read again)."""
    root = tmp_path / "data"
    root.mkdir()
    save_jpeg(root / "a.jpg", 64, 48)
    pq.write_table(pa.table({"key": ["a"], "width": [64], "height": [48], "path": ["a.jpg"]}), root / "meta.parquet")
    out = tmp_path / "out"
    build_index([str(root / "meta.parquet")], f"{out}/", workers=1, progress=False)
    save_jpeg(root / "a.jpg", 64, 48, seed=3)
    os.utime(root / "a.jpg", ns=(10**18, 10**18))
    summary = build_index([str(root / "meta.parquet")], f"{out}/", update=True, workers=1, progress=False)
    assert summary.parts_reused == 0 and rows(out)[0][7] == 10**18


def test_update_in_object_storage_keeps_shards_by_their_etag_and_uploads_only_new_parts(tmp_path, monkeypatch):
    """Shards in s3:// (moto) into a manifest in parts at an s3:// prefix: an unchanged shard's part is kept (a HEAD
    decides) and not uploaded again, its rejects kept; a shard written again is indexed again."""
    import boto3

    import dali_arb.data.storage as storage
    from support.loopback import moto_s3

    local = [make_shard(tmp_path / f"{i}.tar", [(f"k{i}{j}", 40 + j, 50 + j) for j in range(3)]) for i in range(2)]
    with tarfile.open(local[1], "a") as tar:  # a member that is not an image: a reject of the second shard
        info = tarfile.TarInfo("bad.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with moto_s3():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        for i, path in enumerate(local):
            s3.upload_file(path, "data", f"shards/{i}.tar")
        sources = ["s3://data/shards/0.tar", "s3://data/shards/1.tar"]
        first = build_index(sources, "s3://data/out/", workers=1, progress=False)
        assert first.parts_written == 2 and first.rejected == 1
        uploaded: list[str] = []
        real_upload = storage.upload

        def upload(path, url, *args, **kwargs):
            uploaded.append(url)
            return real_upload(path, url, *args, **kwargs)

        monkeypatch.setattr(storage, "upload", upload)
        again = build_index(sources, "s3://data/out/", update=True, workers=1, progress=False)
        assert again.parts_reused == 2 and again.parts_written == 0 and again.rejected == 1
        assert uploaded == ["s3://data/out/_manifest.json"]
        assert read_index("s3://data/out/").rejected == 1
        changed = make_shard(tmp_path / "changed.tar", [("k00", 40, 50), ("k09", 61, 62)])
        s3.upload_file(changed, "data", "shards/0.tar")  # written again, other bytes: another ETag
        uploaded.clear()
        third = build_index(sources, "s3://data/out/", update=True, workers=1, progress=False)
        assert third.parts_reused == 1 and third.parts_written == 1
        assert len([u for u in uploaded if u.endswith(".parquet")]) == 1
        fresh = tmp_path / "fresh"
        build_index(sources, f"{fresh}/", workers=1, progress=False)
        assert rows("s3://data/out/") == rows(fresh) and read_index("s3://data/out/").rejected == 1


def test_captions_from_the_file_name_into_parts_are_the_files_and_parts_are_not_kept(tmp_path, small_units) -> None:
    """Captions from ``--captions-from-filename`` (applied to each part): the rows of a manifest file; what decides
    them is not in a unit's identity, so an update keeps no part."""
    from dali_arb.index.captions import CaptionSource

    photos = Path(make_sources(tmp_path / "data")[0])
    captions = CaptionSource(filename=True)
    build_index([str(photos)], tmp_path / "m.parquet", workers=1, progress=False, captions=captions)
    first = build_index([str(photos)], f"{tmp_path / 'out'}/", workers=1, progress=False, captions=captions)
    assert rows(tmp_path / "out") == rows(tmp_path / "m.parquet") and first.parts_written > 1
    assert all(p.unit is None for p in read_index(tmp_path / "out").parts)
    again = build_index(
        [str(photos)], f"{tmp_path / 'out'}/", workers=1, progress=False, captions=captions, update=True
    )
    assert again.parts_reused == 0 and rows(tmp_path / "out") == rows(tmp_path / "m.parquet")


# -- the Ray engine -------------------------------------------------------------------------------------------------


def test_ray_engine_keeps_unchanged_parts_and_equals_a_fresh_index(tmp_path, ray_session, small_units) -> None:
    sources = make_sources(tmp_path / "data")
    out = tmp_path / "out"
    first = build_index(sources, f"{out}/", engine="ray", progress=False)
    before = files_of(out)
    again = build_index(sources, f"{out}/", engine="ray", update=True, progress=False)
    assert again.parts_written == 0 and again.parts_reused == first.parts_written
    assert all(files_of(out)[p] == before[p] for p in before if "rejects" not in p)
    os.utime(sources[1], ns=(10**18, 10**18))
    extra = make_shard(tmp_path / "data" / "shards" / "00002.tar", [("u0", 90, 91)])
    summary = build_index([*sources, extra], f"{out}/", engine="ray", update=True, progress=False)
    # the touched shard, the new one, and the second shard (it lost s0 to the touched one: read again)
    assert summary.parts_written == 3 and summary.parts_reused == first.parts_written - 2
    check_fresh([*sources, extra], out, tmp_path, engine="local")  # (the local engine's fresh index: the same)


def test_ray_splits_one_metadata_file_into_tasks_with_the_local_rows(tmp_path, ray_session, small_units) -> None:
    meta = make_sources(tmp_path / "data")[3]
    build_index([meta], tmp_path / "local.parquet", workers=1, progress=False)
    summary = build_index([meta], f"{tmp_path / 'out'}/", engine="ray", progress=False)
    listing = read_index(tmp_path / "out")
    assert len([p for p in listing.parts if p.rows]) == 4 and summary.parts_written == 4
    assert rows(tmp_path / "out") == rows(tmp_path / "local.parquet")
    on_ray_file = build_index([meta], tmp_path / "ray.parquet", engine="ray", progress=False)  # (-o FILE: joined)
    assert pq.read_table(tmp_path / "ray.parquet").column("key").to_pylist() == (
        pq.read_table(tmp_path / "local.parquet").column("key").to_pylist()
    )
    assert on_ray_file.rows == 39 and on_ray_file.rejected == 1
