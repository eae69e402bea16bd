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

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.manifest import Manifest
from ..errors import ConfigError
from ..loader.decoders import DaliDecoder, reduction_margin
from ..loader.planning import LoaderConfig
from ..loader.source import BatchSource
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec
from ..plan.planner import make_planner
from ..plan.world import World
from .peers import (
    PEER_START_METHOD,
    PEERS,
    SAME_QUALITY_PEER,
    DecodeOnly,
    EncodedBatches,
    PeerBatches,
    has_torchvision,
    torchvision_batch,
)
from .photos import psnr, reference_image

__all__ = ["LOADER_NAMES", "STEP_WORKS", "run_bench", "simulated_step"]


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
    batches: Iterator[Any],
    count: int,
    pixels_of: Callable[[Any], tuple[int, int]],
    step_s: float = 0.0,
    work: str = "sleep",
) -> dict[str, Any]:
    """Take ``count`` batches, each after a simulated training step of ``step_s`` seconds (of kind ``work``:
    :func:`simulated_step`). Records the interval between batches, the wait inside ``next()`` and the images and
    output pixels served (``pixels_of(batch)``: ``(images, pixels)``; batches differ in size under a budget)."""
    latencies, waits, pixels, images = [], [], 0, 0
    start = last = time.perf_counter()
    for _ in range(count):
        if step_s:  # the training step on the batch before (the warm-up's last one, at first)
            simulated_step(step_s, work)
        asked = time.perf_counter()
        batch = next(batches)
        counted, batch_pixels = pixels_of(batch)
        images += counted
        pixels += batch_pixels
        now = time.perf_counter()
        waits.append(now - asked)
        latencies.append(now - last)
        last = now
    total = last - start
    return {"seconds": total, "latencies": latencies, "waits": waits, "pixels": pixels, "images": images}


