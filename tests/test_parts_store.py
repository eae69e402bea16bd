"""A manifest in parts written to object storage (``-o s3://bucket/prefix/``) by either engine, against moto's S3: the
Ray engine's tasks write their parts straight to the store (``index/engines/ray_store.py``); the rows are those of a
local ``-o DIR/``; the loader and ``dali-arb buckets`` read it back; a store refusing the write stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dali_arb import Manifest
from dali_arb.cli import main
from dali_arb.data.parts import INDEX_NAME, read_index
from dali_arb.data.storage import get_bytes, list_prefix
from dali_arb.errors import IndexingError
from dali_arb.index import build_index
from support.loopback import moto_bucket

from .conftest import small_loader
from .test_ray_index import COMPARED, make_sources

ray = pytest.importorskip("ray")

BUCKET = "out"


@pytest.fixture(scope="module")
def s3():
    with moto_bucket(BUCKET) as server:
        yield server


def rows_of(manifest) -> list[tuple]:
    table = Manifest.read(manifest).table
    return sorted(zip(*(table.column(c).to_pylist() for c in COMPARED)), key=lambda r: r[0])


def rejects_of(manifest: str) -> list[tuple]:
    listing = read_index(manifest)
    lines = []
    for path in listing.rejects_paths():
        text = get_bytes(path) if path.startswith("s3://") else open(path, "rb").read()
        lines += text.decode().splitlines()
    return sorted((str(r["source"]), r["reason"]) for r in map(json.loads, lines))


def objects(prefix: str) -> list[str]:
    return sorted(info.url[len(prefix) :] for info in list_prefix(prefix))


def test_both_engines_write_parts_to_the_store_with_the_rows_of_a_local_folder(s3, ray_session, tmp_path, monkeypatch):
    from dali_arb.index.engines import ray as ray_engine

    sources = make_sources(tmp_path / "data")
    build_index(sources, f"{tmp_path / 'local'}/", workers=1, progress=False)
    build_index(sources, f"s3://{BUCKET}/local/", workers=1, progress=False)
    monkeypatch.setattr(ray_engine, "GROUPS_PER_UNIT", 1)  # the folder walk split into several tasks
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 4)
    monkeypatch.setattr("dali_arb.index.dedupe.PARTITION_BYTES", 200)  # keys over several hash partitions
    from dali_arb.data import storage
    from dali_arb.index.engines import ray_store

    by_driver: list[str] = []  # what this process uploads (the Ray tasks run in their own processes)

    def recorded(path, url, *args, **kwargs):
        by_driver.append(url)
        return storage.objects.upload(path, url, *args, **kwargs)

    monkeypatch.setattr(storage, "upload", recorded)
    monkeypatch.setattr(ray_store, "upload", recorded)
    summary = build_index(sources, f"s3://{BUCKET}/ray/", engine="ray", progress=False)
    monkeypatch.undo()
    # the driver wrote the index and the part of its own rejects (no rows): every other part came from its task
    own = [name for p in read_index(f"s3://{BUCKET}/ray/").parts if not p.rows for name in (p.path, p.rejects)]
    assert sorted(u.rsplit("/", 1)[-1] for u in by_driver) == sorted([INDEX_NAME, *own])
    expected = rows_of(tmp_path / "local")
    assert rows_of(f"s3://{BUCKET}/local/") == expected
    assert rows_of(f"s3://{BUCKET}/ray/") == expected
    assert rejects_of(f"s3://{BUCKET}/ray/") == rejects_of(str(tmp_path / "local"))
    listing = read_index(f"s3://{BUCKET}/ray/")
    assert listing.extra["engine"] == "ray" and len(listing.parts) > 3  # one part per task
    assert summary.manifest == f"s3://{BUCKET}/ray/" and summary.rows == len(expected)
    assert f"listed in s3://{BUCKET}/ray/*.rejects.jsonl" in summary.line()
    # only the parts, their rejects and the index: the tasks' keys and partitions are gone
    names = objects(f"s3://{BUCKET}/ray/")
    assert INDEX_NAME in names and all(n == INDEX_NAME or n.startswith("part-") for n in names)
    assert len(names) == 1 + 2 * len(listing.parts)
    # the loader and `dali-arb buckets` read it back
    assert sorted(k for b in small_loader(f"s3://{BUCKET}/ray/") for k in b["ids"]) == sorted(
        k for b in small_loader(str(tmp_path / "local")) for k in b["ids"]
    )
    assert main(["buckets", f"s3://{BUCKET}/ray/", "-b", "2", "--json", "--cache-dir", str(tmp_path / "c")]) == 0


def test_update_on_ray_rewrites_the_manifest_in_the_store_and_removes_the_old_parts(s3, ray_session, tmp_path):
    sources = make_sources(tmp_path / "data")
    build_index(sources, f"s3://{BUCKET}/upd/", engine="ray", progress=False)
    first = read_index(f"s3://{BUCKET}/upd/")
    (Path(sources[0]) / "img02.jpg").unlink()  # (its folder's part is written again; the others are kept)
    again = build_index(sources, f"s3://{BUCKET}/upd/", engine="ray", update=True, progress=False)
    second = read_index(f"s3://{BUCKET}/upd/")
    assert again.reused > 0 and again.parts_reused > 0 and again.parts_written > 0
    assert rows_of(f"s3://{BUCKET}/upd/") == rows_of_local(sources, tmp_path)
    assert {p.path for p in first.parts} - {p.path for p in second.parts}  # (the folder's and the rejects' parts)
    assert len(objects(f"s3://{BUCKET}/upd/")) == 1 + 2 * len(second.parts)  # the first run's other parts deleted


def test_the_local_engine_writing_again_to_a_prefix_deletes_the_parts_it_no_longer_lists(s3, tmp_path):
    sources = make_sources(tmp_path / "data")
    for update in (False, True, False):
        build_index(sources, f"s3://{BUCKET}/again/", workers=1, update=update, progress=False)
    listing = read_index(f"s3://{BUCKET}/again/")
    assert objects(f"s3://{BUCKET}/again/") == sorted(
        [INDEX_NAME] + [p.path for p in listing.parts] + [p.rejects for p in listing.parts if p.rejects]
    )
    assert rows_of(f"s3://{BUCKET}/again/") == rows_of_local(sources, tmp_path)


def rows_of_local(sources: list[str], tmp_path) -> list[tuple]:
    build_index(sources, tmp_path / "truth.parquet", workers=1, progress=False)
    return rows_of(tmp_path / "truth.parquet")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_store_refusing_the_write_stops_the_run_with_one_line(s3, ray_session, tmp_path, engine, capsys):
    sources = make_sources(tmp_path / "data")
    # said before any source is read (the cluster's or this machine's time is not spent first)
    with pytest.raises(
        IndexingError, match=r"^cannot write the manifest to s3://no-such-bucket/m/: .*NoSuchBucket"
    ) as caught:
        build_index(sources, "s3://no-such-bucket/m/", engine=engine, workers=1, progress=False)
    assert "\n" not in str(caught.value)
    args = ["index", *sources, "-o", "s3://no-such-bucket/m/", "--engine", engine, "-q"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-bucket" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_a_two_node_cluster_writes_its_parts_to_the_store_through_a_killed_worker(tmp_path):
    """A head and a worker node as separate processes (``ray start``), a driver joining them by address: the parts go
    straight from the tasks to moto's S3; a worker killed mid-task is retried and nothing is lost or doubled."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .test_ray_index import DRIVER, _descendants, _title, make_shard, ray_cluster

    sources = make_sources(tmp_path / "data")
    big = make_shard(tmp_path / "data" / "big.tar", [(f"b{i:04d}", 20 + i % 50, 30, None) for i in range(1500)])
    sources.append(str(big))
    with moto_bucket("cluster"):
        build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RAY_AUTH_MODE": "disabled"}
        with ray_cluster(tmp_path, env) as (address, nodes):
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, address, "s3://cluster/m/", *sources], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            killed = None
            while driver.poll() is None and killed is None:
                working = [p for n in nodes for p in _descendants(n.pid) if _title(p).startswith("ray::run_unit")]
                if working:
                    killed = working[0]
                    os.kill(killed, signal.SIGKILL)  # a worker dies mid-task: Ray runs the task again
                time.sleep(0.01)
            stdout, stderr = driver.communicate(timeout=300)
            assert driver.returncode == 0, stderr[-3000:]
        assert killed is not None, "no indexing task was seen running"
        assert rows_of("s3://cluster/m/") == rows_of(tmp_path / "local.parquet")
        listing = read_index("s3://cluster/m/")
        assert len(objects("s3://cluster/m/")) == 1 + 2 * len(listing.parts)  # no scratch, no part twice
        assert json.loads(stdout.splitlines()[-1])["rows"] == listing.rows
