"""Bounded memory before the loader (issue 22): metadata streamed in chunks, the node cache's bucket index grouped out
of core. Each is checked against the whole-at-once result it replaces; peak RSS figures live in
``python -m benchmarks scale``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import BucketSpec
from dali_arb.data.manifest import Manifest
from dali_arb.index import build_index
from dali_arb.index import metadata as metadata_module
from dali_arb.index.metadata import metadata_chunks, metadata_rows

from .conftest import random_sizes, write_size_manifest
from .images import save_jpeg


def odd_metadata(folder, n: int = 50) -> pa.Table:
    """Metadata rows of every kind: good files (relative, ``./``-relative, absolute, in a subfolder), missing files,
    null paths, failed downloads, sizes that are not whole numbers."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    keys, widths, heights, paths, status = [], [], [], [], []
    for i in range(n):
        kind = i % 7
        name = f"sub/f{i}.jpg" if kind == 3 else f"f{i}.jpg"
        if kind != 4:
            save_jpeg(folder / name, 16, 12)
        keys.append(f"k{i:03d}")
        widths.append([16, 16, 16, 16, 16, 0, 16][kind])
        heights.append(12)
        paths.append([name, f"./{name}", str(folder / name), name, name, name, None][kind])
        status.append("failed_to_download" if i % 11 == 10 else "success")
    return pa.table({"key": keys, "width": widths, "height": heights, "path": paths, "status": status})


def test_metadata_in_chunks_gives_the_rows_and_rejects_of_the_whole(tmp_path):
    table = odd_metadata(tmp_path / "images")
    meta = tmp_path / "images" / "meta.parquet"
    pq.write_table(table, meta)
    whole, whole_rejects = metadata_rows(meta)
    chunks = list(metadata_chunks(meta, chunk_rows=8))
    assert len(chunks) == 7
    parts = pa.concat_tables([t for t, _ in chunks])
    by_key = sorted([r for _, rs in chunks for r in rs], key=lambda r: r["key"])
    assert parts.equals(whole) and by_key == sorted(whole_rejects, key=lambda r: r["key"])
    rows = {r["key"]: r for r in whole.to_pylist()}
    assert rows["k002"]["source"] == str(tmp_path / "images" / "f2.jpg")  # absolute, kept
    assert rows["k001"]["source"] == str(tmp_path / "images" / "f1.jpg")  # "./f1.jpg", joined as Path joins
    assert rows["k003"]["source"] == str(tmp_path / "images" / "sub" / "f3.jpg")
    stat = (tmp_path / "images" / "f0.jpg").stat()
    assert (rows["k000"]["length"], rows["k000"]["source_size"], rows["k000"]["mtime_ns"]) == (
        -1, stat.st_size, stat.st_mtime_ns)  # fmt: skip
    reasons = {r["key"]: r["reason"] for r in whole_rejects}
    assert reasons["k004"] == "file named in metadata does not exist"  # (never made)
    assert reasons["k006"] == "file named in metadata does not exist"  # (no path)
    assert reasons["k005"].startswith("size is not two whole numbers") and "(0 x 12)" in reasons["k005"]
    assert reasons["k010"] == "status 'failed_to_download' is not 'success'"
    assert len(whole) + len(whole_rejects) == 50


def test_csv_metadata_streams_in_blocks_with_a_bad_size_late_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata_module, "CSV_BLOCK_BYTES", 1 << 10)  # many blocks; types fixed by the first one
    lines = ["key,width,height,caption"] + [f"k{i},{64 + i % 5},48,caption {i}" for i in range(400)]
    lines += ["late,abc,48,x", "float,64.0,48,y", "half,12.5,48,z"]
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
    chunks = list(metadata_chunks(tmp_path / "meta.csv"))
    assert len(chunks) > 5
    rows = pa.concat_tables([t for t, _ in chunks])
    reasons = {r["key"]: r["reason"] for _, rs in chunks for r in rs}
    assert len(rows) == 401 and rows.column("key")[-1].as_py() == "float" and rows.column("width")[-1].as_py() == 64
    assert set(reasons) == {"late", "half"} and "('abc' x 48)" in reasons["late"] and "(12.5 x 48)" in reasons["half"]