def _summary(runs: list[dict]) -> dict[str, float]:
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    lat = np.array(median["latencies"]) * 1000
    return {
        "images_per_s": round(median["images"] / median["seconds"], 1),
        "images_per_round": median["images"],
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
    batch_size: int | BatchSizing = 8,
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
    fed from memory) on ``batches`` batches per round of the same plan (``batch_size``: one size, or a
    :class:`~dali_arb.plan.batching.BatchSizing` budget or table: every loader serves the plan's batches), all with
    output ``dtype`` (``"float16"`` in [-1, 1]
    or ``"uint8"``), centre crop. Returns ``{"loader": {...}, "baseline": {...}, ...}`` with
    ``images_per_s``, ``megapixels_per_s`` (output pixels), ``batch_ms_p50``/``p99``, plus ratios; with
    ``quality``, each loader's worst and median PSNR against a full-resolution antialiased reference over
    one batch of every bucket. ``step_ms`` adds a simulated training step after each batch: batch
    intervals then show whether a loader that is ahead of consumption keeps a steady pace (p99 vs p50),
    and ``read_ahead_bytes`` says what the loader's prefetch holds in memory for it; ``step_work`` says what that
    step does (:data:`STEP_WORKS`). ``jpeg_scaling`` goes to the loader; ``speedup_vs_same_quality`` compares it
    with the peer that decodes at the same scale. With ``baseline``, the loader also runs with its workers of the
    other ``worker_kind`` (``loader_process_workers`` or ``loader_thread_workers``)."""
    from ..loader.pipeline import resolve_device
    from ..loader.workers import check_worker_kind

    device = resolve_device(device)
    check_worker_kind(worker_kind)
    if step_work not in STEP_WORKS:
        raise ConfigError(f"step_work must be one of {', '.join(STEP_WORKS)}, got {step_work!r}")
    spec = buckets or BucketSpec()
    m = Manifest.read(manifest, columns=["source", "offset", "length", "caption"])
    if baseline or quality or memory:
        _check_local(m, manifest)
    reduction_margin(jpeg_scaling or "quality")  # (a bad value stops here, before any loader starts)
    planner = make_planner(
        [spec.assign(m.heights, m.widths)], [spec], batch_size=batch_size, world=World(), leftover="nearest"
    )  # every loader it times serves this plan: leftover="nearest" (never the loader's default, auto)
    bench = _Bench(m, spec, planner.epoch(0), device, batch_size, workers, worker_kind, decoder, num_threads,
                   hw_decoder_load, jpeg_scaling, dtype, warmup + batches)  # fmt: skip
    loaders = bench.loaders(baseline=baseline, memory=memory)
    runs, gpu_memory = _time_loaders(loaders, warmup, rounds, batches, step_ms, step_work, device, progress)
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
        "batch_size": batch_size if isinstance(batch_size, int) else planner.epoch(0).max_batch,
        "batching": _batching_words(batch_size),
        "batches_per_round": batches,
        "images": len(m),
        "cores": _cores(),
        "output": f"centre crop, {dtype} NCHW" + (" in [-1, 1]" if dtype != "uint8" else " (0..255)"),
    }
    for name in loaders:
        result[name] = _summary(runs[name])
    result["step_ms"] = step_ms
    result["step_work"] = step_work
    result["read_ahead_bytes"] = bench.read_ahead.get(decoder)
    _add_ratios(result, baseline=baseline, memory=memory, worker_kind=worker_kind, scaling=bench.scaling)
    if device == "gpu":
        gpu_memory["after_run_mb"] = _gpu_used_mb()
        result["gpu_memory"] = gpu_memory
    if quality:
        result["quality"] = _quality(m, spec, bench.plan, batch_size, decoder, device, baseline, jpeg_scaling)
    return result


def step_rows(plan: Any) -> list[np.ndarray]:
    """``[int64 (B_i,)]``: the rows of each step of an :class:`~dali_arb.plan.planner.EpochPlan` (steps differ in
    size under a pixel budget or a table)."""
    return np.split(plan.flat_rows, plan.row_offsets[1:-1])


def _batching_words(batch_size: int | BatchSizing) -> str:
    """How the bench's batches are sized, in words (``"16 images"``, or the budget's description)."""
    if isinstance(batch_size, int) or batch_size.fixed is not None:
        return f"{batch_size if isinstance(batch_size, int) else batch_size.fixed} images per batch"
    if batch_size.batch_sizes is not None:
        return f"a table of {len(batch_size.batch_sizes)} bucket batch sizes"
    words = f"a budget of {batch_size.batch_pixels:,} pixels per batch"
    if batch_size.max_batch:
        words += f", at most {batch_size.max_batch}"
    return words + (f", multiples of {batch_size.batch_multiple}" if batch_size.batch_multiple > 1 else "")


def _cores() -> int:
    return os.cpu_count() or 1


def _check_local(m: Manifest, manifest: str | os.PathLike) -> None:
    """The peers read local files: a ConfigError for a manifest whose samples are in object storage."""
    from ..loader.source import has_urls

    if has_urls(m):
        raise ConfigError(
            f"--baseline, --quality and --memory compare peers that read local files, and the samples of {manifest} "
            "are in object storage; run them on a manifest of local copies (bench alone measures the loader)"
        )


def _cycle(factory: Callable[[], Any]) -> Iterator[Any]:
    """The iterables ``factory`` makes, one after another, for ever (a loader running on through the epochs)."""
    while True:
        yield from factory()


def _sync(batch: Any) -> tuple[int, int]:
    """``(images, output pixels)`` of ``batch`` once it is finished (a CUDA batch synchronised); the decode-only
    ceiling yields its image count and makes no pixels."""
    if isinstance(batch, int):
        return batch, 0
    images = batch["images"] if isinstance(batch, dict) else batch
    if images.is_cuda:
        import torch

        torch.cuda.synchronize(images.device)
    return int(images.shape[0]), int(images.shape[0] * images.shape[2] * images.shape[3])


#: A loader under test: a function starting it, returning an endless iterator of batches.
Loader = Callable[[], Iterator[Any]]


@dataclass
class _Bench:
    """One :func:`run_bench` call's loaders, all on the same plan (``plan``: epoch 0 of rank 0 of 1)."""

    m: Manifest
    spec: BucketSpec
    plan: Any
    device: str
    batch_size: int | BatchSizing
    workers: int | None
    worker_kind: str
    decoder: str
    num_threads: int | None
    hw_decoder_load: float | None
    jpeg_scaling: str | None
    dtype: str
    replayed: int  # batches the memory pipeline replays (warm-up and one round)
    read_ahead: dict[str, int] = field(default_factory=dict)  # decoder -> what the loader's prefetch holds

    @property
    def scaling(self) -> str:
        return self.jpeg_scaling or "quality"

    @property
    def step_rows(self) -> list[np.ndarray]:
        """Each step's rows (steps differ in size under a budget), as the peers read them."""
        return step_rows(self.plan)

    @property
    def other_kind(self) -> str:
        return "process" if self.worker_kind == "thread" else "thread"

    def loaders(self, *, baseline: bool, memory: bool) -> dict[str, Loader]:
        """Every loader to time, by result key, in the order they run and are reported."""
        loaders = {"loader": self.ours()}
        if baseline:
            loaders[f"loader_{self.other_kind}_workers"] = self.ours(kind=self.other_kind)
            loaders.update(self.peers())
            if has_torchvision():
                loaders["torchvision"] = self.torchvision
        if memory:
            if self.device == "cpu":  # on the CPU the loader decodes in its workers: compare the DALI decoder
                loaders["loader_dali_decoder"] = self.ours("dali")
            loaders["memory"] = self.from_memory()
        return loaders

    def ours(self, chosen: str | None = None, kind: str | None = None) -> Loader:
        """dali_arb with ``decoder=chosen`` (default: the bench's) and workers of ``kind``."""
        from ..torch import DALIBucketIterator

        chosen, kind = chosen or self.decoder, kind or self.worker_kind

        def make() -> Iterator[Any]:
            it = DALIBucketIterator(
                self.m, batch_size=self.batch_size, buckets=self.spec, device=self.device, crop="center",
                workers=self.workers, worker_kind=kind, rank=0, world_size=1, decoder=chosen, leftover="nearest",
                num_threads=self.num_threads, hw_decoder_load=self.hw_decoder_load, dtype=self.dtype,
                jpeg_scaling=self.jpeg_scaling if chosen != "dali" else None,
            )  # fmt: skip
            self.read_ahead.setdefault(chosen, it.read_ahead_bytes())
            return _cycle(lambda: it)

        return make

    def _data_loader(self, dataset: Any, *, workers: int, prefetch: int) -> Any:
        import torch

        return torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=prefetch,
            persistent_workers=True, multiprocessing_context=PEER_START_METHOD,
        )  # fmt: skip

    def peers(self) -> dict[str, Loader]:
        """The CPU peers (:data:`~dali_arb.tools.peers.PEERS`), then the decode-only ceiling at the loader's scale."""
        sources = self.m.table.column("source").to_pylist()
        sizes = self.plan.sizes[self.plan.bucket]

        def peer(dataset: Any) -> Loader:
            def make() -> Iterator[Any]:
                loader = self._data_loader(dataset, workers=_cores(), prefetch=2)  # one, with persistent workers
                return _cycle(lambda: loader)

            return make

        out = {}
        for key, method in PEERS.items():
            out[key] = peer(PeerBatches(sources, self.m.heights, self.m.widths, self.step_rows, sizes,
                                        method=method, dtype=self.dtype))  # fmt: skip
        ceiling = PEERS[SAME_QUALITY_PEER[self.scaling]]  # decoding at the loader's own scale
        out["decode_ceiling"] = peer(DecodeOnly(sources, self.m.heights, self.m.widths, self.step_rows, sizes,
                                                method=ceiling))  # fmt: skip
        return out

    def torchvision(self) -> Iterator[Any]:
        """A DataLoader reading each planned batch's bytes, decoded by batched ``decode_jpeg`` in this process."""
        sources = self.m.table.column("source").to_pylist()
        sizes = self.plan.sizes[self.plan.bucket]
        torch_device = "cuda" if self.device == "gpu" else "cpu"
        loader = self._data_loader(EncodedBatches(sources, self.step_rows), workers=min(4, _cores()), prefetch=4)
        while True:
            for step, encoded in enumerate(loader):
                yield torchvision_batch(encoded, tuple(int(v) for v in sizes[step]), torch_device)

    def from_memory(self) -> Loader:
        """The DALI-decoder pipeline fed batches prepared now (bytes and parameters), replayed from memory."""
        config = LoaderConfig(batch_size=self.batch_size, spec=self.spec, seed=0, rank=0, world_size=1,
                              leftover="nearest", sync_ranks=True, crop="center", flip=0.0)  # fmt: skip
        memory_decoder = DaliDecoder()
        prepared = BatchSource(self.m, config, memory_decoder)
        replay = _Replay([prepared.batch(0, s) for s in range(min(len(self.plan), self.replayed))])

        def make() -> Iterator[Any]:
            import torch

            from ..loader.pipeline import build_pipeline

            pipe = build_pipeline(
                replay, decoder=memory_decoder, batch_size=self.plan.max_batch, device=self.device,
                device_id=0 if self.device == "gpu" else None, dtype="float16",
                num_threads=memory_decoder.default_threads(_cores(), gpu=self.device == "gpu"), workers=0,
            )  # fmt: skip
            while True:
                images, _ = pipe.run()
                yield torch.from_dlpack(images.as_tensor())

        return make


