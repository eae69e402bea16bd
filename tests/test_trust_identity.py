"""A file's identity, not only its size (issue 18, findings 5, 6, 7 and 9): samples rewritten, replaced or re-packed
after indexing are refused as "changed since indexing" (and replaced), ``--update`` re-reads files edited in place
with their modification time kept, and the sample cache never serves an object's old version.

The local identity the loader checks at read time is (size, mtime_ns) of the file (a tar member: of its shard);
``--update`` reuses a row only when size, mtime_ns and ctime_ns are unchanged. In object storage it is the object's
ETag, recorded at indexing and compared with the ETag of every GET."""

from __future__ import annotations

import os
import shutil
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.data.readahead import RemoteReads
from dali_arb.data.storage import Request
from dali_arb.index import build_index
from support.loopback import moto_bucket, put_object

from .conftest import SMALL
from .images import photo_like, save_jpeg

BUCKET = "identity"
#: Every test image has this (width, height): one bucket, and BMPs of one byte length.
W, H = 200, 300


def bmp(path, seed: int):
    """An uncompressed BMP of W x H: every one has the same byte length, whatever its pixels."""
    photo_like(W, H, seed).save(path, "BMP")
    return path


def bmp_folder(folder, count: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        bmp(folder / f"img{i:03d}.bmp", seed=i)
        (folder / f"img{i:03d}.txt").write_text(f"caption {i}")
    return folder


#: Options under which a served image depends on its key only, not on its place in the batches.
FIXED = {"crop": "center", "flip": 0.0}


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(str(manifest), **{**options, **kw})


def served(it) -> dict[str, torch.Tensor]:
    """``{key: image}`` of one epoch (with :data:`FIXED` options, an image depends on its key only)."""
    out = {}
    for batch in it:
        for key, image in zip(batch["ids"], batch["images"]):
            out[key] = image.clone()
    return out


def replace_keeping_size(path, seed: int, *, keep_mtime: bool) -> None:
    """Write another image of the same byte length and pixel size over ``path`` (a new file, renamed in)."""
    before = os.stat(path)
    time.sleep(0.02)  # ctime is kept at the kernel's tick: let it move on
    other = bmp(path.with_name(path.name + ".new.bmp"), seed)
    os.replace(other, path)
    assert os.path.getsize(path) == before.st_size
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# -- finding 5: --update after an in-place edit that keeps the mtime ----------------------------------------------
def set_orientation_in_place(path, orientation: int) -> None:
    """Change a JPEG's EXIF orientation in its bytes, as ``exiftool -P`` does: same size, mtime kept."""
    before = os.stat(path)
    data = path.read_bytes()
    entry = b"\x01\x12\x00\x03\x00\x00\x00\x01\x00"  # tag 0x0112, SHORT, count 1 (big-endian TIFF, as Pillow writes)
    at = data.find(entry)
    assert at > 0, "the test JPEG has no orientation entry"
    time.sleep(0.02)
    with open(path, "r+b") as fh:
        fh.seek(at + len(entry))
        fh.write(bytes([orientation]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_f5_update_rereads_a_file_edited_in_place_with_its_mtime_kept(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        save_jpeg(folder / f"img{i:03d}.jpg", H, W, seed=i, orientation=6)  # stored sideways: displayed W x H
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    set_orientation_in_place(folder / "img002.jpg", 1)  # now displayed as stored: H x W
    summary = build_index([str(folder)], out, update=True, progress=False)
    table = Manifest.read(out).table.to_pydict()
    row = table["key"].index("img002")
    assert (table["width"][row], table["height"][row]) == (H, W), "the stale displayed size was kept"
    assert summary.reused == 7
    again = build_index([str(folder)], out, update=True, progress=False)  # nothing changed since: all reused
    assert again.reused == 8
    it = loader(out)
    assert "img002" in served(it) and it.failed == []


def test_f5_update_rereads_a_file_replaced_with_its_mtime_set_back(tmp_path):
    """A replacement whose mtime is set back (``touch -r``) has a new ctime, which users cannot set back."""
    folder = bmp_folder(tmp_path / "photos")
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    replace_keeping_size(folder / "img003.bmp", seed=99, keep_mtime=True)
    summary = build_index([str(folder)], out, update=True, progress=False)
    assert summary.reused == 7
    ctime = pq.read_table(out).to_pydict()
    row = ctime["key"].index("img003")
    assert ctime["ctime_ns"][row] == os.stat(folder / "img003.bmp").st_ctime_ns


def test_f5_update_rereads_a_shard_repacked_with_its_mtime_set_back(tmp_path):
    folder = bmp_folder(tmp_path / "photos")
    shard = pack(tmp_path / "a.tar", sorted(folder.glob("*")))
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, progress=False)
    before = os.stat(shard)
    time.sleep(0.02)
    pack(shard, sorted(folder.glob("*"), reverse=True))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    summary = build_index([str(shard)], out, update=True, progress=False)
    assert summary.reused == 0
    assert served(loader(out)).keys() == {f"img{i:03d}" for i in range(8)}


# -- finding 6: a file replaced by another of the same size and pixel size --------------------------------------------
def test_f6_a_local_file_replaced_by_one_of_the_same_size_is_refused_as_changed(tmp_path):
    folder = bmp_folder(tmp_path / "photos")
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    replace_keeping_size(folder / "img003.bmp", seed=99, keep_mtime=False)
    for workers in (0, 1):
        it = loader(out, workers=workers)
        images = served(it)
        assert "img003" not in images and len(images) == 7, "the new file was served under the old key and caption"
        assert it.failed == ["img003"]
        reason = it.state_dict()["failed"]["img003"]
        assert "img003.bmp changed since indexing" in reason and "--update" in reason, reason


def test_f6_copies_that_keep_size_and_mtime_still_serve(tmp_path):
    """The local identity is (size, mtime_ns): a copy that keeps them (``cp -a``, ``rsync -a``: a new inode and
    ctime) and a ``chmod`` (a new ctime) serve as before; only ``--update`` looks at ctime."""
    folder = bmp_folder(tmp_path / "photos")
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    time.sleep(0.02)
    copy = tmp_path / "copy.bmp"
    shutil.copy2(folder / "img001.bmp", copy)
    os.replace(copy, folder / "img001.bmp")
    os.chmod(folder / "img002.bmp", 0o600)
    it = loader(out)
    assert len(served(it)) == 8 and it.failed == []


def test_f6_manifests_without_identity_columns_still_load_and_serve(tmp_path):
    folder = bmp_folder(tmp_path / "photos")
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    table = pq.read_table(out)
    old = table.drop_columns([c for c in ("ctime_ns", "source_size", "etag") if c in table.column_names])
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), tmp_path / "old.parquet")
    it = loader(tmp_path / "old.parquet")
    assert len(served(it)) == 8 and it.failed == []
    # an old manifest's mtime_ns is still checked
    replace_keeping_size(folder / "img004.bmp", seed=98, keep_mtime=False)
    it = loader(tmp_path / "old.parquet")
    assert "img004" not in served(it) and it.failed == ["img004"]
    # and --update from an old manifest reads every header again once (their ctime was not recorded)
    assert build_index([str(folder)], tmp_path / "old.parquet", update=True, progress=False).reused == 0


# -- finding 7: a tar shard re-packed in another member order ---------------------------------------------------------
def pack(path, files):
    with tarfile.open(path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    return path


def other_order(files):
    """The members of a shard with the samples in reverse order (each image still before its caption)."""
    return sorted(files, key=lambda f: (-int(f.stem[3:]), f.suffix))


def test_f7_a_shard_repacked_in_another_order_is_refused_as_changed(tmp_path):
    folder = bmp_folder(tmp_path / "photos", count=8)
    files = sorted(folder.glob("*"))
    first, second = pack(tmp_path / "00000.tar", files[:8]), pack(tmp_path / "00001.tar", files[8:])
    out = tmp_path / "m.parquet"
    build_index([str(first), str(second)], out, progress=False)
    truth = served(loader(out, **FIXED))
    time.sleep(0.02)
    pack(first, other_order(files[:8]))  # same members, same size: each image's offset holds another image
    it = loader(out, **FIXED)
    images = served(it)
    assert set(it.failed) == {"img000", "img001", "img002", "img003"}, it.failed
    assert all("00000.tar" in r and "changed since indexing" in r for r in it.state_dict()["failed"].values())
    for key, image in images.items():  # every sample served is the one its key names
        assert torch.equal(image, truth[key]), key


# -- object storage (findings 6, 7 and 9) ---------------------------------------------------------------------------
def put(key: str, data: bytes) -> None:
    put_object(BUCKET, key, data)


@pytest.fixture(scope="module")
def s3():
    with moto_bucket(BUCKET) as server:
        yield server


def upload_folder(folder, prefix: str) -> None:
    for f in sorted(folder.iterdir()):
        put(f"{prefix}/{f.name}", f.read_bytes())


@pytest.mark.slow
def test_f6_an_object_replaced_by_one_of_the_same_size_is_refused_as_changed(s3, tmp_path):
    folder = bmp_folder(tmp_path / "photos")
    upload_folder(folder, "same")
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/same/"], out, progress=False)
    assert pq.read_table(out).column("etag")[0].as_py().startswith('"')
    replace_keeping_size(folder / "img005.bmp", seed=97, keep_mtime=False)
    put("same/img005.bmp", (folder / "img005.bmp").read_bytes())
    for workers, kind in ((0, "thread"), (1, "process")):
        it = loader(out, workers=workers, worker_kind=kind)
        images = served(it)
        assert "img005" not in images and len(images) == 7, "the new object was served under the old key"
        assert it.failed == ["img005"]
        assert "s3://identity/same/img005.bmp changed since indexing" in it.state_dict()["failed"]["img005"]
    # re-indexed with --update, it is served again, with its new pixels
    assert build_index([f"s3://{BUCKET}/same/"], out, update=True, progress=False).reused == 7
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    remote, local = served(loader(out)), served(loader(tmp_path / "local.parquet"))
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)


@pytest.mark.slow
def test_f6_an_object_named_by_metadata_and_replaced_by_one_of_the_same_size_is_refused_as_changed(s3, tmp_path):
    """img2dataset metadata whose paths are s3:// URLs: the indexer records each object's size and ETag, so a
    same-size replacement is refused like one under a prefix (it was served under the old key: no ETag recorded)."""
    folder = bmp_folder(tmp_path / "photos")
    upload_folder(folder, "meta")
    files = sorted(folder.glob("*.bmp"))
    metadata = tmp_path / "meta.csv"
    metadata.write_text(
        "key,width,height,path\n" + "".join(f"{f.stem},{W},{H},s3://{BUCKET}/meta/{f.name}\n" for f in files)
    )
    out = tmp_path / "m.parquet"
    build_index([str(metadata)], out, progress=False)
    table = pq.read_table(out)
    assert all(e.startswith('"') for e in table.column("etag").to_pylist())
    assert table.column("source_size").to_pylist() == [f.stat().st_size for f in files]
    replace_keeping_size(folder / "img005.bmp", seed=97, keep_mtime=False)
    put("meta/img005.bmp", (folder / "img005.bmp").read_bytes())
    it = loader(out, workers=1)
    images = served(it)
    assert "img005" not in images and len(images) == 7, "the new object was served under the old key"
    assert it.failed == ["img005"]


@pytest.mark.slow
def test_f7_a_shard_in_storage_repacked_in_another_order_is_refused_as_changed(s3, tmp_path):
    folder = bmp_folder(tmp_path / "photos", count=8)
    files = sorted(folder.glob("*"))
    first, second = pack(tmp_path / "00000.tar", files[:8]), pack(tmp_path / "00001.tar", files[8:])
    put("shards/00000.tar", first.read_bytes())
    put("shards/00001.tar", second.read_bytes())
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/shards/{{00000..00001}}.tar"], out, progress=False)
    truth = served(loader(out, **FIXED))
    put("shards/00000.tar", pack(tmp_path / "re.tar", other_order(files[:8])).read_bytes())
    assert os.path.getsize(tmp_path / "re.tar") == os.path.getsize(first)
    it = loader(out, workers=1, **FIXED)
    images = served(it)
    assert set(it.failed) == {"img000", "img001", "img002", "img003"}, it.failed
    assert all("changed since indexing" in r for r in it.state_dict()["failed"].values())
    assert all(torch.equal(image, truth[key]) for key, image in images.items())


@pytest.mark.slow
def test_f9_the_sample_cache_never_serves_an_objects_old_version(s3, tmp_path):
    folder = bmp_folder(tmp_path / "photos")
    upload_folder(folder, "cached")
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/cached/"], out, progress=False)
    cache = tmp_path / "cache"
    first = loader(out, sample_cache=cache, read_ahead=0)
    old = served(first)
    assert len(old) == 8
    replace_keeping_size(folder / "img006.bmp", seed=96, keep_mtime=False)
    put("cached/img006.bmp", (folder / "img006.bmp").read_bytes())
    build_index([f"s3://{BUCKET}/cached/"], out, update=True, progress=False)
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    again = loader(out, sample_cache=cache, read_ahead=0)
    remote, local = served(again), served(loader(tmp_path / "local.parquet"))
    assert again.failed == [] and remote.keys() == local.keys()
    assert torch.equal(remote["img006"], local["img006"]), "the cache served the object's old bytes"
    assert not torch.equal(remote["img006"], old["img006"])
    assert again.stats["hits"] == 7  # the other samples still come from the cache


def test_f9_the_sample_cache_key_names_the_endpoint_and_the_version(tmp_path, monkeypatch):
    reads = RemoteReads(str(tmp_path), keep=True)
    request = Request("s3://bucket/a.jpg", 0, 100, whole=True, version='"v1"')
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://one.example:9000")
    one = reads._path(request)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://two.example:9000")
    two = reads._path(request)
    newer = reads._path(Request("s3://bucket/a.jpg", 0, 100, whole=True, version='"v2"'))
    assert len({one, two, newer}) == 3
    reads._write(request, b"x" * 100)
    assert reads._from_folder(Request("s3://bucket/a.jpg", 0, 100, whole=True, version='"v2"')) is None
    assert np.frombuffer(reads._from_folder(request), np.uint8).size == 100
