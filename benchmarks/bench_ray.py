"""Indexing on Ray against the local engine, and key de-duplication streamed against the whole-table way.

``ray-index``: one folder of JPEGs plus tar shards of the same images, indexed by the local engine (1 and 2 worker
processes) and by the Ray engine on a fresh local Ray of 1 and then 2 CPUs; the cluster's start is timed apart; the
shards alone by the local engine with 1 and 2 processes (its shards are read side by side); then
``ray-index-meta``: one big img2dataset-style Parquet (2M rows) into a manifest in parts, as one task and split by
row groups into tasks of ``PART_ROWS`` rows, on 1 and 2 Ray CPUs.
``dedupe``: the keys of one Parquet manifest made unique by ``index/dedupe.py`` (streamed, hash-partitioned) and by
the way ``build_index`` did it before (every key, then every row, in memory), each in its own process: seconds and
peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import case
from .bench_index import _make

_RAY_RUN = """
import json, sys, time
t0 = time.perf_counter()
import ray
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
started = time.perf_counter() - t0
from dali_arb.index import build_index
summary = build_index(sys.argv[3:], sys.argv[2], engine="ray", progress=False)
print(json.dumps({"start_s": started, "seconds": summary.seconds, "files": summary.files_seen, "rows": summary.rows}))
"""

_LOCAL_RUN = """
import json, sys
from dali_arb.index import build_index
summary = build_index(sys.argv[3:], sys.argv[2], workers=int(sys.argv[1]), progress=False)
print(json.dumps({"start_s": 0.0, "seconds": summary.seconds, "files": summary.files_seen, "rows": summary.rows}))
"""


_META_RUN = """
import json, sys, time
t0 = time.perf_counter()
cpus, out, part_rows, source = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
from dali_arb.index import build_index, units
units.PART_ROWS = part_rows
started = 0.0
if cpus > 0:  # (0 or -N: the local engine, with 1 or N worker processes)
    import ray
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - t0
runs = [build_index([source], f"{out}{i}/", engine="ray" if cpus > 0 else "local", workers=max(1, -cpus), progress=False)
        for i in range(2)]  # (best of two: the machine is shared; the second finds Ray's workers started)
summary = min(runs, key=lambda s: s.seconds)
print(json.dumps({"start_s": started, "seconds": summary.seconds, "first_s": runs[0].seconds, "rows": summary.rows,
                  "parts": summary.parts_written}))
