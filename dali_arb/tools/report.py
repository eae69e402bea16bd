"""The bucket report behind ``dali-arb buckets``: what bucketing does to a manifest, before training.
Imports NumPy and the plan layer.

Crop loss is reported twice: at each image's own bucket (what assignment alone does), and *as served* in the
stated epoch, over every sample of every rank (leftovers pooled into another bucket included: a portrait served at
a landscape bucket loses far more). For small datasets the two differ most, because most images are leftovers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plan import buckets as _buckets
from ..plan.batching import BatchSizing
from ..plan.buckets import REJECT_ASPECT, REJECT_TOO_SMALL, BucketSpec, format_size
from ..plan.mixture import MixedIndex, check_repeats
from ..plan.planner import LeftoverPolicy, Planner, make_planner
from ..plan.world import World

__all__ = ["REJECTED_LISTED", "bucket_report", "format_report", "plan_steps", "reject_reasons"]

#: How many rejected images a report lists by default (``rejected_limit``); their count is always complete.
REJECTED_LISTED = 1000

KeysOf = Callable[[np.ndarray], Sequence[str]]


def reject_reasons() -> dict[int, str]:
    """The name of every reject code of :attr:`BucketAssignment.reject_code`: the ``REJECT_*`` constants of
    ``plan.buckets`` without their prefix, lower-cased (``REJECT_ASPECT`` -> ``"aspect"``)."""
    return {
        int(value): name.removeprefix("REJECT_").lower()
        for name, value in vars(_buckets).items()
        if name.startswith("REJECT_") and name != "REJECT_NONE" and isinstance(value, int)
    }


def plan_steps(plan: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sample of one rank's epoch plan, in step order: ``rows int64 (S,)``, ``bounds int64 (steps + 1,)``
    (step ``i`` serves ``rows[bounds[i]:bounds[i + 1]]``: batches may differ in size from step to step) and
    ``bucket int64 (steps,)``. An :class:`~dali_arb.plan.planner.EpochPlan` is read whole (``flat_rows``,
    ``row_offsets``, ``bucket``), which is far faster; any other plan with ``batch_size_at`` step by step."""
    steps = len(plan)
    if hasattr(plan, "flat_rows") and hasattr(plan, "row_offsets"):
        return (np.asarray(plan.flat_rows, np.int64), np.asarray(plan.row_offsets, np.int64),
                np.asarray(plan.bucket, np.int64))  # fmt: skip
    if not hasattr(plan, "batch_size_at"):  # one batch size for every step: the (steps, B) arrays
        rows = np.asarray(plan.rows, np.int64)
        bounds = np.arange(steps + 1, dtype=np.int64) * (rows.shape[1] if rows.ndim == 2 else 0)
        return rows.reshape(-1), bounds, np.asarray(plan.bucket, np.int64)
    parts = [np.asarray(plan.rows_at(s), np.int64).reshape(-1) for s in range(steps)]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return rows, bounds, np.array([plan.bucket_at(s) for s in range(steps)], np.int64)


