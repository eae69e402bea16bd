"""Batches sized by a pixel budget against fixed batches (issue 20), side by side.

Planning figures on the photo-like 2M-size mix (8 ranks) and the bundled photos (one rank): images per rank and
step by bucket, pixels per step (max / mean), steps per epoch. Then the CPU loader's megapixels per second on
photo JPEGs, fixed batch vs budget, in one run (the budget must not cost throughput).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from . import case, photo_manifest
from .bench_planner import sizes


def _plan_figures(heights: np.ndarray, widths: np.ndarray, batch, *, world: int) -> dict[str, float]:
    """Steps, images per step (min / max) and pixels per step (max / mean, MP) of epoch 0, rank 0."""
    from dali_arb import BucketSpec, Planner, World

    assignment = BucketSpec().assign(heights, widths)
    plan = Planner(assignment, batch_size=batch, world=World(0, world), leftover="auto").epoch(0)
    per_step = np.asarray(plan.batch_sizes, np.int64)
    bucket = np.asarray(plan.bucket, np.int64)
    pixels = per_step * plan.sizes[bucket, 0] * plan.sizes[bucket, 1]
    return {"steps": len(plan), "images_min": int(per_step.min()), "images_max": int(per_step.max()),
            "mp_max": pixels.max() / 1e6, "mp_mean": pixels.mean() / 1e6}  # fmt: skip


def _compare_plans(out: dict, label: str, heights: np.ndarray, widths: np.ndarray, *, batch: int, world: int) -> None:
    from dali_arb import BatchSizing, BucketSpec

    budget = BatchSizing(batch_pixels=batch * 512 * 512)
    fixed, by_budget = (_plan_figures(heights, widths, b, world=world) for b in (batch, budget))
    out[f"{label}: steps per epoch, batch {batch} / budget {batch}x512x512"] = (
        f"{fixed['steps']} / {by_budget['steps']}"
    )
    out[f"  {label}: images per rank and step min-max"] = (
        f"{fixed['images_min']}-{fixed['images_max']} / {by_budget['images_min']}-{by_budget['images_max']}"
    )
    spec_sizes = BucketSpec().sizes
    per_bucket = budget.per_bucket(spec_sizes)
    out[f"  {label}: budget images per step by bucket (WxH:b)"] = " ".join(
        f"{int(w)}x{int(h)}:{int(b)}" for (h, w), b in zip(spec_sizes, per_bucket)
    )
    out[f"  {label}: pixels per rank and step max / mean MP"] = (
        f"{fixed['mp_max']:.2f} / {fixed['mp_mean']:.2f} vs {by_budget['mp_max']:.2f} / {by_budget['mp_mean']:.2f}"
    )


def _megapixels_per_second(manifest: Path, batch, *, epochs: int) -> tuple[float, int]:
    """CPU loader MP/s over ``epochs`` epochs after one warm-up epoch (pipeline start-up, buffers growing to the
    largest batch), and the images served in them."""
    from dali_arb import DALIBucketIterator

    loader = DALIBucketIterator(str(manifest), batch_size=batch, device="cpu", dtype="uint8", rank=0, world_size=1,
                                leftover="nearest", crop="center")  # fmt: skip
    with loader:
        for _ in loader:  # epoch 0: warm-up
            pass
        pixels = images = 0
        start = time.perf_counter()
        for epoch in range(1, 1 + epochs):
            loader.set_epoch(epoch)
            for batch_out in loader:
                h, w = batch_out["target_size"]
                pixels, images = pixels + len(batch_out["ids"]) * h * w, images + len(batch_out["ids"])
        return pixels / (time.perf_counter() - start) / 1e6, images


@case("budget")
def budget(args) -> dict:
    """Fixed batch 16 vs a 16x512x512 pixel budget per rank: the plan on 2M photo-like sizes over 8 ranks and on
    the bundled photos, and the CPU loader's throughput (batch 8 vs 8x512x768, the same pixels per step at the
    largest buckets) on photo JPEGs."""
    from dali_arb import BatchSizing
    from dali_arb.data.manifest import Manifest
    from dali_arb.index import build_index

    out: dict = {}
    n = 200_000 if args.quick else 2_000_000
    h, w = sizes(n, seed=5)
    _compare_plans(out, f"{n} photo-like sizes, 8 ranks", h, w, batch=16, world=8)
    samples = Path(__file__).resolve().parents[1] / "dali_arb" / "samples"
    with tempfile.TemporaryDirectory() as scratch:
        bundled = Path(scratch) / "bundled.parquet"
        build_index([str(samples)], bundled, progress=False)
        m = Manifest.read(bundled)
        _compare_plans(out, f"bundled photos ({len(m)}), 1 rank", m.heights, m.widths, batch=4, world=1)
    count = args.images or (64 if args.quick else 256)
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=0) as manifest:
        epochs = 2 if args.quick else 3
        fixed, n_fixed = _megapixels_per_second(manifest, 8, epochs=epochs)
        # the same pixels per step at the largest buckets (8 x NovelAI's 512x768 area), more images at smaller ones
        same_pixels = BatchSizing(batch_pixels=8 * 512 * 768)
        budgeted, n_budget = _megapixels_per_second(manifest, same_pixels, epochs=epochs)
    out[f"CPU loader, {count} JPEGs, MP/s batch 8 / budget 8x512x768"] = f"{fixed:.2f} / {budgeted:.2f}"
    out["  budget / fixed throughput"] = f"{budgeted / fixed:.2f}x"
    out["  images served fixed / budget"] = f"{n_fixed} / {n_budget}"
    return out
