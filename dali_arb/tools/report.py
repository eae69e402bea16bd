"""The bucket report behind ``dali-arb buckets``: what bucketing does to a manifest, before training.
Imports NumPy and the plan layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plan.buckets import REJECT_ASPECT, REJECT_TOO_SMALL, BucketSpec, format_size
from ..plan.mixture import MixedIndex, check_repeats
from ..plan.planner import LeftoverPolicy, make_planner
from ..plan.world import World

__all__ = ["bucket_report", "format_report"]


def bucket_report(
    heights: np.ndarray | list[np.ndarray],
    widths: np.ndarray | list[np.ndarray],
    spec: BucketSpec | list[BucketSpec],
    *,
    batch_size: int = 1,
    world_size: int = 1,
    seed: int = 0,
    leftover: LeftoverPolicy | str = LeftoverPolicy.NEAREST,
    sync_ranks: bool = True,
    repeats: list[float] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report: one entry per bucket that holds images, and totals.

    Per bucket: resolution, aspect (w/h), images, full batches (global batches when ranks are in
    sync), leftovers, mean crop loss (share of the resized image cut away by the crop) and
    upscaled share (images enlarged to cover the bucket). Totals: steps per epoch per rank and
    images trimmed / dropped / duplicated per epoch (epoch 0) and rejected.

    Several datasets: ``heights``/``widths`` are lists (one array per dataset), ``spec`` one spec or one per
    dataset, ``repeats`` one count per dataset; images per bucket then count each image as often as it is
    served per epoch (``dali_arb.plan.mixture``).
    """
    several = isinstance(heights, list)
    all_heights = heights if several else [heights]
    all_widths = widths if several else [widths]
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec] * len(all_heights)
    assignments = [s.assign(h, w) for s, h, w in zip(specs, all_heights, all_widths)]
    weights = check_repeats(repeats, len(assignments))
    planner = make_planner(assignments, specs, repeats=weights, seed=seed, batch_size=batch_size,
                           world=World(0, world_size), leftover=leftover, sync_ranks=sync_ranks)  # fmt: skip
    index, plan = planner.index, planner.epoch(0)
    to_global = index.to_global if isinstance(index, MixedIndex) else [np.arange(len(index.sizes))]
    crops = _CropStatistics.of(assignments, to_global, weights, index)
    unit = batch_size * world_size if sync_ranks else batch_size
    buckets = _bucket_entries(index, plan, unit, crops)
    options = {
        "batch_size": batch_size,
        "world_size": world_size,
        "leftover": LeftoverPolicy(leftover).value,
        "sync_ranks": sync_ranks,
        **specs[0].to_dict(),
    }
    if several or repeats is not None:
        options["datasets"] = [{"repeats": r, **s.to_dict()} for r, s in zip(weights, specs)]
        options["no_upscale"] = any(s.no_upscale for s in specs)
    return {"buckets": buckets, "totals": _totals(assignments, buckets, index, plan, crops), "options": options}


@dataclass(frozen=True)
class _CropStatistics:
    """What the crop does to the served images, per bucket (``float64 (K,)``, each image weighted by its repeats)
    and over all of them."""

    loss_sum: np.ndarray  # crop loss summed over the bucket's images
    upscaled: np.ndarray  # images enlarged to cover the bucket
    served: np.ndarray  # images served per epoch
    mean_crop_loss: float
    upscaled_share: float

    @classmethod
    def of(cls, assignments: list[Any], to_global: list[np.ndarray], weights: tuple[float, ...], index: Any):
        """From each dataset's assignment, its buckets' global ids (``to_global``) and repeats (``weights``)."""
        sizes, bucket_log = index.sizes, index.bucket_log_aspect
        loss_sum, upscaled, served = np.zeros(len(sizes)), np.zeros(len(sizes)), np.zeros(len(sizes))
        losses, scales = [], []
        for assignment, mapping, weight in zip(assignments, to_global, weights):
            rows = np.flatnonzero(assignment.bucket >= 0)
            chosen = mapping[assignment.bucket[rows]]
            crop_loss = 1.0 - np.exp(-np.abs(assignment.log_aspect[rows] - bucket_log[chosen]))
            scale = np.maximum(sizes[chosen, 0] / assignment.heights[rows], sizes[chosen, 1] / assignment.widths[rows])
            loss_sum += weight * np.bincount(chosen, weights=crop_loss, minlength=len(sizes))
            upscaled += weight * np.bincount(chosen, weights=(scale > 1.0).astype(float), minlength=len(sizes))
            served += weight * np.bincount(chosen, minlength=len(sizes))
            losses.append((crop_loss, weight))
            scales.append((scale > 1.0, weight))
        total = float(served.sum())
        mean_loss = round(sum(float(x.sum()) * w for x, w in losses) / total, 4) if total else 0.0
        share = round(sum(float(u.sum()) * w for u, w in scales) / total, 4) if total else 0.0
        return cls(loss_sum, upscaled, served, mean_loss, share)