def bucket_report(
    heights: np.ndarray | list[np.ndarray],
    widths: np.ndarray | list[np.ndarray],
    spec: BucketSpec | list[BucketSpec],
    *,
    batch_size: int | BatchSizing = 1,
    world_size: int = 1,
    seed: int = 0,
    leftover: LeftoverPolicy | str = LeftoverPolicy.AUTO,
    sync_ranks: bool = True,
    repeats: list[float] | None = None,
    epoch: int = 0,
    keys: KeysOf | Sequence[KeysOf] | None = None,
    rejected_limit: int | None = REJECTED_LISTED,
) -> dict[str, Any]:
    """A JSON-ready report of ``epoch``: one entry per bucket that holds or serves images, totals, the rejected
    images and the options.

    Per bucket: resolution, aspect (w/h), images (its own, with repeats), images and pixels per rank and step
    (``batch_size``: an int, or a :class:`BatchSizing` deciding each bucket's batch), full batches, leftovers,
    trimmed / dropped / duplicated images of its own, samples served AT it (its own and pooled leftovers), mean crop
    loss at its own bucket (``mean_crop_loss``: share of the resized image cut away by the crop) and as served at
    it (``served_crop_loss``), and upscaled share. Totals: steps per epoch per rank, both crop losses,
    pixels per step (max / mean), images trimmed / dropped / duplicated / moved to another bucket, rejected per
    reason. ``rejected``: up to ``rejected_limit`` (``None``: all) of ``{"row", "reason", "width", "height"}``
    (``"key"`` with ``keys``: per dataset, a function of rows such as ``Manifest.keys_at``; ``"dataset"`` with
    several datasets).

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
    sizing = BatchSizing.of(batch_size)
    planned = sizing if sizing.fixed is None else sizing.fixed  # an int where the planner may not take a sizing
    planner = make_planner(assignments, specs, repeats=weights, seed=seed, batch_size=planned,
                           world=World(0, world_size), leftover=leftover, sync_ranks=sync_ranks)  # fmt: skip
    index, plan = planner.index, planner.epoch(epoch)
    to_global = index.to_global if isinstance(index, MixedIndex) else [np.arange(len(index.sizes))]
    crops = _CropStatistics.of(assignments, to_global, weights, index)
    images = _Images.of(assignments, to_global)
    served = _Served.of(planner, planned, epoch, images, index.bucket_log_aspect, index.sizes)
    buckets = _bucket_entries(index, plan, epoch, sizing, world_size if sync_ranks else 1, crops, served)
    options = {
        "batch_size": sizing.fixed,
        "batch": sizing.to_dict(),
        "world_size": world_size,
        "leftover": LeftoverPolicy(leftover).value,
        "leftover_resolved": planner.leftover.value,  # what "auto" became for these data
        "sync_ranks": sync_ranks,
        "epoch": epoch,
        **specs[0].to_dict(),
    }
    if several or repeats is not None:
        options["datasets"] = [{"repeats": r, **s.to_dict()} for r, s in zip(weights, specs)]
        options["no_upscale"] = any(s.no_upscale for s in specs)
    listed = _rejected(assignments, keys, rejected_limit, several)
    totals = _totals(assignments, buckets, index, plan, epoch, crops, served)
    return {"buckets": buckets, "totals": totals, "rejected": listed, "options": options}


@dataclass(frozen=True)
class _CropStatistics:
    """What the crop does to each image at its own bucket, per bucket (``float64 (K,)``, each image weighted by
    its repeats) and over all of them."""

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
            crop_loss = crop_share(assignment.log_aspect[rows], bucket_log[chosen])
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


def crop_share(log_aspect: np.ndarray, bucket_log_aspect: np.ndarray) -> np.ndarray:
    """``float64`` share of an image cut away when it is resized to cover a bucket and cropped to it: ``1 - r``,
    ``r`` the smaller of the two aspect ratios over the larger (both arrays the same shape)."""
    return 1.0 - np.exp(-np.abs(np.asarray(log_aspect) - np.asarray(bucket_log_aspect)))


@dataclass(frozen=True)
class _Images:
    """Every image by global row (``(N,)`` arrays over all datasets, in order): sides, log aspect, global bucket
    (``-1``: rejected)."""

    heights: np.ndarray
    widths: np.ndarray
    log_aspect: np.ndarray
    own: np.ndarray

    @classmethod
    def of(cls, assignments: list[Any], to_global: list[np.ndarray]) -> _Images:
        own = [np.where(a.bucket >= 0, m[np.maximum(a.bucket, 0)], -1) for a, m in zip(assignments, to_global)]
        return cls(
            heights=np.concatenate([a.heights for a in assignments]).astype(np.int64),
            widths=np.concatenate([a.widths for a in assignments]).astype(np.int64),
            log_aspect=np.concatenate([a.log_aspect for a in assignments]),
            own=np.concatenate(own).astype(np.int64),
        )


@dataclass(frozen=True)
class _Served:
    """What one epoch serves, on every rank: ``rows int64 (S,)`` (global rows, with duplicates), ``own int64 (S,)``
    the bucket of each, ``at int64 (S,)`` the bucket it is served at, its crop loss and whether it is upscaled
    there; and the steps of every rank, one after the other: ``step_images int64 (W * steps,)`` and
    ``step_bucket int64 (W * steps,)``."""

    rows: np.ndarray
    own: np.ndarray
    at: np.ndarray
    loss: np.ndarray
    upscaled: np.ndarray
    step_images: np.ndarray
    step_bucket: np.ndarray

    @classmethod
    def of(cls, planner: Planner, planned: Any, epoch: int, images: _Images, bucket_log: np.ndarray,
           sizes: np.ndarray) -> _Served:  # fmt: skip
        """From ``planner`` (rank 0) and the same planner for every other rank (made from its index)."""
        world = planner.world.world_size
        parts, steps = [], []
        for rank in range(world):
            same = planner if rank == 0 else Planner(
                planner.index, batch_size=planned, world=World(rank, world), seed=planner.seed,
                leftover=planner.leftover, sync_ranks=planner.sync_ranks, largest_first=planner.largest_first,
            )  # fmt: skip
            rows, bounds, bucket = plan_steps(same.epoch(epoch))
            parts.append((rows, np.repeat(bucket, np.diff(bounds))))
            steps.append((np.diff(bounds), bucket))
        rows = np.concatenate([p[0] for p in parts])
        at = np.concatenate([p[1] for p in parts])
        loss = crop_share(images.log_aspect[rows], bucket_log[at])
        upscaled = (sizes[at, 0] > images.heights[rows]) | (sizes[at, 1] > images.widths[rows])
        step_images = np.concatenate([s[0] for s in steps]).astype(np.int64)
        return cls(rows, images.own[rows], at, loss, upscaled, step_images, np.concatenate([s[1] for s in steps]))


def _per_bucket(sizing: BatchSizing, sizes: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """``int64 (K,)`` images per rank and step of the ``needed`` buckets (``bool (K,)``), 0 for the others (a table
    need not name buckets that serve nothing)."""
    out = np.zeros(len(sizes), np.int64)
    if needed.any():
        out[needed] = sizing.per_bucket(sizes[needed])
    return out


def _bucket_entries(
    index: Any, plan: Any, epoch: int, sizing: BatchSizing, ranks: int, crops: _CropStatistics, served: _Served
) -> list[dict[str, Any]]:
    """One entry per bucket holding or serving samples in ``epoch``, portrait to landscape; ``ranks``: the ranks
    a full batch spans (all of them in sync, else 1)."""
    K = len(index.sizes)
    counts = index.epoch_counts(epoch)  # the samples of the epoch (fractional repeats vary them by one per bucket)
    at = np.bincount(served.at, minlength=K)
    per_step = _per_bucket(sizing, index.sizes, (counts > 0) | (at > 0))
    unit = np.maximum(per_step * ranks, 1)
    kept = plan.bucket_counts.sum(axis=0)  # (K,) after trimming, over all ranks
    full_batches = (plan.bucket_counts // unit).sum(axis=0)
    leftovers = (plan.bucket_counts % unit).sum(axis=0)
    own = np.bincount(served.own, minlength=K)  # samples of each bucket's own images served (anywhere)
    surplus = own - kept  # > 0: served twice (padding); < 0: not served (dropped)
    at_loss = np.bincount(served.at, weights=served.loss, minlength=K)
    buckets = []
    for k in np.argsort(index.bucket_log_aspect, kind="stable"):
        if counts[k] == 0 and at[k] == 0:
            continue
        h, w = (int(v) for v in index.sizes[k])
        buckets.append(
            {
                "resolution": format_size(h, w),
                "width": w,
                "height": h,
                "aspect": round(w / h, 4),
                "images": int(counts[k]),
                "images_per_step": int(per_step[k]),
                "pixels_per_step": int(per_step[k]) * h * w,
                "full_batches": int(full_batches[k]),
                "in_full_batches": int(full_batches[k] * unit[k]),
                "leftovers": int(leftovers[k]),
                "trimmed": int(counts[k] - kept[k]),
                "dropped": int(max(-surplus[k], 0)),
                "duplicated": int(max(surplus[k], 0)),
                "served": int(at[k]),
                "mean_crop_loss": round(float(crops.loss_sum[k] / crops.served[k]), 4) if crops.served[k] else 0.0,
                "served_crop_loss": round(float(at_loss[k] / at[k]), 4) if at[k] else 0.0,
                "upscaled_share": round(float(crops.upscaled[k] / crops.served[k]), 4) if crops.served[k] else 0.0,
            }
        )
    return buckets


def _totals(
    assignments: list[Any], buckets: list[dict[str, Any]], index: Any, plan: Any, epoch: int,
    crops: _CropStatistics, served: _Served,
) -> dict[str, Any]:  # fmt: skip
    """The report's totals over every dataset and bucket (``epoch``)."""
    reasons = reject_reasons()
    codes = np.concatenate([a.reject_code for a in assignments]).astype(np.int64)
    by_code = np.bincount(codes, minlength=max(reasons, default=0) + 1)
    pixels = served.step_images * index.sizes[served.step_bucket].prod(axis=1)  # (W * steps,) per rank and step
    return {
        "epoch": epoch,
        "images": int(sum(a.num_images for a in assignments)),
        "usable": int(sum(int(np.count_nonzero(a.bucket >= 0)) for a in assignments)),
        "rejected_aspect": sum(a.rejected(REJECT_ASPECT) for a in assignments),
        "rejected_too_small": sum(a.rejected(REJECT_TOO_SMALL) for a in assignments),
        "rejected": {reasons.get(c, f"code {c}"): int(n) for c, n in enumerate(by_code.tolist()) if c and n},
        "buckets_used": sum(1 for b in buckets if b["images"]),
        "buckets_serving": sum(1 for b in buckets if b["served"]),
        "mean_crop_loss": crops.mean_crop_loss,
        "served_crop_loss": round(float(served.loss.mean()), 4) if len(served.loss) else 0.0,
        "upscaled_share": crops.upscaled_share,
        "served_upscaled_share": round(float(served.upscaled.mean()), 4) if len(served.upscaled) else 0.0,
        "samples_per_epoch": int(index.epoch_counts(epoch).sum()),
        "samples_served": len(served.rows),
        "moved_per_epoch": int(np.count_nonzero(served.own != served.at)),
        "steps_per_epoch": len(plan),
        "images_per_step_min": int(served.step_images.min()) if len(pixels) else 0,
        "images_per_step_max": int(served.step_images.max()) if len(pixels) else 0,
        "pixels_per_step_max": int(pixels.max()) if len(pixels) else 0,
        "pixels_per_step_mean": round(float(pixels.mean()), 1) if len(pixels) else 0.0,
        "trimmed_per_epoch": plan.trimmed,
        "dropped_per_epoch": plan.dropped,
        "duplicated_per_epoch": plan.duplicated,
        "leftover_images": int(sum(b["leftovers"] for b in buckets)),
    }


