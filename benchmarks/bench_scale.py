"""Everything before the loader at scale (issue 22): index img2dataset-style metadata into a manifest in parts, build
the node cache from the parts, group the rows by bucket, then start a rank; each stage a child process of its own,
its peak RSS and rows/s measured there, at two row counts side by side.

``python -m benchmarks scale``                      (10M and 100M rows; about 25 GB of disk and 40 minutes here)
``python -m benchmarks scale --rows 1000000,10000000``
``python -m benchmarks scale --quick``              (1M and 3M rows: a smoke run, not for RESULTS.md)

The figure that must hold: each stage's peak RSS stays within about 10% between the two sizes (memory set by chunk
sizes, not rows). The slopes (disk per row, seconds per row on one core) are extrapolated to 1B rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import case

ROOT = Path(__file__).resolve().parent.parent

#: What each child prints last: seconds, peak RSS (itself and any process it waited for) and what it made. Its own
#: peak is ``VmHWM`` where Linux has it: ``ru_maxrss`` carries over ``exec`` the forked parent's RSS, so it is never
#: below the benchmark's own process.
_MEASURE = """
import json, resource, sys, time
def own_peak():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def report(start, **extra):
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu_s": cpu,
                      "peak_rss": max(own_peak(), kids.ru_maxrss * 1024), **extra}))
"""

#: img2dataset's Parquet output (one row per sample: key, url, caption, status, sizes), made in chunks.
METADATA_SCRIPT = (
    _MEASURE
    + """
import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
start = time.perf_counter()
path, n = sys.argv[1], int(sys.argv[2])
chunk = 1 << 20
words = pa.array("a photo of the red cat on old wooden table in sunny garden with blue sky and tall trees".split())
schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                    ("width", pa.int64()), ("height", pa.int64()), ("original_width", pa.int64()),
                    ("original_height", pa.int64())])
with pq.ParquetWriter(path, schema) as writer:
    for lo in range(0, n, chunk):
        count = min(chunk, n - lo)
        rng = np.random.default_rng(lo)
        rows = pa.array(np.arange(lo, lo + count))
        keys = pc.utf8_lpad(rows.cast(pa.string()), 9, "0")
        picks = [words.take(pa.array(rng.integers(0, len(words), count))) for _ in range(6)]
        caption = pc.binary_join_element_wise(*picks, " ")
        side = rng.integers(256, 2048, (2, count))
        status = np.where(rng.random(count) < 0.01, "failed_to_download", "success")
        table = pa.table({"key": keys, "url": pc.binary_join_element_wise("https://example.com/img/", keys, ".jpg", ""),
                          "caption": caption, "status": status, "width": side[0], "height": side[1],
                          "original_width": side[0] * 2, "original_height": side[1] * 2}, schema=schema)
        writer.write_table(table)
report(start)
"""
)

INDEX_SCRIPT = (
    _MEASURE
    + """
start = time.perf_counter()
from dali_arb.index import build_index
summary = build_index([sys.argv[1]], sys.argv[2] + "/", workers=1, progress=False)
report(start, rows=summary.rows, rejected=summary.rejected)
"""
)

COLUMNS_SCRIPT = (
    _MEASURE
    + """
start = time.perf_counter()
from dali_arb import Manifest
m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])
report(start, rows=len(m))
"""
)

BUCKETS_SCRIPT = (
    _MEASURE
    + """
