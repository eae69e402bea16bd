"""The data plane at scale (issue 11): a node's memory with 4 ranks x 1 worker, a rank's start-up at 10M and
100M rows, and how random the keyed shuffles are next to a true shuffle.

``python -m benchmarks dataplane``  (node memory; 4M rows, ``--quick`` 400k)
``python -m benchmarks startup``    (start-up; 10M and 100M rows, ``--quick`` 1M; about 10 GB of disk; ``scale``
                                    measures it too, after indexing and the cache build: ``bench_scale.py``)
``python -m benchmarks shuffle``    (randomness of the plan)

Set ``DALI_ARB_BASELINE_CODE`` to the root of another checkout (e.g. a ``git worktree`` of an earlier
commit) to run the node-memory case on that code too, in the same run, and print the ratio.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import case

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_SHARD = 10_000
CHUNK = 2_000_000


# -- a realistic manifest: img2dataset-style keys, LAION-like captions, shards ----------------------
def _images(folder: Path, count: int = 64) -> tuple[Path, list[tuple[int, int, int, int]]]:
    """One tar of ``count`` small JPEGs of varied aspect; ``(offset, length, height, width)`` of each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    tar_path = folder / "images.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(count):
            aspect = float(np.exp(rng.normal(0, 0.35)))
            h, w = int(300 / np.sqrt(aspect)), int(300 * np.sqrt(aspect))
            pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((w, h)).save(buf, "JPEG", quality=85)
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    members = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            with Image.open(tar.extractfile(member)) as img:
                members.append((member.offset_data, member.size, img.height, img.width))
    return tar_path, members


def _captions(count: int, seed: int) -> pa.Array:
    """LAION-like captions: 3-25 words from a 5,000-word vocabulary (mean about 70 characters)."""
    rng = np.random.default_rng(seed)
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(5000)]
    lengths = rng.integers(3, 26, count)
    words = rng.integers(0, len(vocabulary), int(lengths.sum()))
    flat = pa.array(vocabulary).take(pa.array(words))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), flat)
    return pc.binary_join(lists, " ")


