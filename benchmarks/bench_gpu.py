"""GPU settings sweep: the same images and plan through the loader on the GPU at several
``hw_decoder_load`` and DALI thread counts, beside the peers (torchvision nvJPEG, Pillow DataLoader
on all cores) in the same run. Needs a GPU; prints a table and returns the raw figures."""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import case

HW_LOADS = (0.0, 0.65, 0.9)
THREADS = (2, 4, 8)


@case("gpu_sweep")
def gpu_sweep(args) -> dict:
    from dali_arb.bench import make_photo_jpegs, run_bench
    from dali_arb.index import build_index

    if args.device != "gpu":
        return {"skipped": "gpu_sweep runs with --device gpu"}
    count = args.images or 2000
    batches = max(24, min(120, count // 16 - 8))
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_photo_jpegs(folder, count, min_mp=1.0, max_mp=4.0, seed=2)
        manifest = Path(tmp) / "m.parquet"
        build_index([str(folder)], manifest, progress=False)
        peers = run_bench(manifest, device="gpu", batch_size=16, batches=batches, rounds=3, baseline=True)
        figures[f"{count} JPEGs 1-4 MP, batch 16, {peers['cores']} cores"] = peers["output"]
        for key in ("loader", "torchvision", "baseline_draft", "baseline"):
            if isinstance(peers.get(key), dict):
                figures[f"  {key} images/s (p50/p99 ms)"] = (
                    f"{peers[key]['images_per_s']} ({peers[key]['batch_ms_p50']}/{peers[key]['batch_ms_p99']})"
                )
        for load in HW_LOADS:
            for threads in THREADS:
                r = run_bench(
                    manifest, device="gpu", batch_size=16, batches=batches, rounds=2, hw_decoder_load=load,
                    num_threads=threads,
                )  # fmt: skip
                figures[f"  hw_decoder_load {load}, {threads} threads: images/s"] = r["loader"]["images_per_s"]
                figures.setdefault("raw_sweep", []).append({"hw_decoder_load": load, "threads": threads, **r})
        figures["raw_peers"] = peers
    return figures