def test_indexing_metadata_writes_it_chunk_by_chunk(tmp_path, monkeypatch):
    table = odd_metadata(tmp_path / "images")
    pq.write_table(table, tmp_path / "images" / "meta.parquet")
    build_index([str(tmp_path / "images" / "meta.parquet")], tmp_path / "whole.parquet", progress=False)
    monkeypatch.setattr(metadata_module, "CHUNK_ROWS", 6)
    summary = build_index([str(tmp_path / "images" / "meta.parquet")], tmp_path / "chunked.parquet", progress=False)
    assert pq.ParquetFile(tmp_path / "chunked.parquet").metadata.num_row_groups > 1
    whole, chunked = (Manifest.read(tmp_path / n).table.to_pylist() for n in ("whole.parquet", "chunked.parquet"))
    assert chunked == whole and summary.rows == len(whole) and summary.files_seen == 50


def test_metadata_without_paths_indexes_but_its_line_says_the_loader_cannot_serve_it(tmp_path, capsys):
    from dali_arb.cli import main

    pq.write_table(pa.table({"key": ["a", "b", "c"], "width": [640, 512, 0], "height": [480, 512, 5]}),
                   tmp_path / "meta.parquet")  # fmt: skip
    assert main(["index", str(tmp_path / "meta.parquet"), "-o", str(tmp_path / "m.parquet"), "-q"]) == 0
    line = capsys.readouterr().out
    assert "indexed 2 images" in line and "all 2 of them have no path to their image" in line
    assert "the loader cannot serve them; add a column path" in line and line.count("\n") == 1
    assert main(["buckets", str(tmp_path / "m.parquet"), "-b", "1"]) == 0  # sizes alone serve buckets and plan
    capsys.readouterr()
    save_jpeg(tmp_path / "a.jpg", 64, 48)
    pq.write_table(pa.table({"key": ["a", "b"], "width": [64, 64], "height": [48, 48], "path": ["a.jpg", None]}),
                   tmp_path / "half.parquet")  # fmt: skip
    assert main(["index", str(tmp_path / "half.parquet"), "-o", str(tmp_path / "h.parquet"), "-q"]) == 0
    line = capsys.readouterr().out
    assert "no path" not in line and "rejected 1" in line  # a row whose path is empty is a reject, as before


