"""Where the parallel fixes of issue 18 meet (the trust-review of the merge): each test failed on the merged tree
before its fix."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.errors import DataError
from dali_arb.index import build_index
from support.loopback import moto_bucket, put_object

from .conftest import SMALL
from .images import photo_like

BUCKET = "review"
#: Every test image has this (width, height): one bucket, and BMPs of one byte length.
W, H = 200, 300


def bmp_bytes(seed: int) -> bytes:
    """An uncompressed BMP of W x H: every one has the same byte length, whatever its pixels."""
    out = io.BytesIO()
    photo_like(W, H, seed).save(out, "BMP")
    return out.getvalue()


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(str(manifest), **{**options, **kw})


def keys_of(it) -> list[str]:
    return sorted(k for batch in it for k in batch["ids"])


@pytest.fixture(scope="module")
def s3():
    with moto_bucket(BUCKET) as server:
        yield server


def put(key: str, data: bytes) -> None:
    put_object(BUCKET, key, data)


def url_metadata(prefix: str, count: int = 8) -> str:
    """``count`` BMPs under ``prefix/imgs/`` and metadata naming them by URL at ``prefix/meta.parquet``."""
    rows = {"key": [], "width": [], "height": [], "path": []}
    for i in range(count):
        put(f"{prefix}/imgs/{i}.bmp", bmp_bytes(i))
        for name, value in zip(rows, (f"k{i}", W, H, f"s3://{BUCKET}/{prefix}/imgs/{i}.bmp")):
            rows[name].append(value)
    meta = io.BytesIO()
    pq.write_table(pa.table(rows), meta)
    put(f"{prefix}/meta.parquet", meta.getvalue())
    return f"s3://{BUCKET}/{prefix}/meta.parquet"


# -- metadata rows naming objects (index f3) met the ETag identity check (identity f6) --------------------------
@pytest.mark.slow
def test_metadata_url_rows_record_the_etag_and_refuse_an_object_replaced_by_one_of_the_same_size(s3, tmp_path):
    out = tmp_path / "m.parquet"
    build_index([url_metadata("meta-etag")], out, progress=False, workers=1)
    rows = {r["key"]: r for r in Manifest.read(out).table.to_pylist()}
    assert rows["k5"]["etag"] and rows["k5"]["etag"].startswith('"'), rows["k5"]
    put("meta-etag/imgs/5.bmp", bmp_bytes(97))  # the same byte length, other pixels
    for workers, kind in ((0, "thread"), (1, "process")):
        it = loader(out, workers=workers, worker_kind=kind)
        assert "k5" not in keys_of(it), "the new object was served under the old key"
        assert it.failed == ["k5"]


# -- a shard's last members (index f8) met its identity (identity f5/f7) ------------------------------------------
def served(it) -> dict:
    """``{key: image}`` of one epoch."""
    return {key: image.clone() for batch in it for key, image in zip(batch["ids"], batch["images"])}


def test_a_shard_replaced_while_it_is_indexed_is_never_served_under_the_wrong_keys(tmp_path, monkeypatch):
    """The members of a shard were read from one open of it and its identity (fstat) from a second: a shard
    re-packed in between got the new shard's identity for the old shard's offsets, so each key served another
    key's image and nothing was refused. Members and identity now come from one open file."""
    import os
    import tarfile

    import torch

    from dali_arb.index import shards

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"img{i:03d}.bmp").write_bytes(bmp_bytes(i))
        (folder / f"img{i:03d}.txt").write_text(f"caption {i}")
    files = sorted(folder.iterdir())

    def pack(path, members):
        with tarfile.open(path, "w") as tar:
            for f in members:
                tar.add(f, arcname=f.name)
        return path

    shard = pack(tmp_path / "00000.tar", files)
    repacked = pack(tmp_path / "repacked.tar", sorted(files, key=lambda f: (-int(f.stem[3:]), f.suffix)))
    assert os.path.getsize(repacked) == os.path.getsize(shard)
    members = shards._members

    def members_then_repacked(path, *args, **kwargs):
        out = members(path, *args, **kwargs)
        if os.path.exists(repacked):
            os.replace(repacked, shard)  # `tar` of another writer lands now
        return out

    monkeypatch.setattr(shards, "_members", members_then_repacked)
    fixed = {"crop": "center", "flip": 0.0}
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, progress=False, workers=1)
    truth = served(loader(build_index([str(folder)], tmp_path / "truth.parquet", progress=False).manifest, **fixed))
    try:
        images = served(loader(out, **fixed))
    except DataError as exc:  # every sample of the bucket refused as changed since indexing: loud, none wrong
        assert "changed or gone" in str(exc)
        images = {}
    wrong = [key for key, image in images.items() if not torch.equal(image, truth[key])]
    assert not wrong, f"served under the wrong key: {wrong}"


# -- metadata rows naming local files (index f3) and the local identity check (identity f6) ----------------------
def test_metadata_rows_naming_local_files_refuse_a_file_replaced_after_indexing(tmp_path):
    """Metadata rows naming local files recorded no identity at all (length -1, no mtime, no size): the loader
    read whatever file was there. They now record the file's size and mtime, checked like a folder's."""
    import os
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = {"key": [], "width": [], "height": [], "path": []}
    for i in range(8):
        (folder / f"{i}.bmp").write_bytes(bmp_bytes(i))
        for name, value in zip(rows, (f"k{i}", W, H, f"photos/{i}.bmp")):
            rows[name].append(value)
    pq.write_table(pa.table(rows), tmp_path / "meta.parquet")
    out = tmp_path / "m.parquet"
    build_index([str(tmp_path / "meta.parquet")], out, progress=False, workers=1)
    time.sleep(0.02)
    (folder / "new.bmp").write_bytes(bmp_bytes(97))  # the same byte length, other pixels
    os.replace(folder / "new.bmp", folder / "5.bmp")
    for workers, kind in ((0, "thread"), (1, "process")):
        it = loader(out, workers=workers, worker_kind=kind)
        assert "k5" not in keys_of(it), "the new file was served under the old key"
        assert it.failed == ["k5"]
