"""Object storage (issue 12): which library reads samples fastest, and the loader served from S3.

``python -m benchmarks storage_libs``   obstore vs s3fs vs boto3: ranged GETs of samples inside shard objects on a
                                        local S3 (moto, its own process) behind a proxy adding 20 ms per request
``python -m benchmarks storage``        the loader from local disk, from S3 with 20 ms per request (read-ahead
                                        from the plan), and a baseline that fetches each sample when it is needed
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import case, photo_manifest

BUCKET = "bench"
LATENCY_S = 0.02


def _shards(count: int = 4, size: int = 16 << 20) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {f"shards/{i:05d}.tar": rng.integers(0, 255, size, dtype=np.uint8).tobytes() for i in range(count)}


def _upload(objects: dict[str, bytes]) -> None:
    import boto3
    import obstore
    from obstore.store import S3Store

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    store = S3Store(BUCKET, client_options={"allow_http": True})
    for key, data in objects.items():
        obstore.put(store, key, data)


def _requests(objects: dict[str, bytes], n: int, seed: int = 1) -> list[tuple[str, int, int]]:
    """``n`` sample-like ranges (100-400 KB) at random places in the shards: ``(key, start, end)``."""
    rng = np.random.default_rng(seed)
    keys = sorted(objects)
    out = []
    for _ in range(n):
        key = keys[int(rng.integers(len(keys)))]
        length = int(rng.integers(100_000, 400_000))
        start = int(rng.integers(0, len(objects[key]) - length))
        out.append((key, start, start + length))
    return out


def read_obstore(requests, concurrency: int) -> int:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, client_options={"allow_http": True})

    async def run() -> int:
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str, start: int, end: int) -> int:
            async with gate:
                return len(await obstore.get_range_async(store, key, start=start, end=end))

        return sum(await asyncio.gather(*(one(*r) for r in requests)))

    return asyncio.run(run())


def read_s3fs(requests, concurrency: int) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    paths = [f"{BUCKET}/{key}" for key, _, _ in requests]
    starts = [s for _, s, _ in requests]
    ends = [e for _, _, e in requests]
    return sum(len(b) for b in fs.cat_ranges(paths, starts, ends, batch_size=concurrency))


def read_boto3(requests, concurrency: int) -> int:
    import boto3

    client = boto3.client("s3", config=__import__("botocore.config").config.Config(max_pool_connections=concurrency))

    def one(r) -> int:
        key, start, end = r
        return len(client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end - 1}")["Body"].read())

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, requests))


LIBRARIES = {"obstore": read_obstore, "s3fs": read_s3fs, "boto3": read_boto3}


@case("storage_libs")
def storage_libs(args) -> dict:
    from support.loopback import FaultProxy, moto_s3

    n = 128 if args.quick else 512
    concurrency = 32
    objects = _shards()
    requests = _requests(objects, n)
    expected = sum(e - s for _, s, e in requests)
    out: dict = {}
    with moto_s3() as s3:
        _upload(objects)
        with FaultProxy(s3.port, latency_s=LATENCY_S) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            timings: dict[str, list[tuple[float, float]]] = {name: [] for name in LIBRARIES}
            for _ in range(3):  # alternating rounds, median
                for name, read in LIBRARIES.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    got = read(requests, concurrency)
                    timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                    assert got == expected, f"{name} read {got} bytes, expected {expected}"
    out[
        f"{n} ranged GETs of 100-400 KB in 16 MB shard objects, {LATENCY_S * 1000:.0f} ms per request, {concurrency} in flight"
    ] = f"{expected / 1e6:.0f} MB"
    for name, runs in timings.items():
        wall, cpu = sorted(runs)[len(runs) // 2]
        out[f"  {name}: requests/s, MB/s, client CPU ms per request"] = (
            f"{n / wall:.0f}, {expected / wall / 1e6:.0f}, {1000 * cpu / n:.2f}"
        )
    return out


@case("storage")
def storage(args) -> dict:
    """The loader on the same JPEGs and plan from local disk, from S3 with 20 ms per request (reading ahead from
    the plan), and from S3 fetching each sample when it is needed (``read_ahead=0``); alternating rounds."""
    import boto3
    import obstore
    from obstore.store import S3Store

    from dali_arb import DALIBucketIterator
    from dali_arb.index import build_index
    from dali_arb.tools.bench import _summary, _time
    from support.loopback import FaultProxy, moto_s3

    count = args.images or (64 if args.quick else 256)
    batches = 6 if args.quick else 24
    out: dict = {}
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=1) as manifest, moto_s3() as s3:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        store = S3Store(BUCKET, client_options={"allow_http": True})
        photos = sorted((manifest.parent / "photos").glob("*.jpg"))
        for p in photos:
            obstore.put(store, f"photos/{p.name}", p.read_bytes())
        with tempfile.TemporaryDirectory() as tmp:
            remote_manifest = Path(tmp) / "s3.parquet"
            build_index([f"s3://{BUCKET}/photos/"], remote_manifest, progress=False)
            with FaultProxy(s3.port, latency_s=LATENCY_S) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                options = {"batch_size": 8, "device": "cpu", "crop": "center", "rank": 0, "world_size": 1}
                loaders = {
                    "local disk": DALIBucketIterator(str(manifest), **options),
                    "S3 +20 ms, read-ahead from the plan": DALIBucketIterator(str(remote_manifest), **options),
                    "S3 +20 ms, each sample fetched when needed": DALIBucketIterator(
                        str(remote_manifest), read_ahead=0, **options
                    ),
                }

                def cycle(it):
                    while True:
                        yield from it

                streams = {name: cycle(it) for name, it in loaders.items()}
                for stream in streams.values():
                    for _ in range(3):
                        next(stream)
                runs: dict[str, list] = {name: [] for name in streams}
                server_cpu: dict[str, float] = dict.fromkeys(streams, 0.0)  # moto + the proxy, per loader
                for _ in range(3):
                    for name, stream in streams.items():
                        before = s3.cpu_seconds() + proxy.cpu_seconds()
                        runs[name].append(_time(stream, batches, lambda b: int(b["images"].numel() // 3)))
                        server_cpu[name] += s3.cpu_seconds() + proxy.cpu_seconds() - before
    local_rate = _summary(runs["local disk"], 8)["images_per_s"]
    out[f"{count} JPEGs {args.min_mp:g}-{args.max_mp:g} MP, batch 8, CPU decoder, {os.cpu_count()} cores"] = (
        "moto S3 on loopback (its own process, same cores) behind a proxy adding 20 ms per request"
    )
    for name, it in loaders.items():
        r = _summary(runs[name], 8)
        out[f"  {name}: images/s (p50/p99 ms)"] = f"{r['images_per_s']} ({r['batch_ms_p50']}/{r['batch_ms_p99']})"
        out[f"  {name}: share of local disk"] = f"{100 * r['images_per_s'] / local_rate:.0f}%"
        if name != "local disk":
            images = sum(len(run["latencies"]) for run in runs[name]) * 8
            seconds = sum(run["seconds"] for run in runs[name])
            out[f"  {name}: the local S3 server and proxy used, CPU ms per image (share of the cores)"] = (
                f"{1000 * server_cpu[name] / images:.1f} ({100 * server_cpu[name] / seconds / (os.cpu_count() or 1):.0f}%)"
            )
            s = it.stats
            out[f"  {name}: requests per sample, bytes read per byte served, retries"] = (
                f"{s['requests_per_sample']}, {s['bytes_read_per_byte_served']}, {s['retries']}"
            )
    return out
