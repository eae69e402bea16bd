"""Manifests in parts (issue 22): the parts API, and a folder or prefix of parts opening wherever a manifest file does."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.cli import main
from dali_arb.data.manifest import Manifest
from dali_arb.data.parts import INDEX_NAME, PartInfo, is_parts, read_index, write_index, write_part
from dali_arb.errors import ManifestError

from .conftest import random_sizes, small_loader, write_size_manifest


def split_into_parts(manifest: str | os.PathLike, folder, pieces: int, *, rejects: bool = False) -> list[PartInfo]:
    """The manifest file ``manifest`` written again as ``pieces`` parts in ``folder`` (made), with its index."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(manifest)
    bounds = np.linspace(0, table.num_rows, pieces + 1).astype(int)
    parts = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        gone = [{"source": f"/x/{i}.jpg", "reason": "not an image"}] if rejects else None
        parts.append(write_part(folder, f"part-{i:05d}", table.slice(lo, hi - lo), gone))
    write_index(folder, parts, extra={"engine": "test"})
    return parts


def small_table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(start, start + n)], "width": pa.array([100 + i for i in range(n)],
                     pa.int32()), "height": pa.array([50] * n, pa.int32()), "caption": [f"c{i}" for i in range(n)]})  # fmt: skip


def test_parts_round_trip_with_totals_rejects_and_row_order(tmp_path):
    a = write_part(tmp_path, "part-00000", small_table(3), [{"source": "s", "reason": "truncated"}])
    b = write_part(tmp_path, "part-00001.parquet", small_table(2, start=3))
    assert (a.path, a.rows, a.rejects, a.rejected) == ("part-00000.parquet", 3, "part-00000.rejects.jsonl", 1)
    assert (b.path, b.rows, b.rejects, b.rejected) == ("part-00001.parquet", 2, None, 0)
    assert a.size == (tmp_path / a.path).stat().st_size and len(a.fingerprint) == 32 and a.fingerprint != b.fingerprint
    assert json.loads((tmp_path / a.rejects).read_text()) == {"source": "s", "reason": "truncated"}
    assert not is_parts(tmp_path)  # parts alone are not a manifest: the index comes last
    index = write_index(tmp_path, [a, b], extra={"engine": "local"})
    assert index == tmp_path / INDEX_NAME and is_parts(tmp_path) and is_parts(index)
    assert not is_parts(tmp_path / a.path)
    listing = read_index(tmp_path)
    assert (
        listing.parts == (a, b) and (listing.rows, listing.rejected) == (5, 1) and listing.extra == {"engine": "local"}
    )
    assert listing.rejects_paths() == [str(tmp_path / a.rejects)]
    document = json.loads(index.read_text())
    assert (document["format"], document["version"], document["rows"], document["rejected"]) == (
        "dali_arb.parts",
        1,
        5,
        1,
    )
    assert Manifest.read(tmp_path).keys.to_pylist() == [f"k{i}" for i in range(5)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_content_digest_ignores_extra_and_place(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_index(tmp_path / name, [write_part(tmp_path / name, "p", small_table(4))], extra={"where": name})
    assert read_index(tmp_path / "a").content == read_index(tmp_path / "b").content
    (tmp_path / "c").mkdir()
    write_index(tmp_path / "c", [write_part(tmp_path / "c", "p", small_table(4, start=1))])
    assert read_index(tmp_path / "c").content != read_index(tmp_path / "a").content


def test_bad_parts_input_is_refused_with_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"part name .* got '../evil'"):
        write_part(tmp_path, "../evil", small_table(1))
    with pytest.raises(ValueError, match=r"got '_manifest'"):
        write_part(tmp_path, "_manifest", small_table(1))
    with pytest.raises(ManifestError, match=r"folder .*nowhere does not exist"):
        write_part(tmp_path / "nowhere", "p", small_table(1))
    bad = small_table(2).set_column(2, "height", pa.array([0, 5], pa.int32()))
    with pytest.raises(ManifestError, match=r"non-positive size"):
        write_part(tmp_path, "p", bad)
    part = write_part(tmp_path, "p", small_table(1))
    with pytest.raises(ValueError, match=r"'p.parquet' is listed twice"):
        write_index(tmp_path, [part, part])
    with pytest.raises(ValueError, match=r"JSON-serialisable"):
        write_index(tmp_path, [part], extra={"x": object()})


def test_a_missing_changed_or_damaged_part_or_index_is_one_clear_error(tmp_path):
    parts = split_into_parts(write_size_manifest(tmp_path / "m.parquet", *random_sizes(40)), tmp_path / "m", 2)
    folder = tmp_path / "m"
    with pytest.raises(ManifestError, match=r"no index _manifest.json"):
        read_index(tmp_path)
    (folder / parts[1].path).rename(folder / "moved.parquet")
    with pytest.raises(ManifestError, match=r"part part-00001.parquet is missing"):
        Manifest.read(folder)
    (folder / "moved.parquet").rename(folder / parts[1].path)
    with open(folder / parts[1].path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ManifestError, match=r"part part-00001.parquet has .* bytes, .* records"):
        Manifest.open(folder, cache_dir=tmp_path / "c")
    index = folder / INDEX_NAME
    good = index.read_text()
    for text, message in [
        ("{", "is not JSON"),
        (json.dumps({"format": "other"}), "not the index of a dali_arb manifest in parts"),
        (good.replace('"version": 1', '"version": 9'), "newer dali_arb .* upgrade"),
        (good.replace('"rows": 40', '"rows": 41'), "says rows 41 but its parts add up to 40"),
        (good.replace('"part-00000.parquet"', '"../m.parquet"'), "not a path inside the manifest's folder"),
        (good.replace('"rows": 20', '"rows": -2', 1), "has rows -2"),
    ]:
        index.write_text(text)
        with pytest.raises(ManifestError, match=message):
            read_index(folder)
    with pytest.raises(ManifestError, match=r"is a folder with no _manifest.json"):
        Manifest.read(tmp_path)


def test_a_part_rewritten_under_its_index_is_never_served(tmp_path):
    """Same size, other bytes: the stat signature moved, the part is hashed again and refused."""
    parts = split_into_parts(write_size_manifest(tmp_path / "m.parquet", *random_sizes(40)), tmp_path / "m", 2)
    folder = tmp_path / "m"
    assert len(Manifest.open(folder, cache_dir=tmp_path / "c")) == 40
    path = folder / parts[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"part part-00000.parquet does not hold the bytes its index"):
        Manifest.open(folder, cache_dir=tmp_path / "c")


def test_parts_read_and_map_as_the_single_file_does(tmp_path):
    heights, widths = random_sizes(3000, seed=5)
    single = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    split_into_parts(single, tmp_path / "m", 7)
    whole, parted = Manifest.read(single), Manifest.read(tmp_path / "m")
    assert parted.table.equals(whole.table.replace_schema_metadata(parted.table.schema.metadata))
    assert parted.pinned == whole.pinned
    assert Manifest.read(tmp_path / "m", columns=["caption"]).table.column_names == [
        "key",
        "width",
        "height",
        "caption",
    ]
    mapped = Manifest.open(tmp_path / "m", cache_dir=tmp_path / "c")
    assert mapped.cache is not None and mapped.cache.meta["rows"] == 3000
    assert mapped.pinned == whole.pinned
    np.testing.assert_array_equal(mapped.heights, heights)
    assert mapped.keys.to_pylist() == whole.keys.to_pylist()
    assert mapped.column_at("caption", np.array([0, 2999])) == ["caption 0", "caption 2999"]
    again = Manifest.open(tmp_path / "m" / INDEX_NAME, cache_dir=tmp_path / "c")  # the index names it too
    assert again.cache.folder == mapped.cache.folder


def test_parts_that_differ_in_optional_columns_map_with_nulls(tmp_path):
    with_captions = small_table(3)
    without = small_table(2, start=3).drop_columns(["caption"])
    write_index(tmp_path, [write_part(tmp_path, "a", with_captions), write_part(tmp_path, "b", without)])
    mapped = Manifest.open(tmp_path, cache_dir=tmp_path / "c")
    assert mapped.column_at("caption", np.arange(5)) == ["c0", "c1", "c2", None, None]
    assert Manifest.read(tmp_path).column_at("caption", np.arange(5)) == ["c0", "c1", "c2", None, None]


def test_every_command_accepts_a_manifest_in_parts(tmp_path, capsys):
    single = write_size_manifest(tmp_path / "m.parquet", *random_sizes(500, seed=2))
    split_into_parts(single, tmp_path / "m", 3)
    outputs = []
    for manifest in (single, str(tmp_path / "m")):
        assert main(["buckets", manifest, "-b", "4", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
        report = json.loads(capsys.readouterr().out)
        report.pop("manifest")
        assert main(["plan", manifest, "-b", "4", "--cache-dir", str(tmp_path / "c")]) == 0
        outputs.append((report, capsys.readouterr().out.replace(manifest, "M")))
    assert outputs[0] == outputs[1]
    assert main(["plan", str(tmp_path), "-b", "4"]) != 0
    err = capsys.readouterr().err
    assert "is a folder with no _manifest.json" in err and "Traceback" not in err


def test_the_loader_serves_parts_as_it_serves_the_file(dataset, tmp_path):
    _, manifest = dataset
    split_into_parts(manifest, tmp_path / "m", 4)
    a = [(b["ids"], b["captions"]) for b in small_loader(manifest)]
    b = [(b["ids"], b["captions"]) for b in small_loader(tmp_path / "m")]
    assert a == b and len(a) > 3
    # worker processes reopen the parts' cache by folder and signature (loader/source.py)
    c = [(b["ids"], b["captions"]) for b in small_loader(tmp_path / "m", workers=1, worker_kind="process")]
    assert c == a


def test_parts_under_an_object_storage_prefix(dataset, tmp_path, capsys):
    """Written straight to s3:// with moto, then read and mapped (local copy checked against the fingerprints)."""
    import boto3

    from support.loopback import moto_s3

    _, manifest = dataset
    table = pq.read_table(manifest)
    with moto_s3():
        boto3.client("s3").create_bucket(Bucket="data")
        parts = [write_part("s3://data/m/", f"p{i}", table.slice(i * 10, 10), [{"source": "x", "reason": "r"}])
                 for i in range((table.num_rows + 9) // 10)]  # fmt: skip
        assert not is_parts("s3://data/m/")
        assert write_index("s3://data/m", parts) == "s3://data/m/_manifest.json"
        assert is_parts("s3://data/m/") and is_parts("s3://data/m") and not is_parts("s3://data/m.parquet")
        listing = read_index("s3://data/m/")
        assert listing.parts == tuple(parts) and listing.rejects_paths()[0] == "s3://data/m/p0.rejects.jsonl"
        read = Manifest.read("s3://data/m/")
        assert read.keys.to_pylist() == table.column("key").to_pylist()
        mapped = Manifest.open("s3://data/m/", cache_dir=tmp_path / "c")
        assert mapped.pinned == Manifest.read(manifest).pinned
        ids = [b["ids"] for b in small_loader("s3://data/m/")]
        assert ids == [b["ids"] for b in small_loader(manifest)]
        with pytest.raises(ManifestError, match=r"s3://data/nothing/ has no index _manifest.json"):
            read_index("s3://data/nothing/")
        # dali-arb index -o PREFIX/: built locally, uploaded part by part, the index last
        assert main(["index", str(dataset[0]), "-o", "s3://data/out/", "-q"]) == 0
        assert rows_of("s3://data/out/") == rows_of(manifest)
        assert read_index("s3://data/out/").extra["engine"] == "local"
        capsys.readouterr()
        assert main(["index", str(dataset[0]), "-o", "s3://data/out/", "--update", "-q"]) == 0
        assert f"{len(rows_of(manifest))} unchanged reused" in capsys.readouterr().out
        assert rows_of("s3://data/out/") == rows_of(manifest)


def rows_of(manifest) -> list[dict]:
    return Manifest.read(manifest).table.drop_columns(["ctime_ns"]).to_pylist()


def test_index_to_a_folder_writes_parts_row_for_row_as_the_file(dataset, tmp_path, monkeypatch, capsys):
    import dali_arb.index.driver as driver
    import dali_arb.index.units as units

    monkeypatch.setattr(units, "GROUPS_PER_UNIT", 1)  # a folder slice of about 4 files a part
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 4)
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted(dataset[0].iterdir()):
        (photos / f.name).write_bytes(f.read_bytes())
    (photos / "broken.jpg").write_bytes(b"not an image")
    assert main(["index", str(photos), "-o", str(tmp_path / "m.parquet"), "-q"]) == 0
    assert main(["index", str(photos), "-o", f"{tmp_path / 'out'}/", "-q"]) == 0
    line = capsys.readouterr().out
    listing = read_index(tmp_path / "out")
    assert len(listing.parts) > 3 and all(1 <= p.rows <= 8 for p in listing.parts) and listing.rows == 36
    assert listing.rejected == 1 and all(p.unit["kind"] == "folder" for p in listing.parts)
    assert listing.extra["engine"] == "local" and listing.extra["sources"] == [str(photos)]
    assert f"into {tmp_path / 'out'} (" in line and f"; parts: 0 unchanged kept, {len(listing.parts)} written)" in line
    assert f"listed in {tmp_path / 'out' / '*.rejects.jsonl'}" in line
    assert "broken.jpg" in "".join(open(p).read() for p in listing.rejects_paths())
    assert rows_of(tmp_path / "out") == rows_of(tmp_path / "m.parquet")
    # again, into the existing folder without a slash: the old parts go, the new ones are listed
    (photos / "img000.jpg").unlink()
    assert main(["index", str(photos), "-o", str(tmp_path / "out"), "-q"]) == 0
    again = read_index(tmp_path / "out")
    assert {p.path for p in again.parts}.isdisjoint(p.path for p in listing.parts) and again.rows == 35
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([INDEX_NAME, *(p.path for p in again.parts), *(p.rejects for p in again.parts if p.rejects)])
    summary = driver.build_index([str(photos)], tmp_path / "out", update=True, progress=False)
    assert summary.reused == 35 and rows_of(tmp_path / "out")[0]["key"] == "img001"


def test_index_output_folders_that_cannot_work_are_one_line(dataset, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["index", str(dataset[0]), "-o", str(tmp_path / "busy"), "-q"]) != 0
    err = capsys.readouterr().err
    assert "folder" in err and "holds files but no manifest in parts" in err and "Traceback" not in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "busy").iterdir())) == 1
    assert main(["index", str(dataset[0]), "-o", f"{tmp_path / 'no' / 'such'}/", "-q"]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", str(dataset[0]), "-o", f"{dataset[0]}/", "-q"]) != 0
    assert "holds files but no manifest in parts" in capsys.readouterr().err
    assert main(["index", str(dataset[0]), "-o", f"{dataset[0] / 'sub'}/", "-q"]) != 0
    assert "lies inside the input folder" in capsys.readouterr().err and not (dataset[0] / "sub").exists()
