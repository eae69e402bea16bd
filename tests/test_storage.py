"""Object storage against real servers on loopback: moto's S3 (its own process), a fault proxy in front of it,
and an HTTP server with ranges. Every dataset served from storage must give the same pixels as the same files
indexed locally."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dali_arb import Manifest
from dali_arb.cli import main
from dali_arb.data.readahead import RemoteReads
from dali_arb.data.storage import Fetcher, IOStats, Request
from dali_arb.index import build_index
from support.loopback import FaultProxy, RangeHTTPServer, moto_s3, put_object

from .conftest import small_loader

BUCKET = "data"


def put(key: str, data: bytes) -> None:
    put_object(BUCKET, key, data)


@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """moto's S3 with the photo dataset under ``photos/``, three tar shards under ``shards/`` and img2dataset-style
    metadata; yields ``(server, local folder, local shards)``."""
    import boto3

    folder = dataset[0]
    root = tmp_path_factory.mktemp("s3src")
    photos = sorted(folder.glob("*.jpg"))
    shards = []
    for s in range(3):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for p in photos[s::3]:
                for f in (p, p.with_suffix(".txt")):
                    tar.add(f, arcname=f.name)
        shards.append(path)
    with moto_s3() as server:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        for f in sorted(folder.iterdir()):
            put(f"photos/{f.name}", f.read_bytes())
        for path in shards:
            put(f"shards/{path.name}", path.read_bytes())
        meta = io.BytesIO()
        pq.write_table(pa.table({"key": ["a", "b"], "width": [300, 200], "height": [200, 300],
                                 "path": ["../photos/img000.jpg", "../photos/img001.jpg"]}), meta)  # fmt: skip
        put("meta/m.parquet", meta.getvalue())
        yield server, folder, shards


def loader(manifest, **kw):
    return small_loader(manifest, **kw)


def same_batches(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["original_size"], y["original_size"])
        n += 1
    return n


@pytest.mark.parametrize(("workers", "kind"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_a_prefix_indexes_like_its_folder_and_serves_the_same_pixels(s3, tmp_path, workers, kind):
    _, folder, _ = s3
    summary = build_index([f"s3://{BUCKET}/photos/"], tmp_path / "remote.parquet", progress=False)
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    remote, local = Manifest.read(tmp_path / "remote.parquet"), Manifest.read(tmp_path / "local.parquet")
    for column in ("key", "width", "height", "caption", "length"):
        assert remote.table.column(column).to_pylist() == local.table.column(column).to_pylist(), column
    assert remote.table.column("source")[0].as_py() == f"s3://{BUCKET}/photos/img000.jpg"
    assert summary.remote_images == 36 and summary.remote_requests == 2 * 36  # a header block and the tail
    it = loader(str(tmp_path / "remote.parquet"), workers=workers, worker_kind=kind, flip=0.5)
    assert same_batches(it, loader(str(tmp_path / "local.parquet"), workers=workers, worker_kind=kind, flip=0.5)) == 9
    stats = it.stats
    assert stats["bytes_served"] == sum(
        os.path.getsize(folder / f"{k}.jpg") for b in loader(str(tmp_path / "local.parquet")) for k in b["ids"]
    )
    assert stats["requests"] >= 1 and stats["retries"] == 0


def test_shards_by_brace_range_and_glob_metadata_and_the_manifest_by_url(s3, tmp_path):
    _, _, shards = s3
    build_index([str(p) for p in shards], tmp_path / "local.parquet", progress=False)
    braces = build_index([f"s3://{BUCKET}/shards/{{00000..00002}}.tar"], tmp_path / "b.parquet", progress=False)
    build_index([f"s3://{BUCKET}/shards/*.tar"], tmp_path / "g.parquet", progress=False)
    assert braces.fetched_objects == 3
    local, b, g = (Manifest.read(tmp_path / n).table.to_pydict() for n in ("local.parquet", "b.parquet", "g.parquet"))
    assert b["key"] == g["key"] == local["key"] and b["offset"] == local["offset"] and b["caption"] == local["caption"]
    assert set(b["source"]) == {f"s3://{BUCKET}/shards/{p.name}" for p in shards}
    assert same_batches(loader(str(tmp_path / "b.parquet")), loader(str(tmp_path / "local.parquet"))) > 0
    put("manifests/b.parquet", (tmp_path / "b.parquet").read_bytes())
    by_url = loader(f"s3://{BUCKET}/manifests/b.parquet")
    assert same_batches(by_url, loader(str(tmp_path / "b.parquet"))) > 0
    build_index([f"s3://{BUCKET}/meta/m.parquet"], tmp_path / "meta.parquet", progress=False)
    sources = Manifest.read(tmp_path / "meta.parquet").table.column("source").to_pylist()
    assert sources == [f"s3://{BUCKET}/photos/img000.jpg", f"s3://{BUCKET}/photos/img001.jpg"]


def test_pairs_in_shards_in_storage_are_served_aligned(s3, tmp_path):
    from PIL import Image, ImageOps

    from dali_arb.data.pairs import PairSpec

    _, folder, _ = s3
    shard = tmp_path / "paired.tar"
    with tarfile.open(shard, "w") as tar:
        for p in sorted(folder.glob("*.jpg"))[:8]:
            depth = io.BytesIO()
            Image.fromarray(255 - np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))).save(depth, "PNG")
            for name, data in ((p.name, p.read_bytes()), (f"{p.stem}.depth.png", depth.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    put("paired/0.tar", shard.read_bytes())
    build_index([f"s3://{BUCKET}/paired/0.tar"], tmp_path / "m.parquet", progress=False, pairs=[PairSpec("depth")])
    m = Manifest.read(tmp_path / "m.parquet")
    assert set(m.table.column("depth.source").to_pylist()) == {f"s3://{BUCKET}/paired/0.tar"}
    for batch in loader(str(tmp_path / "m.parquet"), flip=0.5, workers=1):
        for i in range(len(batch["ids"])):
            diff = (255 - batch["depth"][i].float() - batch["images"][i].float()).abs().mean().item()
            assert diff < 3, f"pair not aligned with its image: mean difference {diff:.1f}"


def test_latency_slowdowns_and_dropped_connections_are_retried_counted_and_change_nothing(s3, tmp_path, monkeypatch):
    server, folder, _ = s3
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    build_index([f"s3://{BUCKET}/photos/"], tmp_path / "remote.parquet", progress=False)
    with FaultProxy(server.port, latency_s=0.01, slow_down=4, drop=3, skip=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.01)
        it = loader(str(tmp_path / "remote.parquet"), flip=0.5)
        assert same_batches(it, loader(str(tmp_path / "local.parquet"), flip=0.5)) == 9
        assert proxy.counts.slowed == 4 and proxy.counts.dropped == 3
    assert it.stats["retries"] >= 7 and it.failed == []


def test_objects_deleted_or_changed_after_indexing_are_replaced(s3, tmp_path):
    import obstore
    from obstore.store import S3Store

    _, folder, _ = s3
    store = S3Store(BUCKET, client_options={"allow_http": True})
    for f in sorted(folder.glob("*"))[:24]:  # 12 photos and captions: 3 whole batches
        obstore.put(store, f"gone/{f.name}", f.read_bytes())
    build_index([f"s3://{BUCKET}/gone/"], tmp_path / "m.parquet", progress=False)
    obstore.delete(store, "gone/img001.jpg")
    obstore.put(store, "gone/img002.jpg", (folder / "img003.jpg").read_bytes())  # another size now
    for workers in (0, 1):
        it = loader(str(tmp_path / "m.parquet"), workers=workers)
        served = [k for batch in it for k in batch["ids"]]
        assert "img001" not in served and "img002" not in served and len(served) == 12
        reasons = it.state_dict()["failed"]
        assert reasons["img001"].startswith("cannot open s3://data/gone/img001.jpg")
        assert "changed since indexing" in reasons["img002"]


def test_http_shards_and_metadata_read_with_ranges(s3, tmp_path):
    _, _, shards = s3
    site = tmp_path / "site"
    site.mkdir()
    for p in shards:
        (site / p.name).write_bytes(p.read_bytes())
    build_index([str(p) for p in shards], tmp_path / "local.parquet", progress=False)
    with RangeHTTPServer(site) as http:
        build_index([f"{http.url}/{p.name}" for p in shards], tmp_path / "http.parquet", progress=False)
        assert Manifest.read(tmp_path / "http.parquet").table.column("source")[0].as_py().startswith(http.url)
        assert (
            same_batches(loader(str(tmp_path / "http.parquet"), workers=1), loader(str(tmp_path / "local.parquet"))) > 0
        )


def test_read_ahead_follows_the_plan_and_a_sample_cache_serves_later_epochs(s3, tmp_path):
    build_index([f"s3://{BUCKET}/photos/"], tmp_path / "m.parquet", progress=False)
    it = loader(str(tmp_path / "m.parquet"), workers=1)
    list(it)
    # the first steps are dispatched before their read-ahead lands (misses); later ones were fetched ahead
    assert it.stats["hits"] >= 12 and it.stats["hits"] + it.stats["misses"] >= 36
    cache = tmp_path / "cache"
    cached = loader(str(tmp_path / "m.parquet"), workers=1, sample_cache=cache, read_ahead=0)
    list(cached)
    first = dict(cached.stats)
    cached.set_epoch(1)
    list(cached)
    second = {k: v - first[k] for k, v in cached.stats.items() if isinstance(v, int)}
    assert first["requests"] >= 36 and second["requests"] == 0 and second["hits"] == 36  # epoch 2 from the cache
    assert len(list(cache.rglob("*"))) > 36


def test_read_ahead_folders_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from dali_arb.data.readahead import READ_AHEAD_PREFIX, remove_stale_read_ahead

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{READ_AHEAD_PREFIX}{gone.stdout.strip()}-abc"
    alive = tmp_path / f"{READ_AHEAD_PREFIX}{os.getppid()}-def"
    other = tmp_path / "someone-elses"
    for folder in (dead, alive, other):
        (folder / "ab").mkdir(parents=True)
        (folder / "ab" / "sample").write_bytes(b"x" * 100)
    assert remove_stale_read_ahead(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_sample_cache_stays_under_its_limit(tmp_path):
    reads = RemoteReads(str(tmp_path), keep=True, limit_bytes=10_000)
    for i in range(30):
        reads._write(Request(f"s3://x/{i}", 0, 1000), b"x" * 1000)
        os.utime(reads._path(Request(f"s3://x/{i}", 0, 1000)), ns=(i * 10**9, i * 10**9))
    reads.evict()
    kept = sorted(int(p.name.split(".")[0] != "") for p in tmp_path.rglob("*") if p.is_file())
    assert 0 < len(kept) <= 9
    assert os.path.exists(reads._path(Request("s3://x/29", 0, 1000)))  # the most recently used stay
    assert not os.path.exists(reads._path(Request("s3://x/0", 0, 1000)))


def test_ranges_of_one_object_are_coalesced_into_one_request(s3):
    stats = IOStats()
    fetcher = Fetcher(stats=stats)
    url = f"s3://{BUCKET}/shards/00000.tar"
    parts = fetcher.fetch([Request(url, 0, 100), Request(url, 200, 300), Request(url, 100, 200)])
    whole = fetcher.fetch([Request(url, 0, 300)])[0]
    assert b"".join([parts[0], parts[2], parts[1]]) == whole and stats.requests == 2
    fetcher.close()


def test_storage_mistakes_are_one_line_each(s3, tmp_path, capsys, monkeypatch):
    def index(*sources) -> str:
        code = main(["index", *sources, "-o", str(tmp_path / "m.parquet"), "-q"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "\n" not in err and "Traceback" not in err, err
        return err

    assert "unsupported URL scheme 'ftp' in ftp://host/x/; use s3://, gs://, https://" in index("ftp://host/x/")
    assert "bucket of s3://nobucket/x/ does not exist" in index("s3://nobucket/x/")
    put("empty/readme.md", b"nothing to see")
    assert "no images under s3://data/empty/ (1 objects listed)" in index(f"s3://{BUCKET}/empty/")
    assert "no object matches s3://data/shards/*.tgz" in index(f"s3://{BUCKET}/shards/*.tgz")
    assert "HTTP cannot list a folder" in index("http://127.0.0.1:9/folder/")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no AWS credentials for s3://data: set AWS_ACCESS_KEY_ID" in index(f"s3://{BUCKET}/photos/")
    code = main(["plan", "s3://data/nothing.parquet", "-b", "2"])
    assert code != 0 and "cannot read manifest s3://data/nothing.parquet" in capsys.readouterr().err


def test_rejected_credentials_and_denied_access_against_a_checking_server(tmp_path, capsys, monkeypatch):
    import boto3

    with moto_s3(auth_after=4):
        iam = boto3.client("iam", region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # a user with no permission at all
        s3client = boto3.client("s3", region_name="us-east-1")
        s3client.create_bucket(Bucket="locked")
        s3client.put_object(Bucket="locked", Key="x/a.jpg", Body=b"\xff\xd8\xff")
        code = main(["index", "s3://locked/x/", "-o", str(tmp_path / "m.parquet"), "-q"])
        assert code != 0 and "credentials rejected for s3://locked/x/" in capsys.readouterr().err
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        code = main(["index", "s3://locked/x/", "-o", str(tmp_path / "m.parquet"), "-q"])
        err = capsys.readouterr().err
        assert code != 0 and "access denied to s3://locked/x/ (403)" in err, err


def test_bench_serves_from_storage_and_refuses_local_peers_in_one_line(s3, tmp_path, capsys):
    build_index([f"s3://{BUCKET}/photos/"], tmp_path / "m.parquet", progress=False)
    assert (
        main(["bench", str(tmp_path / "m.parquet"), "--batches", "2", "--rounds", "1", "--device", "cpu", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["loader"]["images_per_s"] > 0
    for option in ("--baseline", "--quality", "--memory"):
        code = main(["bench", str(tmp_path / "m.parquet"), "--batches", "2", "--device", "cpu", option])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "compare peers that read local files" in err and "\n" not in err, err


def test_index_json_reports_reads_per_image(s3, tmp_path, capsys):
    assert main(["index", f"s3://{BUCKET}/photos/", "-o", str(tmp_path / "m.parquet"), "-q", "--json"]) == 0
    out = capsys.readouterr()
    assert "2.00 requests and" in out.err and json.loads(out.out)["rows"] == 36
    assert np.isfinite(json.loads(out.out)["seconds"])


def test_a_manifest_written_to_storage_serves_like_a_local_one_and_updates_in_place(s3, tmp_path, capsys):
    """`-o s3://...` used to be refused: the manifest had to be copied to storage by hand."""
    import obstore
    from obstore.store import S3Store

    _, folder, _ = s3
    url = f"s3://{BUCKET}/manifests/photos.parquet"
    assert main(["index", str(folder), "-o", url, "-q"]) == 0
    assert f"into {url}" in capsys.readouterr().out
    build_index([str(folder)], tmp_path / "local.parquet", progress=False)
    assert same_batches(loader(url), loader(str(tmp_path / "local.parquet"))) > 0
    store = S3Store(BUCKET, client_options={"allow_http": True})
    assert obstore.head(store, "manifests/photos.parquet.rejects.jsonl")["size"] >= 0
    again = build_index([str(folder)], url, update=True, progress=False)  # the manifest in storage is reused
    assert again.manifest == url and again.reused == again.rows == len(Manifest.read(tmp_path / "local.parquet"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    code = main(["index", str(junk), "-o", f"s3://{BUCKET}/manifests/junk.parquet", "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and f"see s3://{BUCKET}/manifests/junk.parquet.rejects.jsonl" in err, err
    rejects = bytes(obstore.get(store, "manifests/junk.parquet.rejects.jsonl").bytes()).decode()
    assert "a.jpg" in rejects
    code = main(["index", str(folder), "-o", f"s3://{BUCKET}/manifests/photos", "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "name the manifest object, e.g. s3://data/manifests/photos/manifest.parquet" in err, err
    assert "or end it with / for a manifest in parts (s3://data/manifests/photos/)" in err and "\n" not in err
    # issue 22: a trailing slash writes a manifest in parts there (tests/test_parts.py has the rest)
    assert main(["index", str(folder), "-o", f"s3://{BUCKET}/manifests/parts/", "-q"]) == 0
    assert obstore.head(store, "manifests/parts/_manifest.json")["size"] > 0


def test_update_of_a_prefix_reuses_the_rows_of_unchanged_objects(s3, tmp_path):
    """`--update` used to read every image header under a prefix again (2 ranged GETs per image)."""
    from tests.images import save_jpeg

    _, folder, _ = s3
    for f in sorted(folder.iterdir()):
        put(f"again/{f.name}", f.read_bytes())
    out = tmp_path / "m.parquet"
    first = build_index([f"s3://{BUCKET}/again/"], out, progress=False)
    captions = len(list(folder.glob("*.txt")))
    unchanged = build_index([f"s3://{BUCKET}/again/"], out, update=True, progress=False)
    assert unchanged.rows == first.rows and unchanged.reused == first.rows
    assert unchanged.remote_requests == captions  # only the sidecar captions are read again
    changed = tmp_path / "img000.jpg"
    save_jpeg(changed, 96, 64, seed=99)
    put("again/img000.jpg", changed.read_bytes())  # a new object: another size and time
    updated = build_index([f"s3://{BUCKET}/again/"], out, update=True, progress=False)
    assert updated.reused == first.rows - 1
    table = Manifest.read(out).table.to_pydict()
    row = table["key"].index("img000")
    assert (table["width"][row], table["height"][row]) == (96, 64)


def test_pair_folders_in_storage_index_and_serve_like_local_ones(s3, tmp_path, capsys):
    """Folder pairs (`--pair depth=DIR`) used to need local folders when the images were in storage."""
    from PIL import Image, ImageOps

    from dali_arb.data.pairs import PairSpec

    _, folder, _ = s3
    depth = tmp_path / "depth"
    depth.mkdir()
    photos = sorted(folder.glob("*.jpg"))
    for p in photos[1:]:  # the first photo has no pair: rejected, with the reason
        inverted = 255 - np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        Image.fromarray(inverted).save(depth / f"{p.stem}.png")
        put(f"depth/{p.stem}.png", (depth / f"{p.stem}.png").read_bytes())
    remote = build_index([f"s3://{BUCKET}/photos/"], tmp_path / "r.parquet", progress=False,
                         pairs=[PairSpec("depth", "pair", f"s3://{BUCKET}/depth")])  # fmt: skip
    local = build_index(
        [str(folder)], tmp_path / "l.parquet", progress=False, pairs=[PairSpec("depth", "pair", str(depth))]
    )
    assert remote.rows == local.rows == len(photos) - 1 and remote.rejected == local.rejected == 1
    reasons = [json.loads(line)["reason"] for line in open(f"{tmp_path / 'r.parquet'}.rejects.jsonl")]
    assert reasons == [
        f"pair 'depth' missing: no s3://{BUCKET}/depth/{photos[0].stem}.* (an image object) for this sample"
    ]
    table = Manifest.read(tmp_path / "r.parquet").table
    assert set(table.column("depth.source").to_pylist()) == {f"s3://{BUCKET}/depth/{p.stem}.png" for p in photos[1:]}
    served = 0
    for a, b in zip(
        loader(str(tmp_path / "r.parquet"), flip=0.5), loader(str(tmp_path / "l.parquet"), flip=0.5), strict=True
    ):
        assert a["ids"] == b["ids"] and torch.equal(a["images"], b["images"]) and torch.equal(a["depth"], b["depth"])
        served += len(a["ids"])
    assert served > 0
    code = main(
        ["index", str(folder), "-o", str(tmp_path / "x.parquet"), "--pair", f"depth=s3://{BUCKET}/depth/", "-q"]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and "a pair folder in object storage goes with image prefixes in object storage" in err
    code = main(
        ["index", f"s3://{BUCKET}/photos/", "-o", str(tmp_path / "y.parquet"), "--pair", "depth=s3://data/none/", "-q"]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--pair depth=s3://data/none/: no images under that prefix" in err and "\n" not in err
