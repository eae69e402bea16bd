"""Loader throughput, side by side in one run: dali_arb against what trainers otherwise run.

Loaders, all on the same manifest, the same plan (batches and buckets) and the same output
(centre crop, float16 in [-1, 1], NCHW):

- ``dali_arb``: :class:`DALIBucketIterator` (``cpu`` or ``gpu``);
- ``pillow``: a PyTorch ``DataLoader`` whose workers decode with Pillow, resize to cover (bilinear)
  and crop: what kohya sd-scripts and SimpleTuner effectively run;
- ``pillow_draft``: the same with ``Image.draft()``, letting libjpeg-turbo decode at 1/2, 1/4 or 1/8
  scale when the image is much larger than its bucket;
- ``opencv``: ``cv2.imdecode`` at the largest DCT reduction covering the bucket, ``INTER_AREA`` (the
  fastest CPU peer, compared with ``jpeg_scaling="fast"``), and ``opencv_quality``: the same reducing only
  while the image keeps 3x the bucket (full-resolution quality: the peer for the default
  ``jpeg_scaling="quality"``);
- ``torchvision``: what a user writes for the GPU without DALI: a ``DataLoader`` whose workers read
  the bytes of each planned batch, then batched ``torchvision.io.decode_jpeg(..., device=...)``
  (nvJPEG on GPU), ``resize`` with antialias to cover, centre crop (needs torchvision);
- ``memory``: the DALI-decoder pipeline fed from memory (bytes and parameters prepared before),
  against ``loader_dali_decoder`` (the loader with ``decoder="dali"``), to measure what planning
  and reading cost.

Rounds alternate between loaders after a warm-up; the median round is reported.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data.imagefacts import swaps_sides
from ..data.manifest import Manifest
from ..errors import ConfigError
from ..loader.decoders import DaliDecoder, jpeg_reduction, opencv_flags, reduction_margin
from ..loader.planning import LoaderConfig
from ..loader.source import BatchSource
from ..plan.buckets import BucketSpec
from ..plan.geometry import cover_crop
from ..plan.planner import Planner
from ..plan.world import World

__all__ = ["make_photo_jpegs", "run_bench"]

#: The peers' DataLoader workers start by spawning: forking a process in which DALI's threads already run
#: (the loader under test warms up first) can deadlock the child on a lock one of those threads held.
PEER_START_METHOD = "spawn"
#: The CPU peers, by result key: the ``PeerBatches`` method each runs.
PEERS = {"baseline": "pillow", "baseline_draft": "pillow_draft", "baseline_opencv": "opencv",
         "baseline_opencv_quality": "opencv_quality"}  # fmt: skip
#: the peer that decodes as ``jpeg_scaling`` does: the strongest one producing output of the same quality
SAME_QUALITY_PEER = {"quality": "baseline_opencv_quality", "fast": "baseline_opencv"}


# -- images ----------------------------------------------------------------------------------------


def make_photo_jpegs(
    folder: str | os.PathLike, count: int, *, min_mp: float = 0.8, max_mp: float = 3.0, seed: int = 0
) -> list[Path]:
    """``count`` JPEGs of ``min_mp``..``max_mp`` megapixels and varied aspect ratios, tiled from the
    real photographs shipped in ``dali_arb/samples`` at their native scale (photo statistics, not noise)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples_dir = Path(__file__).parent.parent / "samples"
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(samples_dir.glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        aspect = float(np.clip(np.exp(rng.normal(0, 0.45)), 1 / 3, 3))
        pixels = rng.uniform(min_mp, max_mp) * 1e6
        w, h = int(np.sqrt(pixels * aspect)), int(np.sqrt(pixels / aspect))
        canvas = np.empty((h, w, 3), np.uint8)
        y = 0
        while y < h:
            tile_h = int(rng.integers(200, 420))
            x = 0
            while x < w:
                photo = photos[int(rng.integers(len(photos)))]
                tile_w = int(rng.integers(200, 420))
                th, tw = min(tile_h, h - y, photo.shape[0]), min(tile_w, w - x, photo.shape[1])
                py, px = int(rng.integers(0, photo.shape[0] - th + 1)), int(rng.integers(0, photo.shape[1] - tw + 1))
                tile = photo[py : py + th, px : px + tw]
                canvas[y : y + th, x : x + tw] = tile[:, ::-1] if rng.random() < 0.5 else tile
                x += tw
            y += min(tile_h, h - y)
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(canvas).save(path, quality=90)
        paths.append(path)
    return paths


# -- the Pillow baseline ---------------------------------------------------------------------------


@functools.cache
def _one_opencv_thread_per_worker() -> None:
    """In a peer's DataLoader worker process, one OpenCV thread (as a good user's ``worker_init_fn`` sets it, and
    as dali_arb's workers run): every worker's own pool of a thread per core would oversubscribe the cores."""
    import multiprocessing

    import cv2

    if multiprocessing.parent_process() is not None:
        cv2.setNumThreads(1)


class PeerBatches:
    """Map-style dataset of whole planned batches, as a user writes it with well-kept libraries
    (picklable): ``method`` ``"pillow"`` (decode, resize to cover with antialiased bilinear, crop),
    ``"pillow_draft"`` (the same after ``draft()``: libjpeg-turbo decodes at 1/2..1/8 scale), or
    ``"opencv"`` (``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_2/4/8`` at the largest reduction that still
    covers the bucket, ``cv2.resize`` with ``INTER_AREA`` when shrinking by 2x or more, else linear, crop),
    or ``"opencv_quality"`` (reducing only while the image keeps ``QUALITY_MARGIN`` times the resize, as
    ``jpeg_scaling="quality"``, and ``INTER_AREA`` for every shrink, as kohya's sd-scripts resizes: the
    quality of a full-resolution antialiased resize).
    Centre crop; output ``[B, 3, H, W]`` uint8, or float16 in [-1, 1] normalised in the worker."""

    def __init__(self, sources: list[str], heights: np.ndarray, widths: np.ndarray, rows: np.ndarray,
                 sizes: np.ndarray, *, method: str, dtype: str = "float16") -> None:  # fmt: skip
        self.sources, self.heights, self.widths = sources, heights, widths
        self.rows, self.sizes, self.method, self.dtype = (
            rows,
            sizes,
            method,
            dtype,
        )  # rows: (steps, B); sizes: (steps, 2)

    def __len__(self) -> int:
        return len(self.rows)

    def reduced_flag(self, row: int, bh: int, bw: int) -> int:
        """The ``cv2.imdecode`` flag (BGR, as users write it) at the largest reduction covering the bucket."""
        h, w = int(self.heights[row]), int(self.widths[row])
        rh, rw, _, _ = cover_crop(h, w, bh, bw, 0.0, 0.0, center=True)
        margin = reduction_margin("quality" if self.method == "opencv_quality" else "fast")
        return opencv_flags(rgb=False)[0][jpeg_reduction(h, w, rh, rw, margin=margin)]

    def image(self, row: int, bh: int, bw: int) -> np.ndarray:
        """One sample, ``uint8 (bh, bw, 3)``."""
        if self.method in ("opencv", "opencv_quality"):
            import cv2

            _one_opencv_thread_per_worker()
            img = cv2.imdecode(np.fromfile(self.sources[row], np.uint8), self.reduced_flag(row, bh, bw))
            rh, rw, top, left = cover_crop(img.shape[0], img.shape[1], bh, bw, 0.0, 0.0, center=True)
            # the fast peer area-averages from 2x (as the user wrote it); the quality peer whenever it
            # shrinks, as kohya's sd-scripts does: bilinear below 2x aliases (27.9 dB worst, RESULTS.md)
            shrink = img.shape[0] / rh >= (1.0 if self.method == "opencv_quality" else 2.0) and img.shape[0] > rh
            img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            return cv2.cvtColor(img[top : top + bh, left : left + bw], cv2.COLOR_BGR2RGB)
        from PIL import Image, ImageOps

        with Image.open(self.sources[row]) as img:
            if self.method == "pillow_draft":
                h, w = int(self.heights[row]), int(self.widths[row])
                rh, rw, _, _ = cover_crop(h, w, bh, bw, 0.0, 0.0, center=True)
                img.draft("RGB", (rh, rw) if swaps_sides(img) else (rw, rh))
            img = ImageOps.exif_transpose(img).convert("RGB")
            rh, rw, top, left = cover_crop(img.height, img.width, bh, bw, 0.0, 0.0, center=True)
            return np.asarray(img.resize((rw, rh), Image.BILINEAR).crop((left, top, left + bw, top + bh)))

    def __getitem__(self, step: int):
        import torch

        bh, bw = (int(v) for v in self.sizes[step])
        out = torch.from_numpy(np.stack([self.image(row, bh, bw) for row in self.rows[step]])).permute(0, 3, 1, 2)
        if self.dtype == "uint8":
            return out.contiguous()
        return ((out.to(torch.float32) - 127.5) / 127.5).to(torch.float16)


class DecodeOnly(PeerBatches):
    """The physical limit of CPU decoding for these images and buckets: each batch's JPEGs decoded at the
    reduction the bucket allows (``cv2.IMREAD_REDUCED_*``; ``method`` ``"opencv"`` or ``"opencv_quality"``
    as in :class:`PeerBatches`), nothing else; returns the batch's image count."""

    def __getitem__(self, step: int):
        import cv2

        bh, bw = (int(v) for v in self.sizes[step])
        for row in self.rows[step]:
            cv2.imdecode(np.fromfile(self.sources[row], np.uint8), self.reduced_flag(row, bh, bw))
        return len(self.rows[step])


def reference_image(path: str, bh: int, bw: int) -> np.ndarray:
    """The quality reference: full-resolution decode, EXIF-upright, antialiased bilinear resize to cover
    (Pillow), centre crop: ``uint8 (bh, bw, 3)``."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        rh, rw, top, left = cover_crop(img.height, img.width, bh, bw, 0.0, 0.0, center=True)
        return np.asarray(
            img.resize((rw, rh), Image.BILINEAR, reducing_gap=None).crop((left, top, left + bw, top + bh))
        )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


class EncodedBatches:
    """Map-style dataset of whole planned batches as encoded bytes (``uint8 (n,)`` tensors), for peers
    that decode in the main process (picklable)."""

    def __init__(self, sources: list[str], rows: np.ndarray) -> None:
        self.sources, self.rows = sources, rows  # rows: (steps, B)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, step: int):
        import torch

        out = []
        for row in self.rows[step]:
            with open(self.sources[row], "rb") as fh:
                out.append(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
        return out


def torchvision_batch(encoded: list, bucket: tuple[int, int], device: str):
    """Batched ``decode_jpeg`` on ``device`` (EXIF applied), antialiased bilinear resize to cover the
    bucket, centre crop, float16 in [-1, 1]: ``[B, 3, H, W]``."""
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    bh, bw = bucket
    images = decode_jpeg(encoded, device=device, apply_exif_orientation=True)
    out = torch.empty((len(images), 3, bh, bw), dtype=torch.float16, device=device)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        rh, rw, top, left = cover_crop(int(h), int(w), bh, bw, 0.0, 0.0, center=True)
        resized = F.resize(img, [rh, rw], antialias=True)
        out[i] = (resized[:, top : top + bh, left : left + bw].to(torch.float32) - 127.5) / 127.5
    return out


# -- timing ------------------------------------------------------------------------------------------


#: What each entry of a :func:`run_bench` result that timed a loader is, in words, in the order reports list them.
LOADER_NAMES = {
    "loader": "dali_arb",
    "baseline_opencv_quality": "DataLoader + OpenCV, quality scaling",
    "baseline_opencv": "DataLoader + OpenCV reduced decode",
    "baseline_draft": "DataLoader + Pillow draft",
    "baseline": "DataLoader + Pillow",
    "loader_process_workers": "dali_arb, worker processes",
    "loader_thread_workers": "dali_arb, worker threads",
    "torchvision": "DataLoader + torchvision decode_jpeg",
    "loader_dali_decoder": "dali_arb, decoder=dali",
    "memory": "decoder=dali pipeline fed from memory",
}


#: What a simulated training step does (``step_work``): ``sleep`` leaves the CPU free, as while a GPU computes;
#: ``torch`` dispatches small CPU tensor ops, as a loop launching kernels does (PyTorch releases the GIL inside
#: each op); ``python`` runs pure Python, holding the GIL throughout: the worst case for thread workers.
STEP_WORKS = ("sleep", "torch", "python")


def simulated_step(seconds: float, work: str = "sleep") -> None:
    """Spend ``seconds`` as a training step of kind ``work`` (:data:`STEP_WORKS`) would."""
    if work == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    if work == "torch":
        import torch

        x, w = torch.ones(32, 32), torch.full((32, 32), 1 / 32)
        while time.perf_counter() < end:  # one op per check: the step ends on time however slow the ops run
            x = torch.tanh(x @ w + 0.1)
        return
    total = 0
    while time.perf_counter() < end:
        for i in range(256):
            total += i * i


def _time(
    batches: Iterator[Any], count: int, pixels_of: Callable[[Any], int], step_s: float = 0.0, work: str = "sleep"
) -> dict[str, Any]:
    """Take ``count`` batches, each after a simulated training step of ``step_s`` seconds (of kind ``work``:
    :func:`simulated_step`). Records the interval between batches and the wait inside ``next()``."""
    latencies, waits, pixels = [], [], 0
    start = last = time.perf_counter()
    for _ in range(count):
        if step_s:  # the training step on the batch before (the warm-up's last one, at first)
            simulated_step(step_s, work)
        asked = time.perf_counter()
        batch = next(batches)
        pixels += pixels_of(batch)
        now = time.perf_counter()
        waits.append(now - asked)
        latencies.append(now - last)
        last = now
    total = last - start
    return {"seconds": total, "latencies": latencies, "waits": waits, "pixels": pixels}


def _summary(runs: list[dict], batch_size: int) -> dict[str, float]:
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    lat = np.array(median["latencies"]) * 1000
    n = len(median["latencies"])
    return {
        "images_per_s": round(n * batch_size / median["seconds"], 1),
        "megapixels_per_s": round(median["pixels"] / median["seconds"] / 1e6, 2),
        "batch_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "batch_ms_p99": round(float(np.percentile(lat, 99)), 1),
        "wait_ms_p50": round(float(np.percentile(np.array(median["waits"]) * 1000, 50)), 1),
        "wait_ms_p99": round(float(np.percentile(np.array(median["waits"]) * 1000, 99)), 1),
        "rounds": len(runs),
    }


def run_bench(
    manifest: str | os.PathLike,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    batches: int = 32,
    warmup: int = 4,
    rounds: int = 3,
    baseline: bool = False,
    memory: bool = False,
    workers: int | None = None,
    worker_kind: str = "thread",
    decoder: str = "auto",
    num_threads: int | None = None,
    hw_decoder_load: float | None = None,
    jpeg_scaling: str | None = None,
    buckets: BucketSpec | None = None,
    dtype: str = "float16",
    quality: bool = False,
    step_ms: float = 0.0,
    step_work: str = "sleep",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time dali_arb (and, with ``baseline``, the peers and the decode-only ceiling; with ``memory``, DALI
    fed from memory) on ``batches`` batches per round, all with output ``dtype`` (``"float16"`` in [-1, 1]
    or ``"uint8"``), centre crop. Returns ``{"loader": {...}, "baseline": {...}, ...}`` with
    ``images_per_s``, ``megapixels_per_s`` (output pixels), ``batch_ms_p50``/``p99``, plus ratios; with
    ``quality``, each loader's worst and median PSNR against a full-resolution antialiased reference over
    one batch of every bucket. ``step_ms`` adds a simulated training step after each batch: batch
    intervals then show whether a loader that is ahead of consumption keeps a steady pace (p99 vs p50),
    and ``read_ahead_bytes`` says what the loader's prefetch holds in memory for it; ``step_work`` says what that
    step does (:data:`STEP_WORKS`). ``jpeg_scaling`` goes to the loader; ``speedup_vs_same_quality`` compares it
    with the peer that decodes at the same scale. With ``baseline``, the loader also runs with its workers of the
    other ``worker_kind`` (``loader_process_workers`` or ``loader_thread_workers``)."""
    import torch

    from ..loader.pipeline import build_pipeline, resolve_device
    from ..loader.workers import check_worker_kind
    from ..torch import DALIBucketIterator

    device = resolve_device(device)
    check_worker_kind(worker_kind)
    if step_work not in STEP_WORKS:
        raise ConfigError(f"step_work must be one of {', '.join(STEP_WORKS)}, got {step_work!r}")
    spec = buckets or BucketSpec()
    m = Manifest.read(manifest, columns=["source", "offset", "length", "caption"])
    if baseline or quality or memory:
        from ..loader.source import has_urls

        if has_urls(m):
            raise ConfigError(
                f"--baseline, --quality and --memory compare peers that read local files, and the samples of {manifest} "
                "are in object storage; run them on a manifest of local copies (bench alone measures the loader)"
            )
    cores = os.cpu_count() or 1
    scaling = jpeg_scaling or "quality"
    reduction_margin(scaling)  # (a bad value stops here, before any loader starts)
    planner = Planner(spec.assign(m.heights, m.widths), batch_size=batch_size, world=World())
    plan = planner.epoch(0)  # every loader runs on through the epochs as long as the timing needs

    def cycle(factory: Callable[[], Any]) -> Iterator[Any]:
        while True:
            yield from factory()

    def ours(chosen: str = decoder, kind: str = worker_kind) -> Callable[[], Iterator[Any]]:
        def make() -> Iterator[Any]:
            it = DALIBucketIterator(
                m, batch_size=batch_size, buckets=spec, device=device, crop="center", workers=workers,
                worker_kind=kind, rank=0, world_size=1, decoder=chosen, num_threads=num_threads, hw_decoder_load=hw_decoder_load,
                dtype=dtype, jpeg_scaling=jpeg_scaling if chosen != "dali" else None,
            )  # fmt: skip
            read_ahead.setdefault(chosen, it.read_ahead_bytes())
            return cycle(lambda: it)

        return make

    def sync(batch: Any) -> int:
        if isinstance(batch, int):  # the decode-only ceiling counts images, makes none
            return 0
        images = batch["images"] if isinstance(batch, dict) else batch
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        return int(images.shape[0] * images.shape[2] * images.shape[3])

    read_ahead: dict[str, int] = {}
    loaders: dict[str, Callable[[], Iterator[Any]]] = {"loader": ours()}
    other_kind = "process" if worker_kind == "thread" else "thread"
    if baseline:
        loaders[f"loader_{other_kind}_workers"] = ours(kind=other_kind)
        sources = m.table.column("source").to_pylist()
        sizes = plan.sizes[plan.bucket]

        def peer(dataset: Any) -> Callable[[], Iterator[Any]]:
            def make() -> Iterator[Any]:
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=None, shuffle=False, num_workers=cores, prefetch_factor=2,
                    persistent_workers=True, multiprocessing_context=PEER_START_METHOD,
                )  # fmt: skip
                return cycle(lambda: loader)

            return make

        for key, method in PEERS.items():
            loaders[key] = peer(PeerBatches(sources, m.heights, m.widths, plan.rows, sizes, method=method, dtype=dtype))
        ceiling = PEERS[SAME_QUALITY_PEER[scaling]]  # decoding at the loader's own scale
        loaders["decode_ceiling"] = peer(DecodeOnly(sources, m.heights, m.widths, plan.rows, sizes, method=ceiling))
        if _has_torchvision():
            torch_device = "cuda" if device == "gpu" else "cpu"

            def torchvision_peer() -> Iterator[Any]:
                dataset = EncodedBatches(sources, plan.rows)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=None, shuffle=False, num_workers=min(4, cores), prefetch_factor=4,
                    persistent_workers=True, multiprocessing_context=PEER_START_METHOD,
                )  # fmt: skip

                def run() -> Iterator[Any]:
                    while True:
                        for step, encoded in enumerate(loader):
                            yield torchvision_batch(encoded, tuple(int(v) for v in sizes[step]), torch_device)

                return run()

            loaders["torchvision"] = torchvision_peer
    if memory:
        config = LoaderConfig(
            batch_size=batch_size,
            spec=spec,
            seed=0,
            rank=0,
            world_size=1,
            leftover="nearest",
            sync_ranks=True,
            crop="center",
            flip=0.0,
        )
        memory_decoder = DaliDecoder()
        prepared = BatchSource(m, config, memory_decoder)
        replay = _Replay([prepared.batch(0, s) for s in range(min(len(plan), warmup + batches))])

        def from_memory() -> Iterator[Any]:
            pipe = build_pipeline(
                replay,
                decoder=memory_decoder,
                batch_size=batch_size,
                device=device,
                device_id=0 if device == "gpu" else None,
                dtype="float16",
                num_threads=memory_decoder.default_threads(os.cpu_count() or 1, gpu=device == "gpu"),
                workers=0,
            )

            def run() -> Iterator[Any]:
                while True:
                    images, _ = pipe.run()
                    yield torch.from_dlpack(images.as_tensor())

            return run()

        if device == "cpu":  # on the CPU the loader decodes in its workers: compare the DALI decoder
            loaders["loader_dali_decoder"] = ours("dali")
        loaders["memory"] = from_memory

    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    streams = {name: make() for name, make in loaders.items()}
    for name, stream in streams.items():  # start every loader (workers, pipelines) and warm it up
        if progress:
            progress(f"warm-up: {name}")
        for _ in range(warmup):
            sync(next(stream))
    gpu_memory = {}
    if device == "gpu":
        gpu_memory["after_warmup_mb"] = _gpu_used_mb()
    for r in range(rounds):
        for name, stream in streams.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}")
            step_s = step_ms / 1000 if name != "decode_ceiling" else 0.0
            runs[name].append(_time(stream, batches, sync, step_s, step_work))
    result: dict[str, Any] = {
        "device": device,
        "settings": {
            "decoder": decoder,
            "workers": workers,
            "worker_kind": worker_kind,
            "num_threads": num_threads,
            "hw_decoder_load": hw_decoder_load,
            "jpeg_scaling": jpeg_scaling,
        },
        "batch_size": batch_size,
        "batches_per_round": batches,
        "images": len(m),
        "cores": cores,
        "output": f"centre crop, {dtype} NCHW" + (" in [-1, 1]" if dtype != "uint8" else " (0..255)"),
    }
    for name in loaders:
        result[name] = _summary(runs[name], batch_size)
    result["step_ms"] = step_ms
    result["step_work"] = step_work
    result["read_ahead_bytes"] = read_ahead.get(decoder)
    if "decode_ceiling" in result:
        for key in ("megapixels_per_s", "batch_ms_p50", "batch_ms_p99", "wait_ms_p50", "wait_ms_p99"):
            result["decode_ceiling"].pop(key)  # it makes no output
    ours_rate = result["loader"]["images_per_s"]
    if baseline:
        for key in PEERS:
            result[f"speedup_vs_{key}"] = round(ours_rate / result[key]["images_per_s"], 2)
        result["same_quality_peer"] = SAME_QUALITY_PEER[scaling]
        result["speedup_vs_same_quality"] = result[f"speedup_vs_{SAME_QUALITY_PEER[scaling]}"]
        result["share_of_decode_ceiling"] = round(ours_rate / result["decode_ceiling"]["images_per_s"], 3)
        other = result[f"loader_{other_kind}_workers"]["images_per_s"]
        result[f"{worker_kind}_vs_{other_kind}_workers"] = round(ours_rate / other, 2)
        if "torchvision" in result:
            result["speedup_vs_torchvision"] = round(ours_rate / result["torchvision"]["images_per_s"], 2)
        else:
            result["torchvision"] = "not installed (pip install torchvision to compare)"
    if memory:
        same_decoder = result.get("loader_dali_decoder", result["loader"])["images_per_s"]
        result["planner_and_source_overhead"] = round(1 - same_decoder / result["memory"]["images_per_s"], 3)
    if device == "gpu":
        gpu_memory["after_run_mb"] = _gpu_used_mb()
        result["gpu_memory"] = gpu_memory
    if quality:
        result["quality"] = _quality(m, spec, plan, decoder, device, baseline, jpeg_scaling)
    return result