def _bucket_entries(index: Any, plan: Any, unit: int, crops: _CropStatistics) -> list[dict[str, Any]]:
    """One entry per bucket serving images in epoch 0, portrait to landscape; ``unit``: images per full batch."""
    counts = index.epoch_counts(0)  # the samples of epoch 0 (fractional repeats vary them by one per bucket)
    full_batches = (plan.bucket_counts // unit).sum(axis=0)  # (K,) over all ranks
    leftovers = (plan.bucket_counts % unit).sum(axis=0)
    served = crops.served
    buckets = []
    for k in np.argsort(index.bucket_log_aspect, kind="stable"):
        n = int(counts[k])
        if n == 0:
            continue
        h, w = (int(v) for v in index.sizes[k])
        buckets.append(
            {
                "resolution": format_size(h, w),
                "width": w,
                "height": h,
                "aspect": round(w / h, 4),
                "images": n,
                "full_batches": int(full_batches[k]),
                "leftovers": int(leftovers[k]),
                "mean_crop_loss": round(float(crops.loss_sum[k] / served[k]), 4) if served[k] else 0.0,
                "upscaled_share": round(float(crops.upscaled[k] / served[k]), 4) if served[k] else 0.0,
            }
        )
    return buckets


def _totals(
    assignments: list[Any], buckets: list[dict[str, Any]], index: Any, plan: Any, crops: _CropStatistics
) -> dict[str, Any]:
    """The report's totals over every dataset and bucket (epoch 0)."""
    return {
        "images": int(sum(a.num_images for a in assignments)),
        "usable": int(sum(int(np.count_nonzero(a.bucket >= 0)) for a in assignments)),
        "rejected_aspect": sum(a.rejected(REJECT_ASPECT) for a in assignments),
        "rejected_too_small": sum(a.rejected(REJECT_TOO_SMALL) for a in assignments),
        "buckets_used": len(buckets),
        "mean_crop_loss": crops.mean_crop_loss,
        "upscaled_share": crops.upscaled_share,
        "samples_per_epoch": int(index.epoch_counts(0).sum()),
        "steps_per_epoch": len(plan),
        "trimmed_per_epoch": plan.trimmed,
        "dropped_per_epoch": plan.dropped,
        "duplicated_per_epoch": plan.duplicated,
        "leftover_images": int(sum(b["leftovers"] for b in buckets)),
    }


def _repeats(options: dict[str, Any]) -> str:
    return ",".join(f"{d['repeats']:g}" for d in options["datasets"])


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
        + (f", {t['samples_per_epoch']} samples per epoch with repeats {_repeats(o)}" if "datasets" in o else "")
        + (f", too small for --no-upscale {t['rejected_too_small']}" if o["no_upscale"] else ""),
        f"batch {o['batch_size']} x world {o['world_size']} ({unit} {o['batch_size'] * (o['world_size'] if o['sync_ranks'] else 1)}), "
        f"leftover policy {o['leftover']}: {t['steps_per_epoch']} steps per epoch per rank",
        f"per epoch: {t['leftover_images']} leftover images, {t['trimmed_per_epoch']} trimmed, "
        f"{t['dropped_per_epoch']} dropped, {t['duplicated_per_epoch']} duplicated; "
        f"mean crop loss {100 * t['mean_crop_loss']:.1f}%, upscaled {100 * t['upscaled_share']:.0f}%",
    ]
    return "\n".join(text)
