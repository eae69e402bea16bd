"""The ``ray`` indexing engine (``index/engines/ray.py``): the same rows as the local engine, on a real Ray.

Unit tests share one ``ray.init(num_cpus=2)`` session (about 10 s to start here); the slow test starts a head and a
second worker node as separate processes (``ray start``), indexes folders, shards and a moto S3 prefix through it,
and kills a worker mid-job.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.errors import ConfigError, IndexingError
from dali_arb.index import build_index
from dali_arb.index.engines import ray as ray_engine

from .images import jpeg_bytes, save_jpeg

ray = pytest.importorskip("ray")

#: Columns that identify a row, compared between the engines (mtimes and sizes too: the same files are read).
COMPARED = ["key", "width", "height", "caption", "source", "offset", "length", "mtime_ns", "source_size", "etag",
            "original_width", "original_height"]  # fmt: skip


def make_shard(path: Path, samples: list[tuple[str, int, int, str | None]]) -> Path:
    """A webdataset shard of ``(key, width, height, caption)``."""
    with tarfile.open(path, "w") as tar:
        for key, width, height, caption in samples:
            members = [(f"{key}.jpg", jpeg_bytes(width, height, seed=width))]
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_sources(root: Path) -> list[str]:
    """A mixed data set: a folder with a subfolder (more files than one unit holds when GROUPS_PER_UNIT is
    small), two shards, a metadata file, duplicates across sources and within a folder, and bad files."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(12):
        folder = photos / ("sub" if i % 3 == 0 else "")
        save_jpeg(folder / f"img{i:02d}.jpg", 40 + 8 * i, 30 + 5 * i, seed=i)
        if i % 2:
            (folder / f"img{i:02d}.txt").write_text(f"caption {i}")
    (photos / "broken.jpg").write_bytes(b"not a picture")
    (photos / "img01.png").write_bytes(jpeg_bytes(10, 10))  # same key as img01.jpg in its folder: a duplicate
    shards = root / "shards"
    shards.mkdir()
    make_shard(shards / "00000.tar", [(f"s{i}", 50 + i, 70 + i, f"shard caption {i}") for i in range(6)])
    # s0 again (a duplicate across shards) and img04 (the key of a folder image: a duplicate across kinds)
    make_shard(shards / "00001.tar", [("s0", 33, 44, None), ("img04", 64, 48, None), ("t1", 80, 60, "x")])
    meta = root / "meta.parquet"
    pq.write_table(
        pa.table({"key": ["m0", "m1", "s1", "m3"], "width": [100, 0, 120, 64], "height": [80, 50, 90, 64],
                  "caption": ["a", "b", None, "d"], "original_width": [400, 0, 480, None],
                  "original_height": [320, 200, 360, 256]}),
        meta,
    )  # fmt: skip
    return [str(photos), str(shards / "00000.tar"), str(shards / "00001.tar"), str(meta)]


def rows_of(manifest: Path) -> list[tuple]:
    """The :data:`COMPARED` columns of every row, by key (None for a column the manifest has not: original sizes)."""
    table = pq.read_table(manifest)
    columns = [table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in COMPARED]
    return sorted(zip(*columns), key=lambda r: r[0])


def rejects_of(manifest: Path) -> list[tuple]:
    lines = Path(f"{manifest}.rejects.jsonl").read_text().splitlines()
    return sorted((str(r["source"]), r["reason"]) for r in map(json.loads, lines))


