"""How far JPEG DCT scaling may go: quality and decode cost of the CPU decoder by reduction margin.

For each margin (how many times the resize the reduced decode must keep on both sides; 1 is the largest
covering reduction, ``jpeg_scaling="fast"``; 3 is ``"quality"``), the OpenCV decoder's output is scored
against ``reference_image`` (full decode, Pillow antialiased bilinear) and timed on one core, on two photo
sets: 0.8-3 MP (the first batch of every bucket of the loader case's plan) and 4-12 MP.
"""

from __future__ import annotations

import time

import numpy as np

from . import case, photo_manifest

MARGINS = (1.0, 1.5, 2.0, 3.0, 1e9)


def _items(manifest, batch_size: int = 8) -> list[tuple[str, int, int, int, int]]:
    """``(source, height, width, bucket_h, bucket_w)`` of the first batch of every bucket."""
    from dali_arb import BucketSpec, Manifest, Planner, World

    m = Manifest.read(manifest, columns=["source"])
    plan = Planner(BucketSpec().assign(m.heights, m.widths), batch_size=batch_size, world=World()).epoch(0)
    first = sorted({int(b): i for i, b in reversed(list(enumerate(plan.bucket.tolist())))}.values())
    sources = m.table.column("source").to_pylist()
    sizes = plan.sizes[plan.bucket]
    return [(sources[row], int(m.heights[row]), int(m.widths[row]), *(int(v) for v in sizes[step]))
            for step in first for row in plan.rows[step]]  # fmt: skip


def _score(items, margin: float) -> dict:
    import cv2

    from dali_arb.loader.decoders import OpenCVDecoder
    from dali_arb.plan.geometry import Geometry, cover_crop
    from dali_arb.tools.photos import psnr, reference_image

    cv2.setNumThreads(1)
    decoder = type("MarginDecoder", (OpenCVDecoder,), {"margin": property(lambda self: margin)})()
    encoded = [np.fromfile(src, np.uint8) for src, *_ in items]
    scores, seconds = [], 0.0
    for data, (src, h, w, bh, bw) in zip(encoded, items):
        geometry = Geometry(h, w, *cover_crop(h, w, bh, bw, 0.0, 0.0, center=True), bh, bw)
        start = time.perf_counter()
        out, _ = decoder.prepare(data, geometry)
        seconds += time.perf_counter() - start
        scores.append(psnr(out["image"], reference_image(src, bh, bw)))
    return {"worst": round(min(scores), 2), "median": round(float(np.median(scores)), 2),
            "ms": round(1000 * seconds / len(items), 1)}  # fmt: skip


@case("jpeg_scaling")
def jpeg_scaling(args) -> dict:
    out: dict = {}
    sets = (("0.8-3 MP, first batch of every bucket", 256, 0.8, 3.0, 1), ("4-12 MP", 30, 4.0, 12.0, 5))
    for label, count, lo, hi, seed in sets:
        count = min(count, 48) if args.quick else count
        with photo_manifest(args, count, min_mp=lo, max_mp=hi, seed=seed) as manifest:
            items = _items(manifest)
            _score(items[:4], 1.0)  # warm-up
            for margin in MARGINS:
                name = "none (full resolution)" if margin > 100 else f"{margin:g}"
                r = _score(items, margin)
                out[f"{label} ({len(items)} images), margin {name}: worst / median dB, ms per image"] = (
                    f"{r['worst']} / {r['median']}, {r['ms']}"
                )
    return out