def _rejected(
    assignments: list[Any], keys: KeysOf | Sequence[KeysOf] | None, limit: int | None, several: bool
) -> list[dict[str, Any]]:
    """Up to ``limit`` (``None``: all) rejected images, dataset by dataset in row order: row, reason, sides, and
    the key where ``keys`` (one function of rows per dataset, or one for a single dataset) is given."""
    reasons = reject_reasons()
    lookups = [keys] * len(assignments) if callable(keys) or keys is None else list(keys)
    out: list[dict[str, Any]] = []
    for d, (assignment, key_of) in enumerate(zip(assignments, lookups)):
        rows = np.flatnonzero(assignment.reject_code)
        if limit is not None:
            rows = rows[: max(limit - len(out), 0)]
        names = list(key_of(rows)) if key_of is not None and len(rows) else [None] * len(rows)
        for row, name in zip(rows.tolist(), names):
            code = int(assignment.reject_code[row])
            entry = {"row": row, "reason": reasons.get(code, f"code {code}"),
                     "width": int(assignment.widths[row]), "height": int(assignment.heights[row])}  # fmt: skip
            if name is not None:
                entry = {"key": name, **entry}
            if several:
                entry["dataset"] = d
            out.append(entry)
    return out


def _repeats(options: dict[str, Any]) -> str:
    return ",".join(f"{d['repeats']:g}" for d in options["datasets"])