def _time_loaders(
    loaders: dict[str, Loader], warmup: int, rounds: int, batches: int, step_ms: float, step_work: str, device: str,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, list[dict]], dict[str, float]]:  # fmt: skip
    """Start and warm up every loader, then time ``rounds`` rounds of ``batches`` batches, alternating between
    loaders: ``({name: [one _time record per round]}, GPU memory after the warm-up)``."""
    say = progress or (lambda text: None)
    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    streams = {name: make() for name, make in loaders.items()}
    for name, stream in streams.items():  # start every loader (workers, pipelines) and warm it up
        say(f"warm-up: {name}")
        for _ in range(warmup):
            _sync(next(stream))
    gpu_memory = {"after_warmup_mb": _gpu_used_mb()} if device == "gpu" else {}
    for r in range(rounds):
        for name, stream in streams.items():
            say(f"round {r + 1}/{rounds}: {name}")
            step_s = step_ms / 1000 if name != "decode_ceiling" else 0.0
            runs[name].append(_time(stream, batches, _sync, step_s, step_work))
    return runs, gpu_memory


def _add_ratios(result: dict[str, Any], *, baseline: bool, memory: bool, worker_kind: str, scaling: str) -> None:
    """The comparisons of a :func:`run_bench` result, added to it (speedups, shares, overheads)."""
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
        other_kind = "process" if worker_kind == "thread" else "thread"
        other = result[f"loader_{other_kind}_workers"]["images_per_s"]
        result[f"{worker_kind}_vs_{other_kind}_workers"] = round(ours_rate / other, 2)
        if "torchvision" in result:
            result["speedup_vs_torchvision"] = round(ours_rate / result["torchvision"]["images_per_s"], 2)
        else:
            result["torchvision"] = "not installed (pip install torchvision to compare)"
    if memory:
        same_decoder = result.get("loader_dali_decoder", result["loader"])["images_per_s"]
        result["planner_and_source_overhead"] = round(1 - same_decoder / result["memory"]["images_per_s"], 3)


