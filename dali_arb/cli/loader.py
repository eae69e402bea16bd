"""Loader commands of ``dali-arb``: preview, bench, demo.

They import DALI and torch only when run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..loader.decoders import DECODERS, JPEG_SCALINGS, decoder_help
from ..loader.workers import WORKER_KINDS
from .batching import add_batch_options, batch_from_args
from .core import png_path
from .options import (
    add_bucket_options,
    add_cache_option,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    spec_from_args,
)

SAMPLES = Path(__file__).parent.parent / "samples"


def _device(text: str) -> str:
    """``--device``: torch's ``cuda`` is ``gpu``."""
    return "gpu" if text == "cuda" else text


def _add_loader_options(p: argparse.ArgumentParser, *, batch_default: int) -> None:
    g = p.add_argument_group("loader options")
    g.add_argument(
        "--device", choices=["auto", "cpu", "gpu"], default="auto", type=_device,
        help="decode on the GPU (gpu, or cuda), the CPU, or auto (default)",
    )  # fmt: skip
    add_batch_options(g, required=False)
    p.set_defaults(batch_default=batch_default)
    g.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="threads or processes (--worker-kind) running the loader's source (default: the decoder's: every core "
        "with the CPU decoder, which decodes in them; a quarter of the cores, 1-4, with DALI decoding)",
    )
    g.add_argument(
        "--worker-kind",
        choices=list(WORKER_KINDS),
        default="thread",
        help="the workers are threads of the loader's process (default: no process, no /dev/shm; decoding releases "
        "the GIL) or DALI's worker processes (a worker killed by the OOM killer is restarted from; ~100 MB PSS each on a node)",
    )
    g.add_argument(
        "--decoder",
        choices=["auto", *DECODERS],
        default="auto",
        help=decoder_help(),
    )
    g.add_argument(
        "--jpeg-scaling",
        choices=list(JPEG_SCALINGS),
        default=None,
        help="how far the opencv/pillow workers decode JPEGs at reduced DCT scale: quality (default: only while the "
        "image keeps 3x the bucket; within 35 dB of a full-resolution resize) or fast (the largest reduction that "
        "covers the bucket, as the fastest peers do)",
    )
    g.add_argument("--threads", type=positive_int, default=None, help="DALI threads (default: the decoder's)")
    g.add_argument(
        "--hw-decoder-load",
        type=probability,
        default=None,
        help="share of each batch for the A100/H100 hardware JPEG decoder (GPU, decoder dali; DALI's default 0.65)",
    )


def _loader_settings(args: argparse.Namespace) -> dict:
    """The loader options as ``DALIBucketIterator`` keyword arguments."""
    return {"device": args.device, "workers": args.workers, "worker_kind": args.worker_kind, "decoder": args.decoder,
            "num_threads": args.threads, "hw_decoder_load": args.hw_decoder_load,
            "jpeg_scaling": args.jpeg_scaling}  # fmt: skip


def _options(args: argparse.Namespace, *, augment: Any, workers: int | None, device: str | None = None,
             cache_dir: str | None = None) -> Any:  # fmt: skip
    """The loader options of ``preview`` and ``demo``: the same objects a training script builds (uint8 out)."""
    from ..loader.options import Decode, LoaderOptions, Workers

    decode = Decode(device=device or args.device, decoder=args.decoder, dtype="uint8", jpeg_scaling=args.jpeg_scaling,
                    hw_decoder_load=args.hw_decoder_load, num_threads=args.threads)  # fmt: skip
    return LoaderOptions(batch_size=_batch(args), seed=args.seed, rank=0, world_size=1, augment=augment,
                         decode=decode, workers=Workers(count=workers, kind=args.worker_kind), cache_dir=cache_dir)  # fmt: skip


def _batch(args: argparse.Namespace) -> Any:
    """The batch sizing the flags ask for (the command's default batch size when none is given)."""
    return batch_from_args(args, default=args.batch_default)


def _batch_words(args: argparse.Namespace) -> str:
    batch = _batch(args)
    return (
        str(batch)
        if isinstance(batch, int)
        else "sizes by bucket (" + ", ".join(f"{k}={v}" for k, v in batch.to_dict().items() if v not in (None, 1)) + ")"
    )


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()


# -- preview ---------------------------------------------------------------------------------------


def cmd_preview(args: argparse.Namespace) -> int:
    from ..loader.options import Augment, Dataset
    from ..tools.plots import contact_sheet
    from ..torch import DALIBucketIterator

    out = png_path(args.output, "-o")
    options = _options(args, augment=Augment(crop=args.crop, flip=args.flip), cache_dir=args.cache_dir,
                       workers=args.workers if args.workers is not None else 0)  # fmt: skip
    from .configs import config_datasets  # a loader config (dali_arb.toml): its datasets, buckets and captions

    datasets = config_datasets(args.manifest) or [Dataset(args.manifest, buckets=spec_from_args(args))]
    loader = DALIBucketIterator(datasets, options=options)
    from tqdm import tqdm

    loader.set_epoch(args.epoch)
    batches = []
    with tqdm(total=min(args.batches, len(loader)), unit="batch", disable=not _stderr_is_tty(), leave=False) as bar:
        for batch in loader:
            batches.append(batch)
            bar.update(1)
            if len(batches) >= args.batches:
                break
    rows = contact_sheet(batches, out)
    print(f"preview of {rows} batches written to {out}")
    if loader.failed:
        print(
            f"{len(loader.failed)} sample(s) could not be read and were replaced: {', '.join(loader.failed[:5])}",
            file=sys.stderr,
        )
    return 0