"""


def _run(code: str, cpus: int, out: Path, sources: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-c", code, str(cpus), str(out), *sources], env=env,
                            capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def _folder_and_shards(tmp: Path, n: int, shards: int) -> tuple[list[str], list[Path]]:
    """A folder of ``n`` JPEGs (:func:`_jpeg_folder`) and the same images again as ``shards`` tar shards (their keys
    are the folder's: duplicates), synced to disk: ``(sources, the folder's files)``."""
    folder, files = _jpeg_folder(tmp, n)
    per_shard = len(files) // shards
    sources = [str(folder)]
    for s in range(shards):
        path = tmp / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for f in files[s * per_shard : (s + 1) * per_shard]:
                tar.add(f, arcname=f"s{s}/{f.name}")
        sources.append(str(path))
    os.sync()
    return sources, files


def _jpeg_folder(tmp: Path, n: int) -> tuple[Path, list[Path]]:
    """``n`` JPEGs made in ``tmp/jpegs`` (in worker processes, 1000 a task): the folder and its files, sorted."""
    folder = tmp / "jpegs"
    folder.mkdir()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make, [(str(folder), s, min(s + 1000, n)) for s in range(0, n, 1000)]))
    return folder, sorted(folder.rglob("*.jpg"))


@case("ray-index")
def ray_index(args) -> dict:
    n = 2000 if args.quick else 20_000
    shards = 4 if args.quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        sources, _ = _folder_and_shards(Path(tmp), n, shards)
        shards_only = {  # (the shards alone: units the local engine now reads side by side, one per process)
            f"local engine, {w} process{'es' if w > 1 else ''}": _run(
                _LOCAL_RUN, w, Path(tmp) / f"s{w}.parquet", sources[1:]
            )
            for w in (1, 2)
        }
        runs = {
            "local engine, 1 process": _run(_LOCAL_RUN, 1, Path(tmp) / "local1.parquet", sources),
            "local engine, 2 processes": _run(_LOCAL_RUN, 2, Path(tmp) / "local.parquet", sources),
            "ray engine, 1 CPU": _run(_RAY_RUN, 1, Path(tmp) / "ray1.parquet", sources),
            "ray engine, 2 CPUs": _run(_RAY_RUN, 2, Path(tmp) / "ray2.parquet", sources),
        }
    base = runs["local engine, 2 processes"]
    out = {f"index {n} JPEGs in a folder + {shards} shards of the same ({base['files']} files)": ""}
    for name, run in runs.items():
        rate = run["files"] / run["seconds"]
        out[f"  {name}: files/s"] = round(rate)
        out[f"  {name}: vs local"] = f"{rate / (base['files'] / base['seconds']):.2f}x"
        if run["start_s"]:
            out[f"  {name}: Ray start (s, not in files/s)"] = round(run["start_s"], 1)
    one, two = runs["ray engine, 1 CPU"], runs["ray engine, 2 CPUs"]
    out["  ray 2 CPUs / 1 CPU"] = f"{one['seconds'] / two['seconds']:.2f}x"
    local1, local2 = runs["local engine, 1 process"], runs["local engine, 2 processes"]
    out["  local 2 processes / 1 process"] = f"{local1['seconds'] / local2['seconds']:.2f}x"
    one, two = shards_only["local engine, 1 process"], shards_only["local engine, 2 processes"]
    out[f"  the {shards} shards alone ({one['files']} files), local engine: files/s, 1 / 2 processes"] = (
        f"{one['files'] / one['seconds']:.0f} / {two['files'] / two['seconds']:.0f} "
        f"({one['seconds'] / two['seconds']:.2f}x)"
    )
    return {**out, **ray_index_meta(args)}


def _metadata(path: Path, n: int, row_group: int) -> None:
    """img2dataset-style metadata of ``n`` rows (key, url, caption, status, sizes) in row groups of ``row_group``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    words = pa.array("a photo of the red cat on old wooden table in sunny garden with blue sky".split())
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                                           ("status", pa.string()), ("width", pa.int64()),
                                           ("height", pa.int64())])) as writer:  # fmt: skip
        for lo in range(0, n, row_group):
            count = min(row_group, n - lo)
            rng = np.random.default_rng(lo)
            keys = pc.utf8_lpad(pa.array(np.arange(lo, lo + count)).cast(pa.string()), 9, "0")
            caption = pc.binary_join_element_wise(
                *[words.take(pa.array(rng.integers(0, len(words), count))) for _ in range(6)], " "
            )
            side = rng.integers(256, 2048, (2, count))
            status = np.where(rng.random(count) < 0.01, "failed_to_download", "success")
            writer.write_table(pa.table({"key": keys, "url": pc.binary_join_element_wise("https://x/", keys, ".jpg", ""),
                                         "caption": caption, "status": status, "width": side[0],
                                         "height": side[1]}), row_group_size=row_group)  # fmt: skip


