"""Planner at scale: `dali-arb plan` as a whole process vs the per-image reference; 10M rows in process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import case

NOVELAI_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from benchmarks.novelai import BucketManager
bm = BucketManager(sys.argv[1], bsz=16, world_size=8, global_rank=0)
out = sys.stdout
for step, (ids, (w, h)) in enumerate(bm.generator()):
    out.write(json.dumps({"step": step, "width": int(w), "height": int(h), "ids": [f"{i:09d}" for i in ids]}) + "\\n")
"""

REFERENCE_SCRIPT = """
import json, sys
from dali_arb import BucketSpec, Manifest
from support.reference import reference_plan
m = Manifest.read(sys.argv[1], columns=[])
keys = m.keys.to_pylist()
a = BucketSpec().assign(m.heights, m.widths)
rows, buckets = reference_plan(a, batch_size=16, world_size=8, rank=0, seed=0, epoch=0)
out = sys.stdout
for step, (batch, b) in enumerate(zip(rows, buckets)):
    h, w = a.sizes[b]
    out.write(json.dumps({"step": step, "width": int(w), "height": int(h), "ids": [keys[r] for r in batch]}) + "\\n")
"""


def sizes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like size mix: log-normal aspect ratios around 1, 0.5-4 megapixels."""
    rng = np.random.default_rng(seed)
    aspect = np.exp(rng.normal(0, 0.4, n))
    area = rng.uniform(0.5e6, 4e6, n)
    return np.sqrt(area / aspect).astype(np.int32), np.sqrt(area * aspect).astype(np.int32)


def timed(cmd: list[str], out: Path) -> float:
    start = time.perf_counter()
    with open(out, "wb") as fh:
        subprocess.run(cmd, stdout=fh, check=True)
    return time.perf_counter() - start


@case("planner")
def planner(args) -> dict:
    n = 200_000 if args.quick else 2_000_000
    big = 1_000_000 if args.quick else 10_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        h, w = sizes(n)
        manifest = tmp / "m.parquet"
        pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(n)], "width": w, "height": h}), manifest)
        ours = [sys.executable, "-m", "dali_arb", "plan", str(manifest), "-b", "16", "--world-size", "8"]
        ref = [sys.executable, "-c", REFERENCE_SCRIPT, str(manifest)]
        t_ours = min(timed(ours, tmp / "ours.jsonl") for _ in range(3))
        t_ref = timed(ref, tmp / "ref.jsonl")
        import pickle

        with open(tmp / "sizes.pkl", "wb") as fh:
            pickle.dump({i: (int(a), int(b)) for i, (a, b) in enumerate(zip(w, h))}, fh)
        root = str(Path(__file__).resolve().parent.parent)
        t_novelai = timed([sys.executable, "-c", NOVELAI_SCRIPT, str(tmp / "sizes.pkl"), root], tmp / "novelai.jsonl")
        same = (tmp / "ours.jsonl").read_bytes().replace(b" ", b"") == (tmp / "ref.jsonl").read_bytes().replace(
            b" ", b""
        )
    from dali_arb import BucketSpec, Planner, World

    h, w = sizes(big, seed=1)
    start = time.perf_counter()
    assignment = BucketSpec().assign(h, w)
    t_assign = time.perf_counter() - start
    planner = Planner(assignment, batch_size=16, world=World(0, 8))
    tracemalloc.start()
    start = time.perf_counter()
    plan = planner.epoch(0)
    t_plan = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        f"plan process, {n} rows, rank 0/8, batch 16: ours s": round(t_ours, 3),
        "  NovelAI BucketManager process (pickle to last batch) s": round(t_novelai, 3),
        "  speed-up vs NovelAI (goal >= 10x)": f"{t_novelai / t_ours:.1f}x",
        "  per-image reference process (the test oracle) s": round(t_ref, 3),
        "  speed-up vs reference": f"{t_ref / t_ours:.1f}x",
        "  identical output to the reference": same,
        f"in-process plan, {big} rows, one rank+epoch s (goal < 1)": round(t_plan, 3),
        "  peak extra memory B/row (goal < 64)": round(peak / big, 1),
        "  steps": len(plan),
        f"  bucket assignment of {big} rows s (once per manifest)": round(t_assign, 3),
    }


@case("planner-budget")
def planner_budget(args) -> dict:
    """Plan time for fixed batches (16) vs a pixel budget (16 x 512 x 512 per rank) on 1M photo-like rows, rank 0
    of 8, each leftover policy: side by side with the ratio, the steps and the batch sizes the budget gives."""
    from dali_arb import BucketSpec, Planner, World
    from dali_arb.plan.batching import BatchSizing

    n = 200_000 if args.quick else 1_000_000
    h, w = sizes(n, seed=2)
    assignment = BucketSpec().assign(h, w)
    budget = BatchSizing(batch_pixels=16 * 512 * 512)
    out: dict = {}
    for leftover in ("nearest", "drop", "duplicate", "partial"):
        times, steps = [], []
        for batch in (16, budget):
            planner = Planner(assignment, batch_size=batch, world=World(0, 8), leftover=leftover)
            best = float("inf")
            for epoch in range(3):
                start = time.perf_counter()
                plan = planner.epoch(epoch)
                plan.rows_at(len(plan) // 2)
                best = min(best, time.perf_counter() - start)
            times.append(best)
            steps.append(len(plan))
        out[f"{leftover}: plan one epoch + one step, {n} rows, fixed 16 / budget ms"] = (
            f"{times[0] * 1e3:.1f} / {times[1] * 1e3:.1f} ({times[1] / times[0]:.2f}x)"
        )
        out[f"  {leftover}: steps per epoch fixed / budget"] = f"{steps[0]} / {steps[1]}"
    b = budget.per_bucket(assignment.sizes)
    counts = assignment.counts()
    pixels = b * assignment.sizes[:, 0] * assignment.sizes[:, 1]
    used = counts > 0
    out["budget: images per rank and step, smallest / largest bucket"] = f"{int(b[used].min())} / {int(b[used].max())}"
    out["budget: pixels per rank and step max / mean (MP)"] = (
        f"{pixels[used].max() / 1e6:.2f} / {np.average(pixels[used], weights=counts[used]) / 1e6:.2f}"
    )
    return out
