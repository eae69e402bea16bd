"""Key de-duplication (``index/dedupe.py``): streaming, hash-partitioned, first row of a key by file order kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.index.dedupe import REASON, deduplicate, key_hashes, partition_count, scatter


def _reference_hash(key: str) -> int:
    """The hash written out in Python: the polynomial over UTF-8 bytes, then the finaliser."""
    mask = 2**64 - 1
    h = 0
    for i, byte in enumerate(key.encode()):
        h = (h + (byte + 1) * pow(1099511628211, i + 1, 2**64)) & mask
    h ^= (len(key.encode()) * 0x9E3779B97F4A7C15) & mask
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * multiplier) & mask
    return h ^ (h >> 33)


def test_key_hashes_match_the_written_out_hash_for_empty_unicode_and_sliced_keys() -> None:
    keys = ["", "a", "ab", "ba", "photos/x", "", "ünïcødé/画像", "a" * 300]
    got = key_hashes(pa.array(keys))
    assert got.tolist() == [_reference_hash(k) for k in keys]
    sliced = pa.array(["zz", *keys])[1:]  # an array with an offset into its buffers
    assert key_hashes(sliced).tolist() == got.tolist()
    chunked = pa.chunked_array([keys[:3], keys[3:]])
    assert key_hashes(chunked).tolist() == got.tolist()
    assert key_hashes(pa.array([None, "a"])).tolist() == [_reference_hash(""), _reference_hash("a")]
    assert len(set(key_hashes(pa.array([f"k{i}" for i in range(10000)])).tolist())) == 10000


def _write(path: Path, keys: list[str], group: int = 7) -> Path:
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "width": pa.array(range(len(keys)), pa.int32()),
            "source": pa.array([f"{path.name}#{i}" for i in range(len(keys))], pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=group)
    return path


def _expected(files: list[list[str]], names: list[str]) -> tuple[list[list[int]], list[dict]]:
    """Rows kept per file (row numbers) and the rejects, by the rule: the first row of a key in file order."""
    seen: set[str] = set()
    kept, rejects = [], []
    for keys, name in zip(files, names):
        rows = []
        for i, key in enumerate(keys):
            if key in seen:
                rejects.append({"source": f"{name}#{i}", "reason": REASON.format(key=key), "key": key})
            else:
                seen.add(key)
                rows.append(i)
        kept.append(rows)
    return kept, rejects


@pytest.mark.parametrize("partition_bytes", [2**30, 64, 1000], ids=["one-partition", "many", "some"])
@pytest.mark.parametrize("chunk_rows", [5, 65536])
def test_duplicates_across_files_and_within_one_keep_the_first_by_file_order(
    tmp_path: Path, partition_bytes: int, chunk_rows: int
) -> None:
    rng = random.Random(7)
    files = [[f"k{rng.randrange(60)}" for _ in range(n)] for n in (40, 1, 0, 33, 50)]
    files.append([f"unique{i}" for i in range(20)])  # a file with no duplicates stays untouched
    names = [f"part-{i}.parquet" for i in range(len(files))]
    paths = [_write(tmp_path / name, keys) for name, keys in zip(names, files)]
    untouched = paths[-1].read_bytes()
    found: list[dict] = []
    result = deduplicate(
        paths, tmp_path / "scratch", rejects=found.extend, partition_bytes=partition_bytes, chunk_rows=chunk_rows
    )
    kept, rejects = _expected(files, names)
    assert found == rejects
    assert result.dropped == len(rejects) > 0
    for path, keys, rows in zip(paths, files, kept):
        table = pq.read_table(path)
        assert table.column("key").to_pylist() == [keys[i] for i in rows]
        assert table.column("width").to_pylist() == rows  # the whole row kept, in its order
    assert paths[-1].read_bytes() == untouched
    all_keys = [k for p in paths for k in pq.read_table(p).column("key").to_pylist()]
    assert len(all_keys) == len(set(all_keys))
    assert list((tmp_path / "scratch").iterdir()) == []  # partitions removed


def test_no_duplicates_rewrites_nothing(tmp_path: Path) -> None:
    paths = [_write(tmp_path / f"{i}.parquet", [f"{i}-{j}" for j in range(30)]) for i in range(3)]
    before = [p.stat().st_mtime_ns for p in paths]
    found: list[dict] = []
    assert deduplicate(paths, tmp_path / "s", rejects=found.extend, partition_bytes=100).dropped == 0
    assert found == [] and [p.stat().st_mtime_ns for p in paths] == before


def test_partitions_follow_the_key_bytes_and_each_key_lands_in_one(tmp_path: Path) -> None:
    keys = [f"key-{i:06d}" for i in range(5000)] * 2
    path = _write(tmp_path / "m.parquet", keys, group=1000)
    assert partition_count([path], partition_bytes=2**30) == 1
    many = partition_count([path], partition_bytes=10_000)
    assert many > 5
    written = scatter(0, path, tmp_path, many, chunk_rows=777)
    assert len(written) == many
    holders: dict[str, set[str]] = {}
    for part in written:
        for key in pa.ipc.open_file(part).read_all().column("key").to_pylist():
            holders.setdefault(key, set()).add(part.name)
    assert len(holders) == 5000 and all(len(h) == 1 for h in holders.values())


def test_build_index_rejects_duplicates_across_sources_with_the_old_reason(tmp_path: Path, photo_folder) -> None:
    from dali_arb.index import build_index

    first, second = photo_folder(tmp_path / "a", 3), photo_folder(tmp_path / "b", 3)
    summary = build_index([str(first), str(second)], tmp_path / "m.parquet", workers=1, progress=False)
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.num_rows == summary.rows == 3
    assert all(s.startswith(str(first)) for s in table.column("source").to_pylist())
    lines = [json.loads(x) for x in (tmp_path / "m.parquet.rejects.jsonl").read_text().splitlines()]
    dupes = [r for r in lines if r["reason"].startswith("duplicate key")]
    assert len(dupes) == 3 and all(r["source"].startswith(str(second)) for r in dupes)
    assert summary.reject_reasons["duplicate key"] == 3


@pytest.fixture
def photo_folder():
    from PIL import Image

    def make(folder: Path, n: int) -> Path:
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8 + i, 16, 3), i * 40, np.uint8)).save(folder / f"img{i}.jpg")
        return folder

    return make


def test_key_hashes_are_the_same_chunk_by_chunk(monkeypatch) -> None:
    keys = pa.array([f"k{i % 7}" * (i % 5) for i in range(50)])
    whole = key_hashes(keys).tolist()
    monkeypatch.setattr("dali_arb.index.dedupe.CHUNK_ROWS", 3)
    assert key_hashes(keys).tolist() == whole


def test_large_string_and_dictionary_keys_are_partitioned_too(tmp_path: Path) -> None:
    keys = [f"k{i % 30}" for i in range(90)]
    big = tmp_path / "large.parquet"
    pq.write_table(pa.table({"key": pa.array(keys[:45], pa.large_string()), "source": ["a"] * 45}), big)
    coded = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"key": pa.array(keys[45:]).dictionary_encode(), "source": ["b"] * 45}), coded)
    found: list[dict] = []
    result = deduplicate([big, coded], tmp_path / "s", rejects=found.extend, partition_bytes=50)
    assert result.dropped == 60 and len(found) == 60
    kept = [k for p in (big, coded) for k in pq.read_table(p).column("key").to_pylist()]
    assert sorted(kept) == sorted(set(keys))


def test_streamed_dedupe_reads_hold_no_more_arrow_memory_at_the_end_than_after_two_chunks(tmp_path):
    """pyarrow's pre-buffered ``iter_batches`` kept every row group read: de-duplication's streamed reads (the keys,
    and the rewrite without the dropped rows) must not hold more Arrow memory as the chunks go by."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dali_arb.index import dedupe

    path = tmp_path / "m.parquet"
    n, rng = 50_000, np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("source", pa.string())])) as writer:
        for _ in range(12):  # 96-character random keys (what does not compress is what pre-buffering held)
            keys = pa.array(rng.integers(0, 2**62, (n, 12)).astype("S8").view("S96").ravel().astype(str))
            writer.write_table(pa.table({"key": keys, "source": keys}))
    held = []
    for keys in dedupe._key_batches(path, n):
        del keys
        held.append(pa.total_allocated_bytes())
    assert len(held) == 12
    assert max(held[2:]) < held[1] + (8 << 20), [h >> 20 for h in held]
    # the rewrite streams too: its peak is a chunk or two, not the file (about 115 MB of key and source text)
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    dedupe.drop_rows(path, np.array([5, n + 7], np.int64), tmp_path / "out.parquet", chunk_rows=n)
    assert pq.read_metadata(tmp_path / "out.parquet").num_rows == 12 * n - 2
    assert pool.max_memory() - before < 60 << 20