@case("ray-index-meta")
def ray_index_meta(args) -> dict:
    """One big Parquet metadata file into a manifest in parts: the local engine (1 process; 2, whose split units run
    side by side), Ray with the file as one task, and
    Ray with the file split by row groups into tasks of ``PART_ROWS`` rows, on 1 and 2 CPUs; each indexed twice in
    one process (the best counts: the machine is shared), Ray's start apart."""
    n, group, split = (200_000, 25_000, 50_000) if args.quick else (2_000_000, 250_000, 500_000)
    whole = 1 << 40  # (one unit: the file as one task)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "disabled"}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta.parquet"
        _metadata(meta, n, group)
        for name, cpus, part_rows in (("local engine", 0, split), ("local, 2 processes", -2, split),
                                      ("ray, 1 CPU, one task", 1, whole),
                                      ("ray, 1 CPU, split", 1, split), ("ray, 2 CPUs, one task", 2, whole),
                                      ("ray, 2 CPUs, split", 2, split)):  # fmt: skip
            out = str(Path(tmp) / name.replace(" ", "").replace(",", "-"))
            result = subprocess.run([sys.executable, "-c", _META_RUN, str(cpus), out, str(part_rows), str(meta)],
                                    env=env, capture_output=True, text=True, check=True)  # fmt: skip
            runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
    base = runs["local engine"]
    table = {
        f"index {n} rows of Parquet metadata (row groups of {group}) into parts, split = tasks of {split} rows": ""
    }
    for name, run in runs.items():
        table[f"  {name}: rows/s (best of 2)"] = round(run["rows"] / run["seconds"])
        table[f"  {name}: s, first run / best"] = f"{run['first_s']:.1f} / {run['seconds']:.1f}"
        table[f"  {name}: parts"] = run["parts"]
        table[f"  {name}: vs local"] = f"{base['seconds'] / run['seconds']:.2f}x"
    table["  ray 2 CPUs: split / one task"] = (
        f"{runs['ray, 2 CPUs, one task']['seconds'] / runs['ray, 2 CPUs, split']['seconds']:.2f}x"
    )
    table["  ray split: 2 CPUs / 1 CPU"] = (
        f"{runs['ray, 1 CPU, split']['seconds'] / runs['ray, 2 CPUs, split']['seconds']:.2f}x"
    )
    return table


_DEDUPE_RUN = """
import json, sys, time, shutil, tempfile
from pathlib import Path
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
path, how = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if how == "whole":  # build_index before dedupe.py: every key, then every row
    table = pq.read_table(path)
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by("key").aggregate([("_row", "min")]).column("_row_min")
    mask = pc.is_in(indexed.column("_row"), first)
    dropped = table.num_rows - pc.sum(mask).as_py()
    pq.write_table(table.filter(mask), path, row_group_size=65536)
else:
    from dali_arb.index.dedupe import deduplicate
    scratch = Path(tempfile.mkdtemp(dir=path.parent))
    dropped = deduplicate([path], scratch, rejects=lambda r: None, partition_bytes=int(how)).dropped
    shutil.rmtree(scratch)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # (ru_maxrss outlives exec)
print(json.dumps({"seconds": time.perf_counter() - t0, "dropped": dropped, "rss_mb": hwm / 1024}))
"""