def realistic_manifest(folder: Path, n: int) -> Path:
    """``n`` rows over shards of ``ROWS_PER_SHARD`` (links to one tar of real JPEGs), written in chunks."""
    tar_path, members = _images(folder)
    shards = folder / "shards"
    shards.mkdir()
    for s in range(-(-n // ROWS_PER_SHARD)):
        os.symlink(tar_path, shards / f"{s:05d}.tar")
    table_members = np.array(members, np.int64)  # (64, 4)
    captions = _captions(200_000, seed=1)  # a pool: captions are bytes here, unique or not
    path = folder / "m.parquet"
    from dali_arb.data.manifest import SCHEMA

    with pq.ParquetWriter(path, SCHEMA) as writer:
        for lo in range(0, n, CHUNK):
            rows = np.arange(lo, min(n, lo + CHUNK))
            member = table_members[rows % len(members)]
            keys = pc.utf8_lpad(pa.array(rows).cast(pa.string()), 9, "0")
            sources = pc.binary_join_element_wise(
                str(shards) + "/", pc.utf8_lpad(pa.array(rows // ROWS_PER_SHARD).cast(pa.string()), 5, "0"), ".tar", ""
            )
            pick = np.random.default_rng(lo).integers(0, len(captions), len(rows))
            writer.write_table(
                pa.table(
                    {
                        "key": keys,
                        "width": pa.array(member[:, 3], pa.int32()),
                        "height": pa.array(member[:, 2], pa.int32()),
                        "caption": captions.take(pa.array(pick)),
                        "source": sources,
                        "offset": pa.array(member[:, 0]),
                        "length": pa.array(member[:, 1]),
                        "mtime_ns": pa.nulls(len(rows), pa.int64()),
                    },
                    schema=SCHEMA,
                ),
                row_group_size=256 * 1024,
            )
    return path


# -- a node: 4 ranks x 1 worker, PSS summed over every process ----------------------------------------
RANK_SCRIPT = """
import inspect, json, sys, time
code, manifest, cache, rank, kind = sys.argv[1:6]
sys.path.insert(0, code)
start = time.perf_counter()
from dali_arb import DALIBucketIterator
options = dict(batch_size=16, device="cpu", workers=1, rank=int(rank), world_size=8, dtype="uint8")
parameters = inspect.signature(DALIBucketIterator).parameters
if "cache_dir" in parameters:
    options["cache_dir"] = cache
if "worker_kind" in parameters:
    options["worker_kind"] = kind
loader = DALIBucketIterator(manifest, **options)
batches = iter(loader)
for _ in range(3):
    next(batches)
print(json.dumps({"third_batch_s": time.perf_counter() - start}), flush=True)
sys.stdin.readline()
"""


BARE_RANK_SCRIPT = """
import sys, torch
print("ready", flush=True)
sys.stdin.readline()
"""


def bare_ranks(ranks: int = 4) -> int:
    """Summed PSS of ``ranks`` processes that import torch and nothing else: what the ranks of a PyTorch job hold
    with no data loader at all (the floor the loader's own figure is measured above)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", BARE_RANK_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(ranks)
    ]
    try:
        for child in children:
            child.stdout.readline()
        return sum(_rollup(child.pid)["Pss"] for child in children)
    finally:
        for child in children:
            child.stdin.write("\n")
            child.stdin.flush()
            child.wait(timeout=60)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for path in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(x) for x in path.read_text().split()]
    return found


def _rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name.strip()] = int(rest.split()[0]) * 1024
    return values


def node_memory(code: Path, manifest: Path, cache: Path, ranks: int = 4, kind: str = "thread") -> dict:
    """Start ``ranks`` ranks (world 8) at once, each serving 3 batches with one worker of ``kind`` (``thread`` or
    ``process``; code without worker threads runs its processes); then sum PSS over all their processes."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(code), str(manifest), str(cache), str(r), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=code,
        )
        for r in range(ranks)
    ]
    try:
        times = [json.loads(child.stdout.readline())["third_batch_s"] for child in children]
        pids = [p for child in children for p in _descendants(child.pid)]
        rollups = [_rollup(p) for p in pids]
    finally:
        for child in children:
            with_input = child.stdin
            if with_input:
                with_input.write("\n")
                with_input.flush()
            child.wait(timeout=120)
    return {
        "processes": len(pids),
        "pss": sum(r["Pss"] for r in rollups),
        "anonymous": sum(r.get("Anonymous", 0) for r in rollups),
        "slowest_third_batch_s": max(times),
    }


#: The worker kinds a node is measured with, each in the same run.
KINDS = {"thread": "worker threads", "process": "worker processes"}


@case("dataplane")
def dataplane(args) -> dict:
    n = 400_000 if args.quick else 4_000_000
    codes = {"this checkout": ROOT}
    if os.environ.get("DALI_ARB_BASELINE_CODE"):
        codes["baseline checkout"] = Path(os.environ["DALI_ARB_BASELINE_CODE"]).resolve()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "big").mkdir()
        (tmp / "tiny").mkdir()
        big = realistic_manifest(tmp / "big", n)
        tiny = realistic_manifest(tmp / "tiny", 4096)
        out["manifest rows / Parquet bytes per row"] = f"{n} / {big.stat().st_size / n:.0f}"
        floor = bare_ranks()
        out["4 bare ranks (python + import torch, no loader): summed PSS, GB"] = round(floor / 1e9, 2)
        runs = [(f"this checkout, {words}", ROOT, kind) for kind, words in KINDS.items()]
        if "baseline checkout" in codes:  # its own default
            runs.append(("baseline checkout", codes["baseline checkout"], "process"))
        for i, (label, code, kind) in enumerate(runs):
            cache = tmp / f"cache-{i}"  # each run builds its own (first start) and then uses it
            start = time.perf_counter()
            cold = node_memory(code, big, cache, kind=kind)  # the first start builds the cache (once per node)
            cold_s = time.perf_counter() - start
            warm = node_memory(code, big, cache, kind=kind)
            fixed = node_memory(code, tiny, cache, kind=kind)
            per_row = warm["pss"] / n
            above = (warm["pss"] - fixed["pss"]) / n
            cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            out[f"{label}: summed PSS, {warm['processes']} processes, GB"] = round(warm["pss"] / 1e9, 2)
            out[f"{label}:   B/row, all of it"] = round(per_row)
            out[f"{label}:   B/row above 4 bare torch ranks: the loader's share (goal < 300)"] = round(
                (warm["pss"] - floor) / n
            )
            out[f"{label}:   B/row above a 4k-row run (fixed cost of the processes: {fixed['pss'] / 1e9:.2f} GB)"] = (
                round(above)
            )
            out[f"{label}:   anonymous (unshareable) memory, GB"] = round(warm["anonymous"] / 1e9, 2)
            out[f"{label}:   slowest rank to its 3rd batch, s (cache built / first start)"] = (
                f"{warm['slowest_third_batch_s']:.1f} / {cold['slowest_third_batch_s']:.1f}"
            )
            out[f"{label}:   cache on disk B/row; first start wall s"] = f"{cache_bytes / n:.0f}; {cold_s:.1f}"
            out.setdefault("_pss", {})[label] = warm["pss"]
    pss = out.pop("_pss")
    ours = pss["this checkout, worker threads"]
    out["summed PSS, worker processes / worker threads"] = f"{pss['this checkout, worker processes'] / ours:.2f}x"
    if "baseline checkout" in pss:
        out["summed PSS, baseline (its default) / this checkout"] = f"{pss['baseline checkout'] / ours:.1f}x"
    return out


# -- a rank's start-up at 10M-100M rows (sizes-only manifests) -----------------------------------------
STARTUP_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from pathlib import Path
import numpy as np
from dali_arb import BucketSpec, Manifest, Planner, World
from dali_arb.data.cache import bucket_index
manifest, cache = sys.argv[1:3]
m = Manifest.open(manifest, cache_dir=cache)
index = bucket_index(m, BucketSpec())
planner = Planner(index, batch_size=16, world=World(3, 8), seed=1)
plan = planner.epoch(0)
rows = plan.rows_at(len(plan) // 2)
keys = m.keys_at(rows)
ready = time.perf_counter() - start
t = time.perf_counter()
next_epoch = planner.epoch(1)
new_epoch = time.perf_counter() - t
steps = np.random.default_rng(0).integers(0, len(next_epoch), 200)
t = time.perf_counter()
for step in steps.tolist():
    m.keys_at(next_epoch.rows_at(step))
    next_epoch.size(step)
per_batch = (time.perf_counter() - t) / len(steps)
roll = {}
for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
    name, _, rest = line.partition(":")
    roll[name.strip()] = int(rest.split()[0]) * 1024
print(json.dumps({"ready_s": ready, "new_epoch_s": new_epoch, "batch_ms": per_batch * 1e3, "steps": len(plan),
                  "rss": roll["Rss"], "anonymous": roll["Anonymous"]}))
"""

BUILD_SCRIPT = """
import json, resource, sys, time
start = time.perf_counter()
from dali_arb import BucketSpec, Manifest
from dali_arb.data.cache import bucket_index
m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])
columns = time.perf_counter() - start
bucket_index(m, BucketSpec())
print(json.dumps({"columns_s": columns, "total_s": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def sizes_manifest(path: Path, n: int) -> Path:
    from .bench_planner import sizes

    schema = pa.schema([("key", pa.string()), ("width", pa.int32()), ("height", pa.int32())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, n, CHUNK):
            rows = np.arange(lo, min(n, lo + CHUNK))
            h, w = sizes(len(rows), seed=lo)
            keys = pc.utf8_lpad(pa.array(rows).cast(pa.string()), 9, "0")
            writer.write_table(pa.table({"key": keys, "width": w, "height": h}, schema=schema))
    return path


def _run_json(script: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@case("startup")
def startup(args) -> dict:
    counts = [1_000_000] if args.quick else [10_000_000, 100_000_000]
    out: dict = {}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            manifest = sizes_manifest(tmp / "m.parquet", n)
            build = _run_json(BUILD_SCRIPT, str(manifest), str(tmp / "cache"))
            runs = [_run_json(STARTUP_SCRIPT, str(manifest), str(tmp / "cache")) for _ in range(3)]
            best = min(runs, key=lambda r: r["ready_s"])
            label = f"{n // 1_000_000}M rows"
            cache_bytes = sum(p.stat().st_size for p in (tmp / "cache").rglob("*") if p.is_file())
            out[f"{label}: cache build once per node, s (columns / with bucket index); peak RSS GB"] = (
                f"{build['columns_s']:.1f} / {build['total_s']:.1f}; {build['peak_rss'] / 1e9:.1f}"
            )
            out[f"{label}:   cache on disk, B/row (shared by every process of the node)"] = round(cache_bytes / n, 1)
            out[f"{label}:   rank start-up to its first batch's keys, s (goal < 10)"] = round(best["ready_s"], 2)
            out[f"{label}:   moving to a new epoch, s (goal < 2)"] = round(best["new_epoch_s"], 4)
            out[f"{label}:   any step's rows + keys, ms"] = round(best["batch_ms"], 3)
            out[f"{label}:   rank's anonymous (private) memory, MB (goal < 1000)"] = round(best["anonymous"] / 1e6)
            out[f"{label}:   rank's RSS incl. mapped pages it touched, MB"] = round(best["rss"] / 1e6)
            out.setdefault("_per_row", []).append((n, cache_bytes / n, best["anonymous"]))
    n, per_row, anonymous = out.pop("_per_row")[-1]
    out["extrapolated to 1B rows: cache per node GB; a rank's private memory"] = (
        f"{per_row * 1e9 / 1e9:.0f} GB of files (page cache, shared); private memory stays about "
        f"{anonymous / 1e6:.0f} MB (nothing per row)"
    )
    return out


# -- how random is a keyed shuffle? ------------------------------------------------------------------
def _co_occurrence(first: np.ndarray, second: np.ndarray, group: int) -> float:
    """Pairs of images sharing a batch in both epochs, over the pairs a uniform shuffle would give.
    ``first``, ``second``: ``(n,)`` position of every image in each epoch."""
    n = len(first)
    whole = n // group * group
    a, b = first // group, second // group
    keep = (first < whole) & (second < whole)
    cells = np.bincount(a[keep] * (whole // group) + b[keep], minlength=(whole // group) ** 2)
    pairs = float((cells * (cells - 1) // 2).sum())
    total_pairs = (whole // group) * group * (group - 1) / 2  # pairs sharing a batch in one epoch
    expected = total_pairs * (group - 1) / (whole - 1)
    return pairs / expected


@case("shuffle")
def shuffle(args) -> dict:
    from dali_arb.plan.permute import Permutation, round_keys

    out: dict = {}
    for n, group in ((1_000, 16), (100_000, 16), (1_000_000, 128)):
        rng = np.random.default_rng(7)
        epochs = 4 if args.quick else 10
        feistel, true = [], []
        for e in range(epochs):
            keys = round_keys(np.random.default_rng([3, e]), 2)
            pos_a = Permutation(n, keys[0]).inverse(np.arange(n))  # position of image i in epoch e
            pos_b = Permutation(n, keys[1]).inverse(np.arange(n))
            feistel.append(_co_occurrence(pos_a, pos_b, group))
            true.append(_co_occurrence(np.argsort(rng.permutation(n)), np.argsort(rng.permutation(n)), group))
            if e == 0:
                spearman = float(np.corrcoef(np.arange(n), Permutation(n, keys[0])(np.arange(n)))[0, 1])
        out[f"n={n}, batch {group}: pairs meeting again / uniform expectation, keyed vs np.random"] = (
            f"{np.mean(feistel):.3f} vs {np.mean(true):.3f}"
        )
        out[f"n={n}:   correlation of position and value (uniform: |r| ~ {1 / np.sqrt(n):.4f})"] = round(spearman, 4)
    return out
