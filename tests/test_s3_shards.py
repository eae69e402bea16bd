"""Shards in object storage with img2dataset's Parquet beside them (``index/remote.py`` ``remote_shard_task``): only
their tar headers are read, with ranged GETs in windows, against moto's S3 on loopback; the manifest is the one the
whole-fetch path writes."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dali_arb.data.storage import IOStats, head
from dali_arb.errors import IndexingError
from dali_arb.index import build_index
from dali_arb.index.remote import SHARD_WINDOW, WALK_MIN_STRIDE, HeaderWindows, RemoteShard, remote_shard_task
from dali_arb.index.shards import inspect_shard, shard_task
from support.loopback import FaultProxy, moto_bucket, put_object

BUCKET = "shards"
SAMPLES = 12
COLUMNS = ["key", "width", "height", "caption", "source", "offset", "length", "mtime_ns", "source_size", "etag"]


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG of noise: about 1.5 bytes per pixel, so members larger than a window are easy to make."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def img2dataset_shard(
    n: int = SAMPLES, *, big: bool = True, first: int = 0
) -> tuple[bytes, bytes, list[tuple[int, int]]]:
    """A shard as img2dataset writes it (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample) and its Parquet."""
    sizes = [(300 + 8 * i, 220 + 6 * i) if big else (16 + i, 12 + i) for i in range(n)]
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for i, (w, h) in enumerate(sizes):
            key = f"{first + i:09d}"
            members = [(f"{key}.jpg", noise_jpeg(w, h, i)), (f"{key}.txt", f"a cat {i}".encode()),
                       (f"{key}.json", b'{"caption": "a cat %d", "status": "success"}' % i)]  # fmt: skip
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    meta = io.BytesIO()
    keys = [f"{first + i:09d}" for i in range(n)] + ["000009999"]  # a failed download: in the Parquet, not in the tar
    pq.write_table(pa.table({
        "key": keys, "caption": [f"a cat {i}" for i in range(n)] + [None],
        "status": ["success"] * n + ["failed_to_download"],
        "width": [w for w, _ in sizes] + [None], "height": [h for _, h in sizes] + [None],
        "original_width": [4 * w for w, _ in sizes] + [None], "original_height": [4 * h for _, h in sizes] + [None],
    }), meta)  # fmt: skip
    return tar_bytes.getvalue(), meta.getvalue(), sizes


@pytest.fixture(scope="module")
def s3():
    """moto's S3 with ``with/00000.tar`` (and its Parquet), the same shard alone under ``without/``, and a second
    shard of small images under ``with/``."""
    with moto_bucket(BUCKET) as server:
        shard, meta, _ = img2dataset_shard()
        small, small_meta, _ = img2dataset_shard(40, big=False, first=1000)
        put_object(BUCKET, "with/00000.tar", shard)
        put_object(BUCKET, "with/00000.parquet", meta)
        put_object(BUCKET, "with/00001.tar", small)
        put_object(BUCKET, "with/00001.parquet", small_meta)
        put_object(BUCKET, "without/00000.tar", shard)
        put_object(BUCKET, "without/00001.tar", small)
        yield server


def test_the_header_walk_writes_the_manifest_of_the_whole_fetch_at_a_fraction_of_the_bytes(s3, tmp_path):
    walked = build_index([f"s3://{BUCKET}/with/{{00000..00001}}.tar"], tmp_path / "walk.parquet", progress=False,
                         workers=1)  # fmt: skip
    whole = build_index([f"s3://{BUCKET}/without/{{00000..00001}}.tar"], tmp_path / "whole.parquet", progress=False,
                        workers=1)  # fmt: skip
    a, b = pq.read_table(tmp_path / "walk.parquet"), pq.read_table(tmp_path / "whole.parquet")
    assert a.num_rows == b.num_rows == SAMPLES + 40
    for column in COLUMNS:
        if column == "source":
            assert a.column(column).to_pylist() == [
                s.replace("/without/", "/with/") for s in b.column(column).to_pylist()
            ]
        elif column not in ("mtime_ns", "etag"):  # (two objects: their own times; the same bytes, the same ETag)
            assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    assert a.column("etag").to_pylist() == b.column("etag").to_pylist()
    # img2dataset's sizes before resizing come with the Parquet (the whole fetch of a shard alone has none)
    _, _, sizes = img2dataset_shard()
    assert a.column("original_width").to_pylist()[:SAMPLES] == [4 * w for w, _ in sizes]
    assert "original_width" not in b.column_names
    # the shard of large images walked, the one of small images (a few hundred bytes each) fetched whole
    assert whole.fetched_objects == 2 and walked.fetched_objects == 1 and walked.shard_walks == 1
    sizes = [head(f"s3://{BUCKET}/with/0000{i}.tar").size for i in range(2)]
    assert whole.fetched_bytes == sum(sizes) and walked.shard_walk_size == sizes[0]
    assert sizes[0] >= WALK_MIN_STRIDE * (SAMPLES + 1) and sizes[1] < WALK_MIN_STRIDE * (40 + 1)  # (+1: a failed row)
    # a window of SHARD_WINDOW per sample (its JPEGs are larger), the Parquet, the end of the archive
    assert walked.shard_walk_requests <= 1 + SAMPLES + 1
    assert walked.shard_walk_bytes <= 2 * SHARD_WINDOW * SAMPLES < sizes[0] / 4
    line = walked.line()
    assert "1 shard(s) in object storage read header-only" in line and "requests and" in line and "% of their" in line


def test_the_walk_reads_each_window_once_and_every_header_inside_it(s3):
    """Requests and bytes of the walk, counted: a window holding several samples is one request; the data of a
    member larger than a window is never read."""
    shard, _, _ = img2dataset_shard()
    info = head(f"s3://{BUCKET}/with/00000.tar")
    stats = IOStats()
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        headers = [m.offset for m in tar.getmembers()]
    raw = HeaderWindows(info.url, info.size, stats, window=4096)
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        assert [m.offset for m in tar] == headers
    taken = stats.take()
    # one window per sample (its .jpg header, then .txt and .json and the next .jpg header in the same 4 KiB), and
    # the end of the archive
    assert taken["requests"] <= SAMPLES + 1
    assert taken["bytes_read"] <= taken["requests"] * 4096 < len(shard) / 4
    rows, rejects = inspect_shard(RemoteShard(info, stats, window=1 << 30), 10**8, [], None)
    assert len(rows) == SAMPLES and not rejects
    assert stats.take()["requests"] == 1  # a window larger than the shard: one GET for everything, images included


def test_a_shard_without_its_parquet_or_with_pairs_keeps_the_whole_fetch(s3, tmp_path):
    assert remote_shard_task((head(f"s3://{BUCKET}/without/00000.tar"), 10**8)) is None
    summary = build_index([f"s3://{BUCKET}/without/00000.tar"], tmp_path / "m.parquet", progress=False, workers=1)
    assert summary.fetched_objects == 1 and summary.shard_walks == 0
    put_object(BUCKET, "notmeta/00000.tar", img2dataset_shard(2, big=False)[0])
    put_object(BUCKET, "notmeta/00000.parquet", b"not parquet")
    assert remote_shard_task((head(f"s3://{BUCKET}/notmeta/00000.tar"), 10**8)) is None


def test_rows_match_a_local_shard_read_with_its_parquet(s3, tmp_path):
    shard, meta, _ = img2dataset_shard()
    (tmp_path / "00000.tar").write_bytes(shard)
    (tmp_path / "00000.parquet").write_bytes(meta)
    local, _ = shard_task((str(tmp_path / "00000.tar"), 10**8, [], str(tmp_path / "00000.parquet")))
    remote, _, _, walked = remote_shard_task((head(f"s3://{BUCKET}/with/00000.tar"), 10**8))
    assert walked
    assert [(r.key, r.width, r.height, r.caption, r.offset, r.length) for r in remote] == [
        (r.key, r.width, r.height, r.caption, r.offset, r.length) for r in local
    ]


def test_a_store_failing_mid_walk_stops_the_index_with_its_message(s3, tmp_path, monkeypatch):
    """Every GET after the Parquet and two windows is answered 503 SlowDown, more often than it is retried: the run
    stops with the store's words and writes no manifest."""
    with FaultProxy(s3.port, slow_down=100, skip=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(IndexingError, match=r"(?i)slow ?down.*with/00000\.tar|with/00000\.tar.*(?i:slow ?down)"):
            build_index([f"s3://{BUCKET}/with/00000.tar"], tmp_path / "m.parquet", progress=False, workers=1)
        assert proxy.counts.slowed >= 7  # retried, then given up
    assert not (tmp_path / "m.parquet").exists()


def test_long_member_names_and_a_truncated_shard_walk_as_the_local_shard(s3, tmp_path):
    """Keys over 100 characters (a pax header before the member's: more blocks in the same window) give the local
    rows; a shard cut short gives the local reject, naming the URL."""
    long_key = "a/" + "long-folder-name/" * 8 + "k"
    samples = [(f"{long_key}{i}.jpg", noise_jpeg(400, 300, i)) for i in range(4)]
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, image in samples:
            info = tarfile.TarInfo(name)
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    meta = io.BytesIO()
    pq.write_table(pa.table({"key": [n[:-4] for n, _ in samples], "width": [400] * 4, "height": [300] * 4}), meta)
    for name, shard in (("long", data.getvalue()), ("cut", data.getvalue()[: len(data.getvalue()) // 2])):
        (tmp_path / f"{name}.tar").write_bytes(shard)
        (tmp_path / f"{name}.parquet").write_bytes(meta.getvalue())
        put_object(BUCKET, f"{name}/00000.tar", shard)
        put_object(BUCKET, f"{name}/00000.parquet", meta.getvalue())
        local_rows, local_rejects = shard_task(
            (str(tmp_path / f"{name}.tar"), 10**8, [], str(tmp_path / f"{name}.parquet"))
        )
        remote, rejects, _, walked = remote_shard_task((head(f"s3://{BUCKET}/{name}/00000.tar"), 10**8, 4096))
        assert walked
        assert [(r.key, r.offset, r.length) for r in remote] == [(r.key, r.offset, r.length) for r in local_rows]
        assert [r["reason"] for r in rejects] == [r["reason"] for r in local_rejects]
        assert all(r["source"].startswith(f"s3://{BUCKET}/{name}/") for r in rejects)
    assert len(local_rows) == 0 and rejects and rejects[0]["reason"].startswith("unreadable tar shard")
    assert len(remote_shard_task((head(f"s3://{BUCKET}/long/00000.tar"), 10**8))[0]) == 4


def test_a_shard_in_gcs_is_walked_the_same_way(tmp_path):
    """``gs://`` goes through the same storage layer: fake-gcs-server on loopback, the rows of the local shard."""
    from support.loopback import fake_gcs

    shard, meta, _ = img2dataset_shard()
    seed = tmp_path / "seed" / "gbucket" / "shards"
    seed.mkdir(parents=True)
    (seed / "00000.tar").write_bytes(shard)
    (seed / "00000.parquet").write_bytes(meta)
    local = build_index([str(seed / "00000.tar")], tmp_path / "local.parquet", progress=False, workers=1)
    with fake_gcs(tmp_path / "seed"):
        walked = build_index(["gs://gbucket/shards/00000.tar"], tmp_path / "gcs.parquet", progress=False, workers=1)
    assert walked.shard_walks == 1 and walked.rows == local.rows == SAMPLES
    columns = ["key", "width", "height", "caption", "offset", "length", "original_width"]
    assert pq.read_table(tmp_path / "gcs.parquet", columns=columns).equals(
        pq.read_table(tmp_path / "local.parquet", columns=columns)
    )
