"""Object storage (issue 12): which library reads samples fastest, and the loader served from S3.

``python -m benchmarks storage_libs``   obstore vs s3fs vs boto3: ranged GETs of samples inside shard objects on a
                                        local S3 (moto, its own process) behind a proxy adding 20 ms per request
``python -m benchmarks storage``        the loader from local disk, from S3 with 20 ms per request (read-ahead
                                        from the plan), and a baseline that fetches each sample when it is needed
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import case

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
    from dali_arb.loopback import FaultProxy, moto_s3

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
