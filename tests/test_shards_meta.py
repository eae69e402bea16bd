"""Shards with img2dataset's per-shard Parquet beside them (``index/shards.py``): sizes and captions from the
Parquet, only the tar's headers read; samples it does not list read as without it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.index import build_index
from dali_arb.index.shards import shard_task, sidecar_metadata

from .images import jpeg_bytes

COLUMNS = ["key", "width", "height", "caption", "source", "offset", "length", "mtime_ns", "source_size"]


def write_shard(path: Path, samples: list[tuple[str, bytes, str | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            members = [(f"{key}.jpg", image)] + ([(f"{key}.txt", caption.encode())] if caption is not None else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shard(folder: Path, n: int = 8) -> tuple[Path, Path]:
    """A shard as img2dataset writes it, and its Parquet (key, width, height, original_*, caption, status, url)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(40 + 4 * i, 30 + 3 * i) for i in range(n)]
    shard = write_shard(folder / "00000.tar", [(f"{i:09d}", jpeg_bytes(w, h, seed=i), f"a cat {i}") for i, (w, h) in enumerate(sizes)])  # fmt: skip
    meta = folder / "00000.parquet"
    keys = [f"{i:09d}" for i in range(n)] + ["000000099"]  # a download that failed: in the Parquet, not the tar
    pq.write_table(
        pa.table({
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "key": keys,
            "caption": [f"a cat {i}" for i in range(n)] + [None],
            "status": ["success"] * n + ["failed_to_download"],
            "width": [w for w, _ in sizes] + [None],
            "height": [h for _, h in sizes] + [None],
            "original_width": [w * 4 for w, _ in sizes] + [None],
            "original_height": [h * 4 for _, h in sizes] + [None],
        }),
        meta,
    )  # fmt: skip
    return shard, meta


def rows_of(manifest: Path) -> list[tuple]:
    table = pq.read_table(manifest)
    return sorted(zip(*(table.column(c).to_pylist() for c in COLUMNS)))


def test_a_shard_with_its_parquet_indexes_as_the_shard_read_whole(tmp_path: Path) -> None:
    shard, meta = img2dataset_shard(tmp_path / "data")
    assert sidecar_metadata(str(shard)) == str(meta)
    with_meta = build_index([str(shard)], tmp_path / "with.parquet", workers=1, progress=False)
    meta.rename(meta.with_suffix(".hidden"))
    assert sidecar_metadata(str(shard)) is None
    without = build_index([str(shard)], tmp_path / "without.parquet", workers=1, progress=False)
    assert rows_of(tmp_path / "with.parquet") == rows_of(tmp_path / "without.parquet")
    assert with_meta.rows == without.rows == 8


def test_with_the_parquet_no_image_is_read(tmp_path: Path) -> None:
    """The images in the tar are not pictures: read whole, every one is rejected; with the Parquet, none is read."""
    shard, meta = img2dataset_shard(tmp_path / "data", n=3)
    write_shard(shard, [(f"{i:09d}", b"not a picture" * (i + 1), None) for i in range(3)])
    rows, rejects = shard_task((str(shard), 10**8, [], str(meta)))
    assert [(r.key, r.width, r.height, r.caption) for r in rows] == [
        ("000000000", 40, 30, "a cat 0"), ("000000001", 44, 33, "a cat 1"), ("000000002", 48, 36, "a cat 2"),
    ]  # fmt: skip
    assert rejects == []
    assert [r.length for r in rows] == [13, 26, 39]  # offsets and lengths from the headers
    data = shard.read_bytes()
    assert [data[r.offset : r.offset + r.length] for r in rows] == [b"not a picture" * (i + 1) for i in range(3)]
    rows, rejects = shard_task((str(shard), 10**8, []))
    assert rows == [] and len(rejects) == 3


def test_samples_the_parquet_does_not_list_or_gets_wrong_are_read_from_the_shard(tmp_path: Path) -> None:
    shard, meta = img2dataset_shard(tmp_path / "data", n=4)
    table = pq.read_table(meta)
    # sample 1 missing from the Parquet, sample 2 with a size over max_pixels, sample 3 "failed"
    keep = [True, False, True, True, True]
    table = table.filter(pa.array(keep))
    table = table.set_column(table.column_names.index("width"), "width", pa.array([40, 10**6, 52, None]))
    table = table.set_column(table.column_names.index("status"), "status",
                             pa.array(["success", "success", "failed_to_resize", "failed_to_download"]))  # fmt: skip
    pq.write_table(table, meta)
    rows, rejects = shard_task((str(shard), 10**7, [], str(meta)))
    got = sorted((r.key, r.width, r.height, r.caption) for r in rows)
    # 1, 2 and 3 read from their images (jpeg_bytes sizes as made), with their .txt captions
    assert got == [(f"{i:09d}", 40 + 4 * i, 30 + 3 * i, f"a cat {i}") for i in range(4)]
    assert rejects == []


def test_captions_come_from_the_tar_when_the_parquet_has_none(tmp_path: Path) -> None:
    shard, meta = img2dataset_shard(tmp_path / "data", n=2)
    pq.write_table(pq.read_table(meta).drop_columns(["caption"]), meta)
    rows, _ = shard_task((str(shard), 10**8, [], str(meta)))
    assert [r.caption for r in rows] == ["a cat 0", "a cat 1"]


@pytest.mark.parametrize("columns", [["key", "width"], ["url", "caption"]])
def test_a_parquet_without_sizes_is_not_a_sidecar(tmp_path: Path, columns: list[str]) -> None:
    shard, meta = img2dataset_shard(tmp_path / "data", n=2)
    pq.write_table(pq.read_table(meta, columns=columns), meta)
    assert sidecar_metadata(str(shard)) is None
    meta.write_bytes(b"not parquet")
    assert sidecar_metadata(str(shard)) is None
