"""The bucket report behind ``dali-arb buckets``: what bucketing does to a manifest, before training."""

from __future__ import annotations

from typing import Any

import numpy as np

from .buckets import REJECT_ASPECT, REJECT_TOO_SMALL, BucketSpec, format_size
from .planner import LeftoverPolicy, Planner
from .world import World

__all__ = ["bucket_report", "format_report"]


def bucket_report(
    heights: np.ndarray,
    widths: np.ndarray,
    spec: BucketSpec,
    *,
    batch_size: int = 1,
    world_size: int = 1,
    seed: int = 0,
    leftover: LeftoverPolicy | str = LeftoverPolicy.NEAREST,
    sync_ranks: bool = True,
) -> dict[str, Any]:
    """A JSON-ready report: one entry per bucket that holds images, and totals.

    Per bucket: resolution, aspect (w/h), images, full batches (global batches when ranks are in
    sync), leftovers, mean crop loss (share of the resized image cut away by the crop) and
    upscaled share (images enlarged to cover the bucket). Totals: steps per epoch per rank and
    images trimmed / dropped / duplicated per epoch (epoch 0) and rejected.
    """
    assignment = spec.assign(heights, widths)
    sizes = assignment.sizes
    counts = assignment.counts()
    unit = batch_size * world_size if sync_ranks else batch_size
    plan = Planner(
        assignment,
        batch_size=batch_size,
        world=World(0, world_size),
        seed=seed,
        leftover=leftover,
        sync_ranks=sync_ranks,
    ).epoch(0)
    full_batches = (plan.bucket_counts // unit).sum(axis=0)  # (K,) over all ranks
    leftovers = (plan.bucket_counts % unit).sum(axis=0)
    kept = assignment.bucket >= 0
    rows = np.flatnonzero(kept)
    chosen = assignment.bucket[rows]
    bucket_log = assignment.bucket_log_aspect
    crop_loss = 1.0 - np.exp(-np.abs(assignment.log_aspect[rows] - bucket_log[chosen]))
    scale = np.maximum(sizes[chosen, 0] / assignment.heights[rows], sizes[chosen, 1] / assignment.widths[rows])
    loss_sum = np.bincount(chosen, weights=crop_loss, minlength=len(sizes))
    upscaled = np.bincount(chosen, weights=(scale > 1.0).astype(float), minlength=len(sizes))
    buckets = []
    for k in np.argsort(bucket_log, kind="stable"):  # portrait to landscape
        n = int(counts[k])
        if n == 0:
            continue
        h, w = (int(v) for v in sizes[k])
        buckets.append(
            {
                "resolution": format_size(h, w),
                "width": w,
                "height": h,
                "aspect": round(w / h, 4),
                "images": n,
                "full_batches": int(full_batches[k]),
                "leftovers": int(leftovers[k]),
                "mean_crop_loss": round(float(loss_sum[k] / n), 4),
                "upscaled_share": round(float(upscaled[k] / n), 4),
            }
        )
    totals: dict[str, Any] = {
        "images": assignment.num_images,
        "usable": int(rows.size),
        "rejected_aspect": assignment.rejected(REJECT_ASPECT),
        "rejected_too_small": assignment.rejected(REJECT_TOO_SMALL),
        "buckets_used": len(buckets),
        "mean_crop_loss": round(float(crop_loss.mean()), 4) if rows.size else 0.0,
        "upscaled_share": round(float((scale > 1).mean()), 4) if rows.size else 0.0,
    }
    totals.update(
        {
            "steps_per_epoch": len(plan),
            "trimmed_per_epoch": plan.trimmed,
            "dropped_per_epoch": plan.dropped,
            "duplicated_per_epoch": plan.duplicated,
            "leftover_images": int(sum(b["leftovers"] for b in buckets)),
        }
    )
    options = {
        "batch_size": batch_size,
        "world_size": world_size,
        "leftover": LeftoverPolicy(leftover).value,
        "sync_ranks": sync_ranks,
        **spec.to_dict(),
    }
    return {"buckets": buckets, "totals": totals, "options": options}


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table for people."""
    header = ("bucket", "aspect", "images", "batches", "leftover", "crop loss", "upscaled")
    lines = [header]
    for b in report["buckets"]:
        lines.append(
            (
                b["resolution"],
                f"{b['aspect']:.2f}",
                str(b["images"]),
                str(b["full_batches"]),
                str(b["leftovers"]),
                f"{100 * b['mean_crop_loss']:.1f}%",
                f"{100 * b['upscaled_share']:.0f}%",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    t, o = report["totals"], report["options"]
    unit = "global batch" if o["sync_ranks"] else "batch"
    text += [
        "",
        f"images {t['images']}, usable {t['usable']}, rejected for aspect error {t['rejected_aspect']}"
        + (f", too small for --no-upscale {t['rejected_too_small']}" if o["no_upscale"] else ""),
        f"batch {o['batch_size']} x world {o['world_size']} ({unit} {o['batch_size'] * (o['world_size'] if o['sync_ranks'] else 1)}), "
        f"leftover policy {o['leftover']}: {t['steps_per_epoch']} steps per epoch per rank",
        f"per epoch: {t['leftover_images']} leftover images, {t['trimmed_per_epoch']} trimmed, "
        f"{t['dropped_per_epoch']} dropped, {t['duplicated_per_epoch']} duplicated; "
        f"mean crop loss {100 * t['mean_crop_loss']:.1f}%, upscaled {100 * t['upscaled_share']:.0f}%",
    ]
    return "\n".join(text)