def describe_batch(batch: dict[str, Any]) -> str:
    """A report's ``options["batch"]`` (:meth:`BatchSizing.to_dict`) for people."""
    if batch.get("batch_size") is not None:
        return f"batch {batch['batch_size']}"
    if batch.get("batch_pixels") is not None:
        extra = [f"at most {batch['max_batch']}"] if batch.get("max_batch") else []
        extra += [f"multiples of {batch['batch_multiple']}"] if batch.get("batch_multiple", 1) != 1 else []
        return f"budget {batch['batch_pixels']} px" + (f" ({', '.join(extra)})" if extra else "")
    return f"batch table of {len(batch['batch_sizes'])} buckets"


def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:.2f}M"


def _table(report: dict[str, Any]) -> list[str]:
    """The per-bucket table, aligned."""
    header = ("bucket", "aspect", "images", "img/step", "px/step", "batches", "leftover", "trimmed", "served",
              "crop own", "crop served", "upscaled")  # fmt: skip
    lines = [header]
    for b in report["buckets"]:
        row = (
            b["resolution"], f"{b['aspect']:.2f}", str(b["images"]), str(b["images_per_step"]),
            _megapixels(b["pixels_per_step"]), str(b["full_batches"]), str(b["leftovers"]), str(b["trimmed"]),
            str(b["served"]), f"{100 * b['mean_crop_loss']:.1f}%", f"{100 * b['served_crop_loss']:.1f}%",
            f"{100 * b['upscaled_share']:.0f}%",
        )  # fmt: skip
        lines.append(row)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _rejected_line(report: dict[str, Any]) -> list[str]:
    """The first rejected images by name (or row), when there are any."""
    listed = report.get("rejected") or []
    if not listed:
        return []
    shown = ", ".join(
        f"{_printable(str(e.get('key', 'row ' + str(e['row']))))} ({e['reason']}, {e['width']}x{e['height']})"
        for e in listed[:5]
    )
    total = sum(report["totals"]["rejected"].values())
    more = f" and {total - 5} more" if total > 5 else ""
    return [f"rejected: {shown}{more} (--json or --rejected FILE lists them)"]


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table for people."""
    text = _table(report)
    t, o = report["totals"], report["options"]
    ranks = o["world_size"] if o["sync_ranks"] else 1
    batch = o.get("batch") or {"batch_size": o["batch_size"]}
    sizes = (f"global batch {o['batch_size'] * ranks}" if o["batch_size"] is not None
             else f"{t['images_per_step_min']}-{t['images_per_step_max']} images per rank and step")  # fmt: skip
    rejected = ", ".join(f"{n} {reason}" for reason, n in t.get("rejected", {}).items()) or "none"
    text += [
        "",
        f"images {t['images']}, usable {t['usable']}, rejected {rejected}"
        + (f", {t['samples_per_epoch']} samples per epoch with repeats {_repeats(o)}" if "datasets" in o else ""),
        *_rejected_line(report),
        f"{describe_batch(batch)} x world {o['world_size']} ({sizes}), "
        f"leftover policy {policy_words(o)}: {t['steps_per_epoch']} steps per epoch per rank, pixels per step "
        f"max {_megapixels(t['pixels_per_step_max'])} mean {_megapixels(t['pixels_per_step_mean'])}",
        f"epoch {t['epoch']}: {t['leftover_images']} leftover images, {t['trimmed_per_epoch']} trimmed, "
        f"{t['dropped_per_epoch']} dropped, {t['duplicated_per_epoch']} duplicated, "
        f"{t['moved_per_epoch']} served at another bucket than their own",
        f"crop loss: {100 * t['mean_crop_loss']:.1f}% at each image's own bucket, "
        f"{100 * t['served_crop_loss']:.1f}% as served in epoch {t['epoch']} (leftovers included); "
        f"upscaled {100 * t['upscaled_share']:.0f}% at own bucket, {100 * t['served_upscaled_share']:.0f}% as served",
    ]
    return "\n".join(text)


def policy_words(options: dict) -> str:
    """The leftover policy as given, and what ``auto`` became for the data: ``auto (partial)``."""
    given, resolved = options["leftover"], options.get("leftover_resolved", options["leftover"])
    return given if given == resolved else f"{given} ({resolved})"