def test_ray_engine_writes_the_local_engines_rows_and_rejects(tmp_path, ray_session, monkeypatch) -> None:
    sources = make_sources(tmp_path / "data")
    local = build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
    monkeypatch.setattr("dali_arb.index.units.GROUPS_PER_UNIT", 1)  # the folder walk split into several tasks
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 4)
    monkeypatch.setattr("dali_arb.index.dedupe.PARTITION_BYTES", 200)  # keys over several hash partitions
    on_ray = build_index(sources, tmp_path / "ray.parquet", engine="ray", progress=False)
    assert rows_of(tmp_path / "ray.parquet") == rows_of(tmp_path / "local.parquet")
    assert rejects_of(tmp_path / "ray.parquet") == rejects_of(tmp_path / "local.parquet")
    # the metadata's original sizes, in both (m0 and s1's row of the metadata: s1 is a shard's key first)
    originals = {r[0]: r[-2:] for r in rows_of(tmp_path / "ray.parquet") if r[0].startswith("m")}
    assert originals == {"m0": (400, 320), "m3": (None, None)}
    assert pq.read_schema(tmp_path / "ray.parquet").names == pq.read_schema(tmp_path / "local.parquet").names
    # the order too: the parts are kept in source order, so the first row of a duplicated key is the same one
    assert pq.read_table(tmp_path / "ray.parquet").column("key").to_pylist() == (
        pq.read_table(tmp_path / "local.parquet").column("key").to_pylist()
    )
    for field in ("rows", "rejected", "files_seen", "reject_reasons"):
        assert getattr(on_ray, field) == getattr(local, field), field
    assert on_ray.reject_reasons["duplicate key"] == 3  # s0, img04 across sources; s1 in the metadata
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or partial files left


def test_ray_engine_update_reuses_unchanged_rows_as_the_local_engine_does(tmp_path, ray_session) -> None:
    sources = make_sources(tmp_path / "data")
    done = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        first = build_index(sources, out, engine=engine, progress=False)
        save_jpeg(Path(sources[0]) / "img05.jpg", 90, 90, seed=99)  # one image changed: read again
        os.utime(Path(sources[0]) / "img05.jpg", ns=(1, 1))
        done[engine] = build_index(sources, out, engine=engine, update=True, progress=False)
        assert done[engine].rows == first.rows
    assert rows_of(tmp_path / "ray.parquet") == rows_of(tmp_path / "local.parquet")
    # the folder's 11 unchanged images and the first shard's 6 rows; the second shard lost s0 and img04 to earlier
    # sources (its rejects say so), so its earlier rows lack them and it is read again
    assert done["ray"].reused == done["local"].reused == 11 + 6
    assert ("img05", 90, 90) in [r[:3] for r in rows_of(tmp_path / "ray.parquet")]


def test_ray_engine_writes_a_manifest_in_parts_with_the_local_engines_rows(tmp_path, ray_session) -> None:
    """Each task's part is a part of the manifest (``in_parts``: what ``-o DIR/`` runs once the driver passes it)."""
    from dali_arb.data.manifest import Manifest
    from dali_arb.data.parts import read_index
    from dali_arb.index.driver import _progress_bar
    from dali_arb.index.readers import reader_for

    sources = make_sources(tmp_path / "data")
    build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
    folder = tmp_path / "parts"
    folder.mkdir()
    chosen = [(reader_for(s), s) for s in sources]
    summary = ray_engine.index_on_ray(chosen, folder, sources=sources, max_pixels=10**8, pairs=[], old=None,
                                      workers=None, progress_bar=lambda: _progress_bar(False), address=None,
                                      in_parts=True)  # fmt: skip
    listing = read_index(folder)
    # a part per source, each with its rejects (the duplicates' with the part that lost them)
    assert len(listing.parts) == len(sources) and listing.rows == summary.rows
    assert [p.unit["dropped"] for p in listing.parts] == [0, 0, 2, 1]
    table = Manifest.read(folder).table
    assert table.column("key").to_pylist() == pq.read_table(tmp_path / "local.parquet").column("key").to_pylist()
    local = pq.read_table(tmp_path / "local.parquet")
    assert sorted(zip(*(table.column(c).to_pylist() for c in COMPARED))) == sorted(
        zip(*(local.column(c).to_pylist() for c in COMPARED))
    )
    lines = [json.loads(x) for path in listing.rejects_paths() for x in Path(path).read_text().splitlines()]
    assert sorted((str(r["source"]), r["reason"]) for r in lines) == rejects_of(tmp_path / "local.parquet")
    assert listing.rejected == summary.rejected == len(lines)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no scratch left