@pytest.mark.parametrize(
    "spec",
    [
        BucketSpec(),
        BucketSpec(max_area=512 * 512, min_dim=256, max_dim=1024, step=64, no_upscale=True),
        BucketSpec(min_size=700, max_aspect_error=0.05),
    ],
    ids=["default", "no_upscale", "min_size"],
)
def test_the_bucket_index_built_out_of_core_equals_the_one_built_at_once(tmp_path, monkeypatch, spec):
    from dali_arb.data import cache as cache_module
    from dali_arb.data.cache import bucket_index
    from dali_arb.plan.buckets import BucketIndex, served_p99

    n = 20_000
    heights, widths = random_sizes(n, seed=11)
    heights[::97] = 40  # some rows too small or too far from every bucket
    widths[::89] = 3000
    path = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    table = pq.read_table(path)
    lengths = np.where(np.arange(n) % 5 == 0, -1, np.arange(n) * 37 % 100_000 + 1)
    pq.write_table(table.set_column(table.column_names.index("length"), "length", pa.array(lengths)), path)
    monkeypatch.setattr(cache_module, "BUCKET_ROWS", 999)  # 21 chunks, none aligned with a bucket
    cached = bucket_index(Manifest.open(path, cache_dir=tmp_path / "c"), spec)
    expected = BucketIndex.of(spec.assign(heights, widths))
    for name in ("bucket", "members", "starts", "sizes"):
        got, want = np.asarray(getattr(cached, name)), getattr(expected, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    for name in ("num_base", "no_upscale", "rejected_aspect", "rejected_too_small", "rejected_min_size"):
        assert getattr(cached, name) == getattr(expected, name), name
    assert expected.rejected_aspect + expected.rejected_too_small + expected.rejected_min_size > 0
    rows = expected.members
    want = served_p99(heights[rows], widths[rows], lengths[rows])
    assert cached.served_p99 == pytest.approx(want)


@pytest.mark.slow
def test_streaming_metadata_holds_no_more_arrow_memory_at_the_end_than_after_two_chunks(tmp_path):
    """pyarrow's pre-buffered ``iter_batches`` kept every row group it had read (28 B a row of img2dataset metadata):
    the Arrow memory held between chunks must not grow with the chunks read."""
    rng = np.random.default_rng(0)
    path = tmp_path / "meta.parquet"
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("width", pa.int64()), ("height", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for group in range(12):
            n = 50_000
            text = pa.array(
                rng.integers(0, 2**62, (n, 12)).astype("S8").view("S96").ravel().astype(str)
            )  # 96-byte captions
            keys = pa.array([f"{group}-{i}" for i in range(n)])
            writer.write_table(
                pa.table({"key": keys, "caption": text, "width": np.full(n, 640), "height": np.full(n, 480)})
            )
    held = []
    for table, _ in metadata_chunks(path, chunk_rows=50_000):
        del table
        held.append(pa.total_allocated_bytes())
    assert len(held) == 12
    assert max(held[2:]) < held[1] + (20 << 20), [h >> 20 for h in held]


#: In a fresh process: build the bucket index of the cache columns in argv[1] (argv[2] rows, chunks of argv[3] rows);
#: print the peak RSS before the build (imports) and after it, bytes. ``VmHWM``, not ``ru_maxrss``: Linux carries the
#: latter over ``exec`` from the forked parent, the test process, bigger than the child.
BUCKET_BUILD_PEAK = """
import sys
from pathlib import Path
from dali_arb import BucketSpec
from dali_arb.data import cache
def peak():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
cache.BUCKET_ROWS = int(sys.argv[3])
columns = cache.ManifestCache(Path(sys.argv[1]), {"rows": int(sys.argv[2]), "columns": ["height", "width", "length"]},
                              None, None)
before = peak()
index = columns.bucket_index(BucketSpec())
assert int(index.starts[-1]) > 0
print(before, peak())
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM in /proc (Linux)")
def test_the_bucket_index_build_peaks_as_high_at_five_chunks_as_at_one(tmp_path):
    """The build's peak RSS is set by ``BUCKET_ROWS``, not by the rows: five chunks' build peaks no higher than one
    chunk's (plus 10% of what the build adds). A chunk's arrays that outlived it (its read lengths, held while the next
    chunk's were made) moved glibc's heap up each chunk: 5 chunks of 1M rows peaked 23% higher than one."""
    chunk, grown = 1 << 20, 5
    rng = np.random.default_rng(0)
    folders = {}
    (tmp_path / "locks").mkdir()  # where the cache keeps its locks, beside its folders
    for chunks in (1, grown):
        folder = tmp_path / f"c{chunks}"
        folder.mkdir()
        n = chunks * chunk
        np.save(folder / "height.npy", rng.integers(256, 2048, n).astype(np.int32))
        np.save(folder / "width.npy", rng.integers(256, 2048, n).astype(np.int32))
        np.save(folder / "length.npy", np.where(rng.random(n) < 0.5, -1, rng.integers(1, 1 << 20, n)))
        folders[chunks] = (folder, n)
    added = {}
    for chunks, (folder, n) in folders.items():
        done = subprocess.run([sys.executable, "-c", BUCKET_BUILD_PEAK, str(folder), str(n), str(chunk)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        before, peak = map(int, done.stdout.split())
        added[chunks] = peak - before
    assert added[1] > 30e6, added  # the build's own arrays: about 60 B a row of a chunk
    assert added[grown] < 1.10 * added[1], {k: f"{v / 1e6:.0f} MB" for k, v in added.items()}


@pytest.mark.parametrize(
    "kind", ["lengths", "sides", "one value", "huge", "small and huge", "mostly unknown"], ids=lambda k: k
)
def test_the_percentile_of_chunks_in_bounded_memory_equals_numpys(kind):
    """Encoded lengths are nearly unique per image: the exact percentile keeps a histogram of bins and, in a second
    pass, only the values of the one or two bins the percentile falls in, never every distinct value."""
    from dali_arb.data.cache import _BINS, _Percentile

    rng = np.random.default_rng(5)
    n = 200_003
    values = {
        "lengths": rng.integers(1, 50 << 20, n),
        "sides": rng.integers(64, 2048, n),
        "one value": np.full(n, 123_457),
        "huge": rng.integers(2**62, 2**63 - 1, n, dtype=np.int64),
        "small and huge": np.where(rng.random(n) < 0.995, rng.integers(1, 100, n), rng.integers(2**40, 2**50, n)),
        "mostly unknown": np.where(rng.random(n) < 0.999, -1, rng.integers(1, 1 << 30, n)),
    }[kind]
    for q in (0, 50, 99, 99.9, 100):
        percentile = _Percentile(q)
        chunks = np.array_split(values, 7)
        for chunk in chunks:
            percentile.add(chunk)
        if percentile.needs_values():
            for chunk in chunks:
                percentile.refine(chunk)
        assert percentile.inside.values.size <= 2 * 4096, (q, percentile.inside.values.size)
        assert percentile.histogram.size == _BINS
        assert percentile.value() == pytest.approx(np.percentile(values[values > 0], q), rel=1e-12), q
    nothing = _Percentile(99)
    nothing.add(np.array([-1, 0, -1]))
    assert not nothing.needs_values() and nothing.value() is None


def _resident_kb(suffix: str, under: Path) -> dict[str, int]:
    """This process's resident KB of each mapped file under ``under`` whose name ends with ``suffix``
    (``/proc/self/smaps``; other tests' caches mapped in the same process are not counted)."""
    resident, name = {}, None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 6:
                mapped = fields[5]
                name = mapped if mapped.endswith(suffix) and mapped.startswith(f"{under}/") else None
            elif name is not None and fields[0] == "Rss:":
                resident[name] = resident.get(name, 0) + int(fields[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_opening_a_cached_manifest_reads_no_validity_bitmap_and_counts_its_nulls_right(tmp_path):
    """Arrow counted each mapped column's nulls at open, reading every page of its validity bitmap: 4 bitmaps, 0.5 B
    a row of RSS at every open (43 MB at 100M rows), the last growth of the bucket index stage. The build records
    the counts; they must be the real ones."""
    n = 100_000
    heights, widths = random_sizes(n, seed=3)
    path = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    table = pq.read_table(path)
    caption = pa.array([None if i % 7 == 0 else f"c{i}" for i in range(n)], pa.string())
    source = pa.array([None if i % 3 == 0 else f"/shards/{i // 1000}.tar" for i in range(n)], pa.string())
    table = table.set_column(table.column_names.index("caption"), "caption", caption)
    table = table.set_column(table.column_names.index("source"), "source", source)
    pq.write_table(table, path)
    mapped = Manifest.open(path, cache_dir=tmp_path / "cache")
    valid = _resident_kb(".valid", tmp_path / "cache")
    assert len(valid) >= 2 and not any(valid.values()), valid  # caption and source (key too, if it had one): never read
    want = Manifest.read(path).table
    for name in ("key", "caption", "source"):
        assert mapped.table.column(name).null_count == want.column(name).null_count, name
    assert mapped.table.column("caption").null_count == len(range(0, n, 7))
    assert mapped.table.column("source").null_count == len(range(0, n, 3))
    assert mapped.table.column("source").to_pylist()[:4] == [None, "/shards/0.tar", "/shards/0.tar", None]