def _dedupe(path: Path, how: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", _DEDUPE_RUN, str(path), how], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    return json.loads(result.stdout)


@case("dedupe")
def dedupe(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 1_000_000 if args.quick else 10_000_000
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "m.parquet"
        rng = np.random.default_rng(0)
        with pq.ParquetWriter(source, pa.schema([("key", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                                                 ("caption", pa.string()), ("source", pa.string())])) as writer:  # fmt: skip
            for start in range(0, n, 1_000_000):
                m = min(1_000_000, n - start)
                ids = np.arange(start, start + m)
                keys = [f"laion/{i:010d}" for i in ids]
                dup = rng.random(m) < 0.01  # 1% of rows repeat an earlier key
                keys = [f"laion/{int(rng.integers(0, start + m)):010d}" if d else k for k, d in zip(keys, dup)]
                writer.write_table(pa.table({"key": keys, "width": np.full(m, 512, np.int32),
                                             "height": np.full(m, 768, np.int32),
                                             "caption": [f"a photo of thing {i}" for i in ids],
                                             "source": [f"/data/shard-{i // 10000:05d}.tar" for i in ids]}))  # fmt: skip
        for name, how in (("whole table (before)", "whole"), ("dedupe.py, 256 MiB partitions", str(256 << 20)),
                          ("dedupe.py, 32 MiB partitions", str(32 << 20))):  # fmt: skip
            copy = Path(tmp) / f"{how}.parquet"
            copy.write_bytes(source.read_bytes())
            run = _dedupe(copy, how)
            out[f"{n} rows, {name}: s"] = round(run["seconds"], 1)
            out[f"{n} rows, {name}: peak RSS MB"] = round(run["rss_mb"])
            out[f"{n} rows, {name}: dropped"] = run["dropped"]
            copy.unlink()
    return out


@case("shards-meta")
def shards_meta(args) -> dict:
    """Tar shards indexed with img2dataset's per-shard Parquet beside them (headers only) against without it (every
    image's header read from the tar), local engine, same shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from dali_arb.index import build_index

    n, shards = (2000, 2) if args.quick else (10_000, 5)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, files = _jpeg_folder(Path(tmp), n)
        per = len(files) // shards
        paths = []
        for s in range(shards):
            path = Path(tmp) / "shards" / f"{s:05d}.tar"
            path.parent.mkdir(exist_ok=True)
            keys, widths, heights = [], [], []
            with tarfile.open(path, "w") as tar:
                for f in files[s * per : (s + 1) * per]:
                    tar.add(f, arcname=f.name)
                    with Image.open(f) as img:
                        widths.append(img.width)
                        heights.append(img.height)
                    keys.append(f.stem)
            pq.write_table(pa.table({"key": keys, "width": widths, "height": heights,
                                     "status": ["success"] * len(keys)}), path.with_suffix(".hidden"))  # fmt: skip
            paths.append(str(path))
        os.sync()
        without = build_index(paths, Path(tmp) / "a.parquet", workers=2, progress=False)
        for p in paths:
            Path(p).with_suffix(".hidden").rename(Path(p).with_suffix(".parquet"))
        with_meta = build_index(paths, Path(tmp) / "b.parquet", workers=2, progress=False)
        same = pq.read_table(Path(tmp) / "a.parquet").equals(pq.read_table(Path(tmp) / "b.parquet"))
    out[f"{shards} shards x {per} JPEGs, local engine: files/s reading every image header"] = round(without.files_per_s)
    out["  with img2dataset's Parquet beside them (tar headers only): files/s"] = round(with_meta.files_per_s)
    out["  ratio"] = f"{with_meta.files_per_s / without.files_per_s:.2f}x"
    out["  the same manifest"] = same
    return {**out, **_shards_in_s3(args)}


def _shards_in_s3(args) -> dict:
    """``build_index`` of shards in S3 (moto on loopback): the same shards with img2dataset's Parquet beside them
    (header walk, or one GET where the images are small: ``remote.WALK_MIN_STRIDE``) against alone (fetched whole,
    every image header read), per shard: requests, MB read, seconds; local engine, 2 processes."""
    import time

    import boto3
    import pyarrow.parquet as pq

    from dali_arb.index import build_index
    from support.loopback import FaultProxy, moto_s3, put_object

    shards = 2 if args.quick else 4
    out: dict = {}
    with moto_s3() as server, FaultProxy(server.port, latency_s=0.0) as proxy:
        boto3.client("s3").create_bucket(Bucket="bench")
        for image_bytes, samples in ((16 << 10, 200), (256 << 10, 50)):  # (shards of 3 and 13 MB: see above)
            kb = image_bytes >> 10
            for s in range(shards):
                shard, meta = _img2dataset_tar(samples, image_bytes, seed=kb * 100 + s, jpeg=True)
                for folder in ("with", "without"):
                    put_object("bench", f"{kb}k/{folder}/{s:05d}.tar", shard)
                put_object("bench", f"{kb}k/with/{s:05d}.parquet", meta)
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            rows = {}
            for folder in ("without", "with"):
                with tempfile.TemporaryDirectory() as tmp:
                    requests = proxy.counts.requests
                    started = time.perf_counter()
                    summary = build_index([f"s3://bench/{kb}k/{folder}/{{00000..{shards - 1:05d}}}.tar"],
                                          Path(tmp) / "m.parquet", workers=2, progress=False)  # fmt: skip
                    seconds = time.perf_counter() - started
                    columns = ["key", "width", "height", "caption", "offset", "length"]
                    rows[folder] = pq.read_table(Path(tmp) / "m.parquet", columns=columns)
                read = summary.fetched_bytes + summary.shard_walk_bytes
                how = "Parquet beside" if folder == "with" else "shard alone (whole fetch)"
                out[f"S3, {shards} shards x {samples} samples of ~{kb} KB, {how}: requests/shard, MB/shard, s"] = (
                    round((proxy.counts.requests - requests) / shards, 1), round(read / shards / 1e6, 2),
                    round(seconds, 2), f"{summary.shard_walks} walked",
                )  # fmt: skip
            out[f"  ~{kb} KB: the same rows (key, size, caption, offset, length)"] = rows["with"].equals(
                rows["without"]
            )
    return out


def _noise_jpeg(rng, image_bytes: int) -> tuple[bytes, int, int]:
    """A JPEG of noise of about ``image_bytes`` (quality 95: about 1.65 bytes a pixel), its width and height."""
    import io

    from PIL import Image

    height = max(8, int((image_bytes / 1.65 * 3 / 4) ** 0.5))
    width = height * 4 // 3
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), "uint8")).save(out, "JPEG", quality=95)
    return out.getvalue(), width, height


def _img2dataset_tar(samples: int, image_bytes: int, seed: int, *, jpeg: bool = False) -> tuple[bytes, bytes]:
    """A shard laid out as img2dataset writes it (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) and its Parquet (key, width,
    height, caption, status). ``KEY.jpg``: about ``image_bytes`` of random bytes (with the Parquet no image is decoded),
    or with ``jpeg`` a JPEG of noise of about that size (a shard that can be read without its Parquet too)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    keys = [f"{seed:05d}{i:04d}" for i in range(samples)]
    widths, heights = [512] * samples, [384] * samples
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, key in enumerate(keys):
            size = int(image_bytes * rng.uniform(0.5, 1.5))
            if jpeg:
                image, widths[i], heights[i] = _noise_jpeg(rng, size)
            else:
                image = rng.bytes(size)
            caption = f"a photo of thing {key}".encode()
            meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                               "caption": caption.decode(), "width": 512, "height": 384,
                               "exif": "{}" * 200}).encode()  # fmt: skip
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = pa.table({"key": keys, "width": widths, "height": heights,
                      "caption": [f"a photo of thing {k}" for k in keys], "status": ["success"] * samples})  # fmt: skip
    meta = io.BytesIO()
    pq.write_table(table, meta)
    return out.getvalue(), meta.getvalue()


def _walk_once(url: str, window: int | None) -> dict:
    """One shard indexed in this process: header walk with ``window`` bytes a request, or (None) the whole-fetch
    path (one streaming GET, then the local header walk with the Parquet beside it): rows, requests, bytes, seconds."""
    import time

    from dali_arb.data.storage import IOStats, download, head
    from dali_arb.index import remote
    from dali_arb.index.remote import remote_shard_task
    from dali_arb.index.shards import shard_task

    started = time.perf_counter()
    info = head(url)
    if window is not None:
        kept, remote.WALK_MIN_STRIDE = remote.WALK_MIN_STRIDE, 0  # (walked whatever the images' size)
        try:
            rows, _, io, walked = remote_shard_task((info, 10**9, window))
        finally:
            remote.WALK_MIN_STRIDE = kept
        assert walked
        return {"rows": rows, "requests": io["requests"] + 1, "bytes": io["bytes_read"],
                "seconds": time.perf_counter() - started}  # fmt: skip
    stats = IOStats()
    with tempfile.TemporaryDirectory() as tmp:
        download(url, f"{tmp}/s.tar", stats)
        download(url.rsplit(".", 1)[0] + ".parquet", f"{tmp}/s.parquet", stats)
        rows, _ = shard_task((f"{tmp}/s.tar", 10**9, [], f"{tmp}/s.parquet"))
    taken = stats.take()
    return {"rows": rows, "requests": taken["requests"] + 1, "bytes": taken["bytes_read"],
            "seconds": time.perf_counter() - started}  # fmt: skip


@case("shards-meta-s3")
def shards_meta_s3(args) -> dict:
    """Shards in S3 (moto's server on loopback) with img2dataset's Parquet beside them: the whole fetch (one streaming
    GET, then the headers read locally) against the header walk with ranged GETs of several window sizes, per shard:
    requests, bytes (and their share of the shard), seconds; directly and through a proxy adding 20 ms per request
    (a store's first-byte latency). Images: random bytes of about 16, 64 and 256 KB (img2dataset at 256, 512 and
    1024 px), each with a ``.txt`` and a ``.json`` member as img2dataset writes them."""
    import boto3

    from support.loopback import FaultProxy, moto_s3, put_object

    windows = [4 << 10, 8 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
    # samples per shard by image size: shards of 3-13 MB (moto reads a whole object for each ranged GET, so its time
    # per request grows with the object: 6 ms at 16 MB, 60 ms at 64 MB; a real store's does not)
    profiles = {16 << 10: 200, 64 << 10: 100, 256 << 10: 50}
    if args.quick:
        profiles = {size: n // 2 for size, n in profiles.items()}
    out: dict = {}
    with moto_s3() as server:
        boto3.client("s3").create_bucket(Bucket="bench")
        for image_bytes, samples in profiles.items():
            shard, meta = _img2dataset_tar(samples, image_bytes, seed=image_bytes >> 10)
            put_object("bench", f"{image_bytes >> 10}k/00000.tar", shard)
            put_object("bench", f"{image_bytes >> 10}k/00000.parquet", meta)
        for latency in (0.0, 0.02):
            with FaultProxy(server.port, latency_s=latency) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                for image_bytes, samples in profiles.items():
                    url = f"s3://bench/{image_bytes >> 10}k/00000.tar"
                    whole = _walk_once(url, None)
                    size = whole["bytes"]
                    head = f"{samples} samples of ~{image_bytes >> 10} KB images, +{latency * 1000:.0f} ms/request"
                    out[f"{head}: whole fetch: requests, MB, s"] = (whole["requests"], round(size / 1e6, 1),
                                                                   round(whole["seconds"], 2))  # fmt: skip
                    for window in windows:
                        walk = _walk_once(url, window)
                        same = [(r.key, r.offset, r.length) for r in walk["rows"]] == [
                            (r.key, r.offset, r.length) for r in whole["rows"]
                        ]
                        out[f"  {head}: walk, {window >> 10} KiB windows: requests, MB, % of bytes, s, same"] = (
                            walk["requests"], round(walk["bytes"] / 1e6, 2), round(100 * walk["bytes"] / size, 1),
                            round(walk["seconds"], 2), same,
                        )  # fmt: skip
    return out


@case("update-parts")
def update_parts(args) -> dict:
    """``dali-arb index SOURCES -o DIR/ --update`` (local engine, 2 processes) on a folder of JPEGs and tar shards of
    the same images (other keys): a fresh index, an update with nothing changed (every part kept), an update with one
    image changed (its folder slice written again), against the same updates into one manifest file (every row
    written again, unchanged files' sizes reused)."""
    from dali_arb.index import build_index

    n, shards = (1000, 4) if args.quick else (8000, 8)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources, files = _folder_and_shards(Path(tmp), n, shards)
        runs = {}
        for name, target in (
            ("manifest in parts (-o DIR/)", f"{tmp}/parts/"),
            ("one file (-o m.parquet)", f"{tmp}/m.parquet"),
        ):
            fresh = build_index(sources, target, workers=2, progress=False)
            same = build_index(sources, target, workers=2, update=True, progress=False)
            files[len(files) // 2].write_bytes(files[0].read_bytes())  # one image changed
            one = build_index(sources, target, workers=2, update=True, progress=False)
            files[len(files) // 2].write_bytes(files[1].read_bytes())  # (and back, for the next way)
            runs[name] = (fresh, same, one)
    out[f"index {n} JPEGs in a folder + {shards} shards of the same ({2 * n} files), local engine, 2 processes"] = ""
    for name, (fresh, same, one) in runs.items():
        out[f"  {name}: fresh index, s"] = round(fresh.seconds, 2)
        out[f"  {name}: --update, nothing changed, s"] = round(same.seconds, 2)
        out[f"  {name}: --update, one image changed, s"] = round(one.seconds, 2)
        if same.parts_reused:
            out[f"  {name}: parts kept / written (nothing changed)"] = f"{same.parts_reused} / {same.parts_written}"
            out[f"  {name}: parts kept / written (one image)"] = f"{one.parts_reused} / {one.parts_written}"
    parts, single = runs["manifest in parts (-o DIR/)"], runs["one file (-o m.parquet)"]
    out["  --update, nothing changed: parts vs file"] = f"{single[1].seconds / parts[1].seconds:.2f}x"
    out["  --update, one image changed: parts vs file"] = f"{single[2].seconds / parts[2].seconds:.2f}x"
    return out