def _quality(
    m: Manifest, spec: BucketSpec, plan: Any, decoder: str, device: str, peers: bool, jpeg_scaling: str | None = None
) -> dict[str, Any]:
    """Worst and median PSNR (dB) of each loader's uint8 output against :func:`reference_image`, over the
    first batch of every bucket in the plan."""
    from ..torch import DALIBucketIterator

    sources = m.table.column("source").to_pylist()
    first_step = {int(b): i for i, b in reversed(list(enumerate(plan.bucket.tolist())))}
    steps = sorted(first_step.values())
    sizes = plan.sizes[plan.bucket]
    references = {
        (int(row), step): reference_image(sources[row], *(int(v) for v in sizes[step]))
        for step in steps
        for row in plan.rows[step]
    }
    scores: dict[str, list[float]] = {"loader": []}
    it = DALIBucketIterator(m, batch_size=plan.batch_size, buckets=spec, device=device, crop="center", workers=0,
                            rank=0, world_size=1, decoder=decoder, dtype="uint8",
                            jpeg_scaling=jpeg_scaling if decoder != "dali" else None)  # fmt: skip
    for batch in it:
        if batch["step"] in first_step.values():
            for i, row in enumerate(plan.rows[batch["step"]]):
                ours = batch["images"][i].permute(1, 2, 0).cpu().numpy()
                scores["loader"].append(psnr(ours, references[(int(row), batch["step"])]))
    if peers:
        for key, method in PEERS.items():
            dataset = PeerBatches(sources, m.heights, m.widths, plan.rows, sizes, method=method, dtype="uint8")
            scores[key] = [
                psnr(dataset[step][i].permute(1, 2, 0).numpy(), references[(int(row), step)])
                for step in steps
                for i, row in enumerate(plan.rows[step])
            ]
    return {
        "reference": "full-resolution decode, antialiased bilinear resize (Pillow), centre crop",
        "buckets": len(steps),
        "images": len(scores["loader"]),
        **{k: {"worst_db": round(min(v), 2), "median_db": round(float(np.median(v)), 2)} for k, v in scores.items()},
    }


def _has_torchvision() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # absent, or built for another torch
        return False
    return True


class _Replay:
    """External source that replays prepared batches (the "fed from memory" pipeline)."""

    def __init__(self, batches: list[tuple]) -> None:
        self.batches = batches

    def __call__(self, info) -> tuple:
        return self.batches[info.iteration % len(self.batches)]


def _gpu_used_mb() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**20, 1)