# -- bench -----------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from ..tools.bench import LOADER_NAMES as names
    from ..tools.bench import run_bench

    def say(text: str) -> None:
        if not args.json and _stderr_is_tty():
            print(text, file=sys.stderr)

    batch = _batch(args)
    result = run_bench(
        args.manifest, batch_size=batch, batches=args.batches, rounds=args.rounds, baseline=args.baseline,
        memory=args.memory, buckets=spec_from_args(args), progress=say, dtype=args.dtype, quality=args.quality,
        step_ms=args.step_ms, step_work=args.step_work,
        **_loader_settings(args),
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['images']} images, {result['batching']}, {result['batches_per_round']} batches per round, "
          f"device {result['device']}, {result['cores']} cores; {result['output']}")  # fmt: skip
    if result["step_ms"]:
        print(f"after each batch a simulated training step of {result['step_ms']} ms ({result['step_work']}); "
              "latency is the batch interval")  # fmt: skip
    print(f"{'loader':<36} {'images/s':>9} {'MP/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'wait p99':>9}")
    for key, label in names.items():
        if isinstance(result.get(key), dict):
            r = result[key]
            print(
                f"{label:<36} {r['images_per_s']:>9} {r['megapixels_per_s']:>7} {r['batch_ms_p50']:>8} "
                f"{r['batch_ms_p99']:>8} {r['wait_ms_p99']:>9}"
            )
    if "decode_ceiling" in result:
        print(f"{'decode only (the ceiling)':<36} {result['decode_ceiling']['images_per_s']:>9}")
    if "speedup_vs_same_quality" in result:
        print(f"speedup vs the strongest peer of the same quality ({names[result['same_quality_peer']]}): "
              f"{result['speedup_vs_same_quality']}x")  # fmt: skip
    for key in (
        "speedup_vs_baseline_opencv_quality",
        "speedup_vs_baseline_opencv",
        "speedup_vs_baseline_draft",
        "speedup_vs_baseline",
        "speedup_vs_torchvision",
        "thread_vs_process_workers",
        "process_vs_thread_workers",
    ):
        if key in result:
            print(f"{key.replace('_', ' ')}: {result[key]}x")
    if result.get("read_ahead_bytes"):
        where = "/dev/shm" if result["settings"]["worker_kind"] == "process" else "the loader's process memory"
        print(f"dali_arb read-ahead holds at most {result['read_ahead_bytes'] / 2**20:.0f} MiB of {where}")
    if "share_of_decode_ceiling" in result:
        print(f"share of the decode-only ceiling: {100 * result['share_of_decode_ceiling']:.0f}%")
    for key, q in result.get("quality", {}).items():
        if isinstance(q, dict):
            print(f"PSNR {names.get(key, key)}: worst {q['worst_db']} dB, median {q['median_db']} dB")
    if "planner_and_source_overhead" in result:
        print(f"planner and external source cost: {100 * result['planner_and_source_overhead']:.1f}% of throughput")
    if "gpu_memory" in result:
        print(f"GPU memory used: {result['gpu_memory']}")
    return 0


# -- demo ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.manifest import Manifest
    from ..index import build_index
    from ..loader.options import Augment, Dataset
    from ..loader.pipeline import resolve_device
    from ..tools.plots import contact_sheet, plot_buckets
    from ..tools.report import bucket_report, format_report
    from ..torch import DALIBucketIterator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    manifest_path = out / "samples.parquet"
    print(f"1. index: {SAMPLES}")
    summary = build_index([str(SAMPLES)], manifest_path, progress=False)
    print(f"   {summary.line()}")
    manifest = Manifest.read(manifest_path)
    spec = spec_from_args(args)
    report = bucket_report(manifest.heights, manifest.widths, spec, batch_size=_batch(args), keys=manifest.keys_at)
    print("\n2. buckets (dali-arb buckets):\n")
    print("   " + format_report(report).replace("\n", "\n   "))
    plot_path = out / "buckets.png"
    plot_buckets(report, plot_path)
    options = _options(args, augment=Augment(flip=0.5), device=device, workers=args.workers)
    loader = DALIBucketIterator([Dataset(manifest, buckets=spec)], options=options)
    print(
        f"\n3. one epoch through DALIBucketIterator on {device.upper()}: {len(loader)} batches of {_batch_words(args)}"
    )
    batches = []
    start = time.perf_counter()
    with tqdm(total=len(loader), unit="batch", disable=not _stderr_is_tty(), leave=False) as bar:
        for batch in loader:
            batches.append(batch)
            bar.update(1)
    seconds = time.perf_counter() - start
    images = sum(len(b["ids"]) for b in batches)
    pixels = sum(len(b["ids"]) * b["target_size"][0] * b["target_size"][1] for b in batches)
    for b in batches:
        h, w = b["target_size"]
        print(f"   step {b['step']}: {w}x{h}  {', '.join(b['ids'])}")
    print(f"   {images} images in {seconds:.2f} s including pipeline start-up: {images / seconds:.1f} images/s, "
          f"{pixels / seconds / 1e6:.2f} megapixels/s")  # fmt: skip
    preview_path = out / "preview.png"
    contact_sheet(batches, preview_path)
    print("\n4. pictures:")
    print(f"   bucket histogram: {plot_path}")
    print(f"   contact sheet of the batches as the loader made them: {preview_path}")
    print("\nNext: dali-arb index YOUR_FOLDER -o manifest.parquet, then see README.md for the training loop.")
    return 0