start = time.perf_counter()
from dali_arb import BucketSpec, Manifest
from dali_arb.data.cache import bucket_index
m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])
opened = time.perf_counter()
index = bucket_index(m, BucketSpec())
report(opened, usable=int(index.starts[-1]))
"""
)


def _child(script: str, *argv: str) -> dict:
    """Run ``script`` in a fresh Python (the worktree first on the path); its last line of JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                          check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure(n: int, folder: Path) -> dict:
    """Every stage at ``n`` rows in ``folder``: ``{stage: figures}`` plus disk use."""
    from .bench_dataplane import STARTUP_SCRIPT

    meta, parts, cache = folder / "meta.parquet", folder / "manifest", folder / "cache"
    stages = {"metadata (made)": _child(METADATA_SCRIPT, str(meta), str(n))}
    stages["index -> parts"] = _child(INDEX_SCRIPT, str(meta), str(parts))
    stages["cache columns"] = _child(COLUMNS_SCRIPT, str(parts), str(cache))
    columns_bytes = _bytes_under(cache)
    stages["bucket index"] = _child(BUCKETS_SCRIPT, str(parts), str(cache))
    start = time.perf_counter()
    started = subprocess.run(
        [sys.executable, "-c", STARTUP_SCRIPT, str(parts), str(cache)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    startup = json.loads(started.stdout.strip().splitlines()[-1])
    startup["seconds"] = time.perf_counter() - start
    return {
        "rows": n,
        "stages": stages,
        "startup": startup,
        "disk": {
            "metadata": _bytes_under(meta),
            "manifest": _bytes_under(parts),
            "cache columns": columns_bytes,
            "cache total": _bytes_under(cache),
        },
    }


@case("scale")
def scale(args) -> dict:
    counts = _counts(args)
    runs = []
    for n in counts:
        with tempfile.TemporaryDirectory(dir=os.environ.get("DALI_ARB_BENCH_DIR")) as tmp:
            runs.append(measure(n, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    return summarize(runs)


def _counts(args) -> list[int]:
    text = getattr(args, "rows", None)
    if text:
        return [int(float(v)) for v in text.split(",")]
    return [1_000_000, 3_000_000] if args.quick else [10_000_000, 100_000_000]


def summarize(runs: list[dict]) -> dict:
    """The table: per stage and size, seconds, rows/s and peak RSS; the RSS ratio of the largest to the smallest
    size; disk per row; the 1B-row extrapolation from the largest run's slopes."""
    out: dict = {}
    small, large = runs[0], runs[-1]
    for stage in large["stages"]:
        for run in runs:
            figures = run["stages"][stage]
            label = f"{stage}, {run['rows'] / 1e6:g}M rows"
            out[f"{label}: s; rows/s; peak RSS MB"] = (
                f"{figures['seconds']:.1f}; {run['rows'] / figures['seconds']:,.0f}; {figures['peak_rss'] / 1e6:,.0f}"
            )
        if len(runs) > 1 and stage != "metadata (made)":
            ratio = large["stages"][stage]["peak_rss"] / small["stages"][stage]["peak_rss"]
            out[f"{stage}: peak RSS {large['rows'] / 1e6:g}M / {small['rows'] / 1e6:g}M rows (goal within 1.10)"] = (
                round(ratio, 3)
            )
    for run in runs:
        out[f"rank start-up to first keys, {run['rows'] / 1e6:g}M rows: s; private MB"] = (
            f"{run['startup']['ready_s']:.2f}; {run['startup']['anonymous'] / 1e6:.0f}"
        )
    n = large["rows"]
    disk = {name: size / n for name, size in large["disk"].items()}
    out["disk per row, B (metadata / manifest in parts / cache columns / cache with bucket index)"] = " / ".join(
        f"{disk[k]:.1f}" for k in ("metadata", "manifest", "cache columns", "cache total")
    )
    per_row = {stage: large["stages"][stage]["cpu_s"] / n for stage in large["stages"] if stage != "metadata (made)"}
    out["CPU per row, µs (index / cache columns / bucket index)"] = " / ".join(
        f"{per_row[k] * 1e6:.2f}" for k in ("index -> parts", "cache columns", "bucket index")
    )
    billion = 1e9
    total_cpu = sum(per_row.values()) * billion
    out["extrapolated to 1B rows"] = (
        f"disk: {disk['metadata'] * billion / 1e9:.0f} GB metadata, {disk['manifest'] * billion / 1e9:.0f} GB "
        f"manifest, {disk['cache total'] * billion / 1e9:.0f} GB node cache; CPU: {total_cpu / 3600:.1f} core-hours "
        f"(index {per_row['index -> parts'] * billion / 3600:.1f}, cache {per_row['cache columns'] * billion / 3600:.1f}"
        f", buckets {per_row['bucket index'] * billion / 3600:.1f}); peak RSS per stage as measured (set by chunks)"
    )
    return out
