"""What a loader's set-up sizes from the manifest and the machine: the GPU decoder's preallocation, the batches
the workers compute ahead (and the ``/dev/shm`` they need), and the reads from object storage ahead of the plan.

Imports NumPy, the plan and data layers and ``loader.decoders`` (``loader.source`` lazily); no DALI, no torch.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np

from ..data.manifest import Manifest, ManifestSet
from ..errors import ConfigError, ResourceError
from ..plan.buckets import served_p99
from ..plan.planner import Planner
from .decoders import Decoder

__all__ = ["free_shared_memory", "plan_read_ahead", "preallocation", "read_ahead_bytes", "release", "remote_reads",
           "served_p99_of"]  # fmt: skip

#: Rows sampled for the percentiles of sizes and lengths that set buffers up.
STATISTICS_SAMPLE = 1 << 20
PREALLOCATE_MAX_SIDE = 8192
#: Batches the workers compute ahead, per worker. DALI hands each batch to one worker, so fewer batches in
#: flight than workers leaves workers idle (a cap of 8 ran 16 workers at 378 img/s against a 486 img/s peer).
SOURCE_PREFETCH_PER_WORKER = 2


def free_shared_memory() -> int | None:
    """Bytes free in ``/dev/shm`` (where DALI's workers hand batches over), or None where there is none."""
    try:
        info = os.statvfs("/dev/shm")
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def served_p99_of(planner: Planner, data: ManifestSet) -> dict[str, float | None]:
    """:func:`~dali_arb.plan.buckets.served_p99` of the served images: from the bucket index's cache, which
    computed them once per node; else from ``STATISTICS_SAMPLE`` rows spread evenly over the usable ones (the
    whole manifest would cost O(N) in every rank)."""
    cached = getattr(planner.index, "served_p99", None)
    clips = getattr(planner, "clips", None)
    if cached and clips is None:
        return cached
    index = planner.index
    usable = int(index.starts[-1])
    served = index.member_rows(np.linspace(0, usable - 1, min(usable, STATISTICS_SAMPLE)).astype(np.int64), 0)
    if clips is None:
        return served_p99(*(data.ints_at(name, served, -1) for name in ("heights", "widths", "length")))
    # a plan over clips: its members are clip ids, and a clip's encoded bytes are its packets, not its file's
    from .decoders.video import clip_packet_bytes, video_file_bytes

    rows = np.asarray(clips.row, np.int64)[served]
    encoded = video_file_bytes(data, rows)
    packets = clip_packet_bytes(np.maximum(encoded, 0), np.asarray(clips.length, np.int64)[served],
                                data.ints_at("frames", rows, -1))  # fmt: skip
    packets = np.where(encoded >= 0, packets, -1)  # (unknown stays unknown)
    return served_p99(data.ints_at("heights", rows, -1), data.ints_at("widths", rows, -1), packets)


def preallocation(served: dict[str, float | None]) -> tuple[int, int]:
    """``(height, width)`` for the GPU decoder to preallocate: a high percentile of the served images' sides,
    taken separately and capped (nvImageCodec's hardware decoder reserves batch x H x W x 3)."""
    height, width = (min(math.ceil(served[side]), PREALLOCATE_MAX_SIDE) for side in ("height", "width"))
    return height, width


def plan_read_ahead(
    *, workers: int, kind: str, prefetch: int, batch_size: int, decoder: Decoder, planner: Planner, encoded: int
) -> dict[str, int]:
    """Batches the workers compute ahead (``source_prefetch``), and the bytes a sample takes while it waits
    (``bytes_per_sample``, the chunk size of the worker processes' ``/dev/shm`` buffers); with worker processes,
    a ``ResourceError`` saying what to do when ``/dev/shm`` cannot hold even the smallest set-up. ``encoded``:
    a high percentile of the samples' encoded bytes."""
    if workers == 0:
        return {"bytes_per_sample": 0, "source_prefetch": 0}
    depth = max(2, SOURCE_PREFETCH_PER_WORKER * workers)  # every worker busy, and one batch more each
    # the largest batch in bytes: each bucket's own batch of its own samples (with batch sizes by bucket, the
    # smallest buckets have the largest batches; their product with the largest bucket's samples is reached by none)
    sizes = planner.index.sizes
    areas = (sizes[:, 0] * sizes[:, 1]).tolist()
    batches = np.minimum(np.asarray(planner.batch, np.int64), batch_size).tolist()
    clips = getattr(planner, "clips", None)
    frames = int(np.max(clips.length)) if clips is not None and len(clips.length) else 1  # a clip: F frames
    per_batch = max(b * decoder.bytes_per_sample(encoded, int(a) * frames) for b, a in zip(batches, areas))
    per_sample = -(-per_batch // batch_size)  # the chunk per sample, so that a batch of batch_size fits per_batch
    if kind == "thread":  # the threads hand batches over in this process's memory
        return {"bytes_per_sample": per_sample, "source_prefetch": depth}
    free = free_shared_memory()
    if free is not None:
        # DALI's pool holds one chunk per batch in flight, shared by the workers, plus the pipeline's prefetch
        def need(d: int) -> int:
            return (d + prefetch) * per_batch

        while depth > 1 and need(depth) > free:
            depth -= 1
        if need(depth) > free:
            raise ResourceError(
                f"/dev/shm has {free / 2**20:.0f} MiB free, but the {workers} loader worker(s) need about "
                f"{need(depth) / 2**20:.0f} MiB (batches of {batch_size} x {per_sample / 2**20:.1f} MiB); "
                "run the container with --ipc=host or --shm-size=8g, lower batch_size or workers, or use worker_kind='thread' (no /dev/shm)"
            )
    return {"bytes_per_sample": per_sample, "source_prefetch": depth}


def remote_reads(
    manifests: list[Manifest], *, steps: int | None, ahead: int, cache: Any, cache_gb: float
) -> tuple[Any, int, Any]:
    """``(RemoteReads or None, read-ahead steps, the private ReadAheadFolder or None)`` for manifests whose
    samples live in object storage. ``steps``: the user's read-ahead (``None``: ``ahead``, every step the
    pipeline and the workers prepare ahead plus one); ``cache``: a kept sample-cache folder or ``None``."""
    from ..data.readahead import ReadAheadFolder, RemoteReads
    from .source import has_urls

    if not any(has_urls(m) for m in manifests):
        return None, 0, None
    if steps is None:
        steps = ahead
    if cache is not None:
        folder = os.path.abspath(os.fspath(cache))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"sample_cache {folder} cannot be created ({exc.strerror}); give a writable folder"
            ) from None
        return RemoteReads(folder, keep=True, limit_bytes=int(cache_gb * 2**30)), steps, None
    if not steps:
        return RemoteReads(None), 0, None
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    private = ReadAheadFolder(base)
    return RemoteReads(private.path, keep=False, limit_bytes=1 << 30), steps, private


def release(remote: Any, folder: Any) -> None:
    """A loader's end: its reads from object storage (fetcher thread, sockets, read-ahead in flight), then its
    read-ahead folder, in that order, so that nothing in flight writes into the folder once it is gone."""
    if remote is not None:
        remote.close()
    if folder is not None:
        folder.remove()


def read_ahead_bytes(plan: dict[str, int], *, batch_size: int, kind: str, prefetch: int) -> int:
    """Memory the batches the workers compute ahead (``plan`` of :func:`plan_read_ahead`) may hold at most, at the
    largest bucket: with worker processes, ``/dev/shm``, where DALI's pool keeps one chunk per batch computed ahead
    plus one per batch of the pipeline's own prefetch; with worker threads, this process's memory, one batch per
    batch ahead; 0 without workers."""
    per_batch = plan["bytes_per_sample"] * batch_size
    return (plan["source_prefetch"] + (prefetch if kind == "process" else 0)) * per_batch