def register(sub: argparse._SubParsersAction, fmt: type) -> None:
    """Add preview, bench and demo to the ``dali-arb`` parser."""
    p = sub.add_parser(
        "preview", help="contact sheet of the first batches as the loader makes them", formatter_class=fmt,
        description="Run the loader and draw its first batches after decode, resize and crop, one row per batch, "
                    "labelled with bucket and keys. The way to check crops and orientation by eye.",
        epilog="examples:\n  dali-arb preview photos.parquet -o preview.png\n"
               "  dali-arb preview photos.parquet -o preview.png --batches 12 --flip 0.5 --device cpu\n",
    )  # fmt: skip
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="where to write the contact sheet")
    p.add_argument("--batches", type=positive_int, default=8, help="batches to draw (default 8)")
    p.add_argument("--crop", choices=["random", "center"], default="random", help="crop placement (default random)")
    p.add_argument("--flip", type=probability, default=0.0, help="probability of a horizontal flip (default 0)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--epoch", type=non_negative_int, default=0)
    _add_loader_options(p, batch_default=4)
    add_bucket_options(p)
    add_cache_option(p)
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser(
        "bench", help="loader throughput, optionally against the peers users would write", formatter_class=fmt,
        description="Time the loader (images/s, megapixels/s of output, batch latency p50/p99) on a manifest; "
                    "--baseline adds PyTorch DataLoaders with OpenCV (at the loader's quality, and at the largest "
                    "DCT reduction), Pillow draft and Pillow (and torchvision where installed) on the same plan and "
                    "output, the decode-only ceiling, the loader with its workers of the other kind (threads or "
                    "processes), and the speed-up against the OpenCV peer of the same quality.",
        epilog="examples:\n  dali-arb bench photos.parquet --device cpu --baseline --quality\n"
               "  dali-arb bench photos.parquet --device cpu --baseline --jpeg-scaling fast\n"
               "  dali-arb bench photos.parquet --device gpu --baseline --memory --json > bench.json\n",
    )  # fmt: skip
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--batches", type=positive_int, default=32, help="timed batches per round (default 32)")
    p.add_argument(
        "--rounds", type=positive_int, default=3, help="alternating rounds; the median is reported (default 3)"
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also time the peers on the same plan and output (DataLoader + OpenCV reduced decode, + Pillow draft, "
        "+ Pillow; torchvision where installed), the decode-only ceiling, and the loader with the other --worker-kind",
    )
    p.add_argument(
        "--dtype", choices=["float16", "uint8"], default="float16", help="output of every loader (default float16)"
    )
    p.add_argument(
        "--quality", action="store_true", help="also report PSNR against a full-resolution antialiased reference"
    )
    p.add_argument(
        "--step-ms",
        type=non_negative_float,
        default=0.0,
        help="simulated training step after each batch, in ms: shows the pace when the loader is ahead",
    )
    p.add_argument(
        "--step-work",
        choices=["sleep", "torch", "python"],
        default="sleep",
        help="what that step does: sleep (default: the CPU is free, as while a GPU computes), torch (small CPU "
        "tensor ops, as a loop dispatching kernels; the GIL is released inside each op) or python (pure Python "
        "holding the GIL: the worst case for worker threads)",
    )
    p.add_argument("--memory", action="store_true", help="also time the same DALI pipeline fed from memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_loader_options(p, batch_default=8)
    add_bucket_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "demo", help="the whole job on the sample photographs", formatter_class=fmt,
        description="Index the sample photographs that ship with dali_arb, print the bucket report, run one epoch "
                    "through DALIBucketIterator (GPU if there is one, else CPU) and draw the batches.",
        epilog="examples:\n  dali-arb demo\n  dali-arb demo --out /tmp/demo --device cpu\n",
    )  # fmt: skip
    p.add_argument(
        "--out",
        default="dali-arb-demo",
        metavar="DIR",
        help="where the manifest and pictures go (default ./dali-arb-demo)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    _add_loader_options(p, batch_default=2)
    add_bucket_options(p)
    p.set_defaults(func=cmd_demo)
