"""GPU settings sweep: the same images and plan through the loader on the GPU at several
``hw_decoder_load`` and DALI thread counts, the CPU decoders feeding the GPU, and the CPU path on all
cores, beside the peers (torchvision nvJPEG, DataLoaders with OpenCV and Pillow on all cores) in the
same run. Needs a GPU; prints a table and returns the raw figures."""

from __future__ import annotations

from . import case, loader_rows, photo_manifest

#: (hw_decoder_load, DALI threads): the default first, then one setting changed at a time.
SETTINGS = ((0.65, 4), (0.0, 4), (0.9, 4), (0.65, 2), (0.65, 8))


@case("gpu_sweep")
def gpu_sweep(args) -> dict:
    from dali_arb.tools.bench import run_bench

    if args.device != "gpu":
        return {"skipped": "gpu_sweep runs with --device gpu"}
    count = args.images or 2000
    batches = max(24, min(120, count // 16 - 8))
    figures: dict = {}
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=1) as manifest:
        peers = run_bench(manifest, device="gpu", batch_size=16, batches=batches, rounds=3, baseline=True)
        figures[f"{count} JPEGs {args.min_mp:g}-{args.max_mp:g} MP, batch 16, {peers['cores']} cores"] = peers["output"]
        figures.update(loader_rows(peers))
        figures["  decode-only ceiling (OpenCV reduced, all cores) images/s"] = peers["decode_ceiling"]["images_per_s"]
        raw = []
        for load, threads in SETTINGS:
            r = run_bench(
                manifest, device="gpu", batch_size=16, batches=batches, rounds=2, hw_decoder_load=load,
                num_threads=threads,
            )  # fmt: skip
            figures[f"  decoder=dali, hw_decoder_load {load}, {threads} threads: images/s"] = r["loader"][
                "images_per_s"
            ]
            raw.append({"hw_decoder_load": load, "threads": threads, **r})
        # the CPU decoders bound for the GPU: decoded and resized in the workers, uint8 across, normalised there
        for decoder in ("opencv",):
            r = run_bench(manifest, device="gpu", batch_size=16, batches=batches, rounds=2, decoder=decoder)
            figures[f"  decoder={decoder} (CPU workers), output on the GPU: images/s"] = r["loader"]["images_per_s"]
            raw.append({"decoder": decoder, **r})
        r = run_bench(manifest, device="cpu", batch_size=16, batches=batches, rounds=2)
        figures[f"  device=cpu (decoder=auto), all {r['cores']} cores: images/s"] = r["loader"]["images_per_s"]
        raw.append({"device": "cpu", **r})
        figures["raw_sweep"] = raw
        figures["raw_peers"] = peers
    return figures


@case("cpu_cores")
def cpu_cores(args) -> dict:
    """The CPU path on every core of the machine against the same peers (for many-core machines: how the work
    splits between decoding workers and DALI threads)."""
    from dali_arb.tools.bench import run_bench

    count = args.images or 1600
    batches = max(24, min(60, count // 16 - 8))
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=1) as manifest:
        r = run_bench(manifest, device="cpu", batch_size=16, batches=batches, rounds=2, baseline=True)
    figures: dict = {f"{count} JPEGs {args.min_mp:g}-{args.max_mp:g} MP, batch 16, {r['cores']} cores": r["output"]}
    figures.update(loader_rows(r))
    figures["  decode-only ceiling images/s"] = r["decode_ceiling"]["images_per_s"]
    figures["  worker threads (the default) vs worker processes"] = f"{r['thread_vs_process_workers']}x"
    figures["  dali_arb vs the OpenCV peer of the same quality"] = f"{r['speedup_vs_same_quality']}x"
    figures["  dali_arb vs OpenCV reduced decode (faster, 25 dB worst)"] = f"{r['speedup_vs_baseline_opencv']}x"
    figures["  read-ahead MiB (/dev/shm with worker processes)"] = round((r["read_ahead_bytes"] or 0) / 2**20)
    figures["raw"] = r
    return figures