def _quality(
    m: Manifest,
    spec: BucketSpec,
    plan: Any,
    batch_size: int | BatchSizing,
    decoder: str,
    device: str,
    peers: bool,
    jpeg_scaling: str | None = None,
) -> dict[str, Any]:
    """Worst and median PSNR (dB) of each loader's uint8 output against :func:`reference_image`, over the
    first batch of every bucket in the plan."""
    from ..torch import DALIBucketIterator

    sources = m.table.column("source").to_pylist()
    first_step = {int(b): i for i, b in reversed(list(enumerate(plan.bucket.tolist())))}
    steps = sorted(first_step.values())
    sizes = plan.sizes[plan.bucket]
    rows = step_rows(plan)
    references = {
        (int(row), step): reference_image(sources[row], *(int(v) for v in sizes[step]))
        for step in steps
        for row in rows[step]
    }
    scores: dict[str, list[float]] = {"loader": []}
    it = DALIBucketIterator(m, batch_size=batch_size, buckets=spec, device=device, crop="center", workers=0,
                            rank=0, world_size=1, decoder=decoder, dtype="uint8", leftover="nearest",
                            jpeg_scaling=jpeg_scaling if decoder != "dali" else None)  # fmt: skip
    for batch in it:
        if batch["step"] in first_step.values():
            for i, row in enumerate(rows[batch["step"]]):
                ours = batch["images"][i].permute(1, 2, 0).cpu().numpy()
                scores["loader"].append(psnr(ours, references[(int(row), batch["step"])]))
    if peers:
        for key, method in PEERS.items():
            dataset = PeerBatches(sources, m.heights, m.widths, rows, sizes, method=method, dtype="uint8")
            scores[key] = [
                psnr(dataset[step][i].permute(1, 2, 0).numpy(), references[(int(row), step)])
                for step in steps
                for i, row in enumerate(rows[step])
            ]
    return {
        "reference": "full-resolution decode, antialiased bilinear resize (Pillow), centre crop",
        "buckets": len(steps),
        "images": len(scores["loader"]),
        **{k: {"worst_db": round(min(v), 2), "median_db": round(float(np.median(v)), 2)} for k, v in scores.items()},
    }


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
