"""Where the parallel fixes of issue 18 meet (the trust-review of the merge): each test failed on the merged tree
before its fix."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.index import build_index

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
    import boto3

    from dali_arb.loopback import moto_s3

    with moto_s3() as server:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield server


def put(key: str, data: bytes) -> None:
    import obstore
    from obstore.store import S3Store

    obstore.put(S3Store(BUCKET, client_options={"allow_http": True}), key, data)


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