def test_o_folder_with_the_ray_engine_writes_a_manifest_in_parts(tmp_path, ray_session) -> None:
    """``-o DIR/`` through ``build_index(engine="ray")`` (the driver hands the engine ``in_parts``): a manifest in
    parts holding the local engine's rows."""
    from dali_arb.data.manifest import Manifest
    from dali_arb.data.parts import is_parts

    sources = make_sources(tmp_path / "data")
    build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
    summary = build_index(sources, f"{tmp_path / 'out'}/", engine="ray", progress=False)
    assert is_parts(tmp_path / "out") and summary.rows == len(Manifest.read(tmp_path / "out"))
    table, local = Manifest.read(tmp_path / "out").table, pq.read_table(tmp_path / "local.parquet")
    assert sorted(zip(*(table.column(c).to_pylist() for c in COMPARED))) == sorted(
        zip(*(local.column(c).to_pylist() for c in COMPARED))
    )


def test_videos_beside_images_index_as_locally(tmp_path, ray_session, monkeypatch) -> None:
    """A unit with videos gets the VIDEO columns; joined with units without, those are null, as locally."""
    pytest.importorskip("av")
    from dali_arb.tools.clips import make_clip

    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    make_clip(data / "clips" / "pan.mp4", fps=24, frames=12, size=(64, 48))
    make_clip(data / "clips" / "vfr.webm", codec="vp9", fps=30, frames=10, size=(48, 48), vfr=True)
    for i in range(5):
        save_jpeg(data / f"img{i}.jpg", 40 + i, 30, seed=i)
    local = build_index([str(data)], tmp_path / "local.parquet", workers=1, progress=False)
    monkeypatch.setattr("dali_arb.index.units.GROUPS_PER_UNIT", 1)
    monkeypatch.setattr("dali_arb.index.folders.FILES_PER_TASK", 2)  # units with and without videos
    on_ray = build_index([str(data)], tmp_path / "ray.parquet", engine="ray", progress=False)
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.schema.names == b.schema.names and "frames" in b.schema.names
    assert a.to_pylist() == b.to_pylist()  # the same rows in the same order, video facts included
    assert (on_ray.rows, on_ray.videos) == (local.rows, local.videos) == (7, 2)


