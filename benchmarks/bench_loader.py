"""Loader throughput: dali_arb vs DataLoader + Pillow vs Pillow with draft(), same plan, same outputs."""

from __future__ import annotations

from . import case, loader_rows, photo_manifest


@case("loader")
def loader(args) -> dict:
    from dali_arb.tools.bench import run_bench

    count = args.images or (64 if args.quick else 256)
    batches = 6 if args.quick else max(24, min(200, count // 8 - 8))
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=1) as manifest:
        result = run_bench(
            manifest,
            device=args.device,
            batch_size=8,
            batches=batches,
            rounds=3,
            baseline=True,
            memory=True,
            quality=True,
        )
    flat = {
        f"{count} JPEGs {args.min_mp:g}-{args.max_mp:g} MP, batch 8, device {result['device']}, {result['cores']} cores": result[
            "output"
        ]
    }
    flat.update(loader_rows(result))
    flat["  decode-only ceiling images/s"] = result["decode_ceiling"]["images_per_s"]
    flat["  share of the decode-only ceiling"] = f"{100 * result['share_of_decode_ceiling']:.0f}%"
    flat["  speed-up vs the OpenCV peer of the same quality (goal >= 1.0)"] = f"{result['speedup_vs_same_quality']}x"
    flat["  speed-up vs OpenCV reduced decode"] = f"{result['speedup_vs_baseline_opencv']}x"
    flat["  speed-up vs Pillow"] = f"{result['speedup_vs_baseline']}x"
    flat["  speed-up vs Pillow draft"] = f"{result['speedup_vs_baseline_draft']}x"
    if "speedup_vs_torchvision" in result:
        flat["  speed-up vs torchvision decode_jpeg"] = f"{result['speedup_vs_torchvision']}x"
    flat["  planner + external source overhead (goal < 10%)"] = f"{100 * result['planner_and_source_overhead']:.1f}%"
    if "gpu_memory" in result:
        flat["  GPU memory used after warm-up / after run (MB)"] = (
            f"{result['gpu_memory']['after_warmup_mb']} / {result['gpu_memory']['after_run_mb']}"
        )
    for key, q in result["quality"].items():
        if isinstance(q, dict):
            flat[f"  PSNR {key} worst / median dB"] = f"{q['worst_db']} / {q['median_db']}"
    flat["raw"] = result
    return flat