def test_a_bad_source_is_one_error_naming_it(tmp_path, ray_session) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        IndexingError, match=f"no image or video files found in folder {empty} .*give the folder that holds them"
    ):
        build_index([str(empty)], tmp_path / "m.parquet", engine="ray", progress=False)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "width": [1]}), bad)
    with pytest.raises(IndexingError, match=r"lacks column.*height"):
        build_index([str(bad)], tmp_path / "m.parquet", engine="ray", progress=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        save_jpeg(photos / f"{i:02d}.jpg", 20, 20)
    with pytest.raises(IndexingError, match=r"lacks column.*height"):  # other tasks in flight are cancelled
        build_index([str(photos), str(bad)], tmp_path / "m.parquet", engine="ray", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "empty", "photos"]


def test_an_address_where_nothing_answers_is_one_line_at_once(tmp_path) -> None:
    import socket

    save_jpeg(tmp_path / "a.jpg", 20, 20)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(IndexingError, match=rf"^--address 127.0.0.1:{port}: nothing answers there .*ray start --head"):
        build_index([str(tmp_path)], tmp_path.parent / "m.parquet", engine="ray", address=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5


def test_engine_and_address_are_checked() -> None:
    with pytest.raises(ConfigError, match="engine must be one of local, ray, got 'spark'"):
        build_index(["x"], "m.parquet", engine="spark")
    with pytest.raises(ConfigError, match="--address ray://h:10001 names a Ray cluster: give it with --engine ray"):
        build_index(["x"], "m.parquet", address="ray://h:10001")


def test_without_ray_the_engine_says_what_to_install(tmp_path, monkeypatch) -> None:
    save_jpeg(tmp_path / "a.jpg", 20, 20)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(
        IndexingError, match=r"^--engine ray needs Ray, which is not installed: pip install 'dali-arb\[ray\]'$"
    ):
        build_index([str(tmp_path)], tmp_path.parent / f"{tmp_path.name}.parquet", engine="ray", progress=False)


def test_cli_engine_ray_without_ray_is_one_line(tmp_path) -> None:
    save_jpeg(tmp_path / "a.jpg", 20, 20)
    code = "import sys; sys.modules['ray'] = None; from dali_arb.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "index", str(tmp_path), "-o", str(tmp_path.parent / "m.parquet"), "--engine", "ray"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "dali-arb index: error: --engine ray needs Ray, which is not installed: pip install 'dali-arb[ray]'"
    ]


def test_ray_is_imported_only_when_the_engine_runs() -> None:
    code = (
        "import sys, dali_arb, dali_arb.index, dali_arb.index.engines.ray, dali_arb.cli; "
        "dali_arb.cli.build_parser(); print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert result.stdout.strip() == "False"


# -- a cluster of two nodes, as separate processes ------------------------------------------------------------------

DRIVER = """
import json, sys
from dali_arb.index import build_index, dedupe, folders, units
from dali_arb.index.engines import ray as engine
units.GROUPS_PER_UNIT, folders.FILES_PER_TASK, dedupe.PARTITION_BYTES = 1, 4, 200  # many tasks and partitions
address, out, *sources = sys.argv[1:]
summary = build_index(sources, out, engine="ray", address=address, progress=False)
print(json.dumps({"rows": summary.rows, "rejected": summary.rejected, "files": summary.files_seen}))
"""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children of children...)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def ray_cluster(folder: Path, env: dict) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A head and a second worker node on 127.0.0.1 (one CPU each), each a ``ray start --block`` process of ours;
    stopped at the end by signalling those processes (and killing what they leave), never other users' Ray."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    nodes: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> None:
        nodes.append(
            subprocess.Popen(
                [ray_cli, "start", *args, *common], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
            )
        )
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert nodes[-1].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)

    temp = tempfile.mkdtemp(prefix="dali-arb-ray-")  # short: Ray's socket paths must fit 107 bytes
    try:
        start(
            ["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp],
            folder / "head.log",
        )
        start(["--address", f"127.0.0.1:{port}"], folder / "worker.log")
        yield f"127.0.0.1:{port}", nodes
    finally:
        left = [p for node in nodes for p in _descendants(node.pid)]
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_cluster_indexes_folders_shards_and_s3_like_the_local_engine_through_a_killed_worker(tmp_path):
    import boto3

    from support.loopback import moto_s3, put_object

    sources = make_sources(tmp_path / "data")
    # a shard big enough that its task is still running when a worker is killed
    big = make_shard(tmp_path / "data" / "big.tar", [(f"b{i:04d}", 20 + i % 50, 30, None) for i in range(1500)])
    with moto_s3():
        boto3.client("s3").create_bucket(Bucket="bucket")
        for i in range(10):
            put_object("bucket", f"prefix/r{i}.jpg", jpeg_bytes(30 + i, 20, seed=i))
        put_object("bucket", "prefix/img04.jpg", jpeg_bytes(16, 16))  # a key of the folder: a duplicate
        sources += [str(big), "s3://bucket/prefix/"]
        build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RAY_AUTH_MODE": "disabled"}
        with ray_cluster(tmp_path, env) as (address, nodes):
            out = tmp_path / "ray.parquet"
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(out), *sources], env=env,
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
    assert rows_of(out) == rows_of(tmp_path / "local.parquet")  # nothing lost, nothing doubled
    assert rejects_of(out) == rejects_of(tmp_path / "local.parquet")
    assert "will be retried" in stdout + stderr  # (Ray says so)
    assert json.loads(stdout.splitlines()[-1])["rows"] == pq.read_metadata(out).num_rows == 12 + 6 + 1 + 2 + 1500 + 10


@pytest.mark.slow
def test_cli_index_engine_ray_starts_ray_here_and_writes_the_local_rows(tmp_path) -> None:
    sources = make_sources(tmp_path / "data")
    build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "ray.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "dali_arb", "index", *sources, "-o", str(out), "--engine", "ray", "--workers", "2",
         "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == pq.read_metadata(out).num_rows == len(rows_of(tmp_path / "local.parquet"))
    assert rows_of(out) == rows_of(tmp_path / "local.parquet")
    assert result.stderr.strip().splitlines()[-1].startswith(f"indexed {summary['rows']} images into {out}")
