"""``DALIBucketIterator``: what a training loop holds. Imports torch and DALI (lazily, on construction)."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from .data.manifest import Manifest, ManifestSet
from .data.readahead import READ_AHEAD_PREFIX as READ_AHEAD_PREFIX
from .data.readahead import remove_stale_read_ahead as remove_stale_read_ahead
from .errors import (
    ConfigError,
    DaliArbError,
    DataError,
    DeviceError,
    ManifestError,
    ResourceError,
    StateError,
    dali_error_summary,
    is_out_of_memory,
    raised_by_dali_arb,
)
from .loader.blocklist import Blocklist
from .loader.contracts import IO_FIELDS, META, Failure
from .loader.decoders import DaliDecoder, Decoder, choose_decoder, cpu_count
from .loader.planning import LoaderConfig, build_planner
from .loader.source import BatchSource
from .loader.workers import ThreadedSource, check_worker_kind
from .plan.buckets import BucketSpec, served_p99
from .plan.captions import CaptionPolicy
from .plan.mixture import check_repeats
from .plan.planner import LeftoverPolicy
from .plan.world import World
from .processes import describe_exit

__all__ = ["DALIBucketIterator"]

log = logging.getLogger("dali_arb")
#: A dead worker is noticed within WATCH_INTERVAL_S; the run gets WORKER_DEATH_GRACE_S more to end by itself.
WATCH_INTERVAL_S = 0.25
WORKER_DEATH_GRACE_S = 2.0
#: Worker deaths one loader restarts from before it stops with a ResourceError.
MAX_WORKER_DEATHS = 2

#: Version of ``state_dict()``; 1 stored ``buckets.base`` as ``[height, width]`` and is still read.
#: 3: the O(steps) planner (keyed shuffles per bucket); states of formats 1 and 2 are refused.
STATE_FORMAT = 4  # 4: plans that trim from all images and round fractional repeats (issue 18)
#: Every field of ``state_dict()``; a state without one of them is refused (it was edited or built by hand).
STATE_FIELDS = ("format", "epoch", "step", "seed", "batch_size", "world_size", "rank", "sync_ranks", "leftover", "crop",
                "flip", "num_images", "manifest", "buckets", "repeats", "captions", "failed", "failed_rows")  # fmt: skip
#: The largest epoch: the batches' metadata carries epochs as int64, and the stream runs on into the next epoch.
MAX_EPOCH = 2**62
DTYPES = ("float16", "bfloat16", "float32", "uint8")
#: Rows sampled for the percentiles of sizes and lengths that set buffers up.
STATISTICS_SAMPLE = 1 << 20
PREALLOCATE_MAX_SIDE = 8192
#: Batches the workers compute ahead, per worker. DALI hands each batch to one worker, so fewer batches in
#: flight than workers leaves workers idle (a cap of 8 ran 16 workers at 378 img/s against a 486 img/s peer).
SOURCE_PREFETCH_PER_WORKER = 2


class DALIBucketIterator:
    """Aspect-ratio-bucketed batches from a manifest, decoded and resized by DALI.

    Every batch holds ``batch_size`` images of one bucket resolution. ``len(loader)`` is the number
    of steps in the current epoch, equal on every rank. Iterating runs the rest of the current
    epoch; when an epoch has been run through, the next iteration starts the following epoch
    (``set_epoch`` picks one explicitly, as with ``DistributedSampler``).

    Each batch is a dict: ``images`` (``torch.Tensor [B, 3, H, W]`` on this rank's GPU, or the CPU),
    ``ids`` (manifest keys), ``captions`` (``""`` where none), ``original_size`` (``int64 [B, 2]``,
    ``(height, width)`` EXIF-upright), ``crop_top_left`` (``int64 [B, 2]``, ``(top, left)`` in
    resized-image pixels, after the flip), ``target_size`` (``(H, W)``), ``flipped`` (``bool [B]``),
    ``epoch`` and ``step``. Everything but ``images`` stays on the CPU.

    A sample that cannot be read or decoded is replaced by a deterministic stand-in from the same
    bucket, logged once, and listed in :attr:`failed`; the batch keeps its size.

    Args:
        manifest: path of a manifest from ``dali-arb index``, or a :class:`Manifest`; or a list of them, one
            per dataset (``batch["dataset"]`` says which each sample came from).
        batch_size: samples per batch on this rank.
        buckets: a :class:`BucketSpec` (default: NovelAI's buckets), or one per dataset (multi-resolution).
        repeats: per dataset, times each image is served per epoch: an integer serves it that many times, a
            fraction serves that share of the dataset, another subset each epoch (:mod:`dali_arb.plan.mixture`).
        seed: shared by every rank.
        rank, world_size: ``None`` reads ``torch.distributed`` / torchrun's environment (else 0, 1).
        device: ``"gpu"`` (decode with nvJPEG on this rank's GPU), ``"cpu"``, or ``"auto"``.
        crop: ``"random"`` (seeded by seed, epoch, step and sample) or ``"center"``.
        flip: probability of a horizontal flip.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` (scaled to [-1, 1]) or ``"uint8"`` (raw).
        leftover, sync_ranks: see :class:`Planner`.
        workers: threads or processes (``worker_kind``) running the external source (reading, and with the
            ``opencv`` and ``pillow`` decoders decoding); 0 does it on the loader's own thread, when DALI asks
            for a batch. Default: the decoder's, from this rank's share of the cores (``LOCAL_WORLD_SIZE`` ranks
            share a node): all of it for ``opencv`` and ``pillow``, a quarter of it, 1-4, for ``dali``.
        worker_kind: ``"thread"`` (default): the workers are threads of this process (no process, no import,
            no ``/dev/shm``; decoding and reading release the GIL, so they keep pace with processes while the
            training loop dispatches torch ops); ``"process"``: DALI's spawned worker processes (about 100 MB PSS
            each on a node; a worker killed by the OOM killer is restarted from), for a training loop that runs
            long stretches of pure Python, which holds the GIL the threads need (0.78x their pace measured). See
            :mod:`dali_arb.loader.workers` and benchmarks/RESULTS.md.
        num_threads: DALI threads (default: the decoder's: 4 on GPU, all cores for ``dali`` on CPU,
            a quarter of the cores for ``pillow``).
        prefetch: batches DALI prepares ahead.
        device_id: GPU index (default: the local rank).
        decoder: ``"dali"`` (DALI decodes and resizes: nvJPEG on GPU, libjpeg-turbo on CPU), ``"opencv"``
            or ``"pillow"`` (the worker processes decode with libjpeg-turbo at reduced DCT scale and resize
            to the bucket; DALI flips and normalises), or ``"auto"``: ``dali`` on GPU, ``opencv`` on CPU.
            A :class:`~dali_arb.loader.decoders.Decoder` instance is used as it is. See :mod:`dali_arb.loader.decoders`.
        hw_decoder_load: with ``dali`` on GPU, the share of each batch for the hardware JPEG decoder
            (A100/H100; DALI's default 0.65).
        jpeg_scaling: with ``opencv`` or ``pillow``, how far the workers let libjpeg-turbo decode a JPEG at a
            reduced DCT scale: ``"quality"`` (default) only while the image keeps 3x the resize, so the output
            stays within 35 dB of a full-resolution antialiased resize; ``"fast"`` the largest reduction that
            covers the resize (as the fastest peers do: up to 2.7x less decoding on large photos, 28-30 dB
            worst on detailed ones). ``benchmarks/RESULTS.md`` has both.
        read_ahead: for samples in object storage (``s3://``, ``gs://``, ``https://`` manifests), steps whose samples
            are fetched ahead in the background, from the plan (default: every step the pipeline and its workers
            prepare ahead, plus one); 0 fetches each sample when it is needed, one request at a time.
        sample_cache, sample_cache_gb: a folder where samples read from object storage stay for later epochs
            (default: none; read-ahead then waits in a private folder of ``/dev/shm`` and each sample is dropped
            once read), at most ``sample_cache_gb`` (least recently used removed first). The ranks of a node may
            share one folder.
        caption_dropout, shuffle_tags, keep_tags, tag_separator: caption tricks (:class:`CaptionPolicy`): a
            caption of several lines is several captions, one drawn per sample per epoch; ``caption_dropout``
            empties it with that probability; ``shuffle_tags`` shuffles the tags after the first
            ``keep_tags`` (split at ``tag_separator``, joined with ``tag_separator + " "``). Seeded by
            (seed, epoch, step, position in the global batch): resume reproduces them.
        cache_dir: where the manifest's memory-mapped cache lives (default ``$DALI_ARB_CACHE``, else
            ``~/.cache/dali_arb``; see :mod:`dali_arb.data.cache`). A manifest path is opened through it,
            so every rank and worker of a node shares one copy; a :class:`Manifest` object is used as it is.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Manifest | list[str | os.PathLike | Manifest],
        *,
        batch_size: int,
        buckets: BucketSpec | list[BucketSpec] | None = None,
        repeats: list[float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        device: str = "auto",
        crop: str = "random",
        flip: float = 0.0,
        dtype: str = "float16",
        leftover: LeftoverPolicy | str = LeftoverPolicy.NEAREST,
        sync_ranks: bool = True,
        workers: int | None = None,
        worker_kind: str = "thread",
        num_threads: int | None = None,
        prefetch: int = 2,
        device_id: int | None = None,
        decoder: str | Decoder = "auto",
        hw_decoder_load: float | None = None,
        jpeg_scaling: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        read_ahead: int | None = None,
        sample_cache: str | os.PathLike | None = None,
        sample_cache_gb: float = 50.0,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_separator: str = ",",
    ) -> None:
        from .loader.pipeline import resolve_device

        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        for name, value, least in (("workers", workers, 0), ("num_threads", num_threads, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                kind = "non-negative" if least == 0 else "positive"
                raise ConfigError(f"{name} must be a {kind} integer, got {value!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigError(f"prefetch must be a positive integer, got {prefetch!r}")
        if read_ahead is not None and (
            isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0
        ):
            raise ConfigError(f"read_ahead must be a non-negative integer (steps), got {read_ahead!r}")
        if isinstance(sample_cache_gb, bool) or not isinstance(sample_cache_gb, (int, float)) or sample_cache_gb <= 0:
            raise ConfigError(f"sample_cache_gb must be a positive number, got {sample_cache_gb!r}")
        given = list(manifest) if isinstance(manifest, (list, tuple)) else [manifest]
        if not given:
            raise ConfigError("give at least one manifest")
        if isinstance(buckets, (list, tuple)):
            if len(buckets) != len(given) or not all(isinstance(b, BucketSpec) for b in buckets):
                raise ConfigError(f"buckets must be a BucketSpec or one per manifest ({len(given)}), got {buckets!r}")
            buckets = tuple(buckets)
        elif buckets is not None and not isinstance(buckets, BucketSpec):
            raise ConfigError(f"buckets must be a BucketSpec, got {type(buckets).__name__}")
        repeats = check_repeats(repeats, len(given)) if repeats is not None or len(given) > 1 else None
        manifests = [m if isinstance(m, Manifest) else Manifest.open(m, cache_dir=cache_dir) for m in given]
        for m in manifests:
            if "source" not in m.table.column_names or m.table.column("source").null_count == len(m):
                raise ManifestError(
                    f"manifest {m.path or ''} has no image files to read (it was indexed from metadata without "
                    "a path column); index the images themselves with `dali-arb index FOLDER_OR_SHARDS`"
                )
        self.data = ManifestSet(manifests)
        world = World.detect(rank, world_size)
        self.world = world
        self.device = resolve_device(device)
        self.device_id = (world.local_rank if device_id is None else device_id) if self.device == "gpu" else None
        self.dtype = dtype
        self.config = LoaderConfig(
            batch_size=batch_size,
            spec=buckets or BucketSpec(),
            seed=seed,
            rank=world.rank,
            world_size=world.world_size,
            leftover=LeftoverPolicy.parse(leftover).value,
            sync_ranks=sync_ranks,
            crop=crop,
            flip=flip,
            repeats=repeats,
        )
        self.captions = CaptionPolicy(caption_dropout, shuffle_tags, keep_tags, tag_separator)
        self.manifests = manifests
        self.manifest = manifests[0]  # the only one, or the first dataset's
        self._planner = build_planner(self.config, manifests)  # validates batch size, seed, buckets, repeats
        gpu = self.device == "gpu"
        self.decoder: Decoder = choose_decoder(
            decoder,
            self.device,
            pairs=tuple(self.data.pairs.items()),
            hw_decoder_load=hw_decoder_load,
            jpeg_scaling=jpeg_scaling,
            preallocate=self._preallocation() if gpu and decoder in ("auto", "dali") else None,
        )
        cores = max(1, cpu_count() // world.local_world_size)  # the ranks of a node share its cores
        self.workers = workers if workers is not None else self.decoder.default_workers(cores)
        self.worker_kind = check_worker_kind(worker_kind)
        self.num_threads = num_threads or self.decoder.default_threads(cores, gpu=gpu)
        self.prefetch = prefetch
        self._read_ahead_plan = self._plan_read_ahead()
        remote, read_ahead_steps, folder = self._remote_reads(manifests, read_ahead, sample_cache, sample_cache_gb)
        # at close(), when collected, or at exit: the loader's own reads end, then its read-ahead folder goes
        self._release = weakref.finalize(self, _release, remote, folder)
        self._source = BatchSource(
            manifests,
            self.config,
            self.decoder,
            planner=self._planner,
            remote=remote,
            read_ahead_steps=read_ahead_steps,
        )
        self._closed = False
        self._io: dict[str, int] = dict.fromkeys(IO_FIELDS, 0)
        self._epoch = 0
        self._step = 0
        self._pipe: Any = None
        self._stream: tuple[int, int] | None = None  # (epoch, step) the pipeline produces next
        self._blocklist = Blocklist()
        self._runner: _Runner | None = None
        self._threaded: ThreadedSource | None = None  # the running pipeline's worker threads
        self._worker_deaths = 0

    # -- the public surface -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self._planner.steps_per_epoch(self._epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step at the next iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        if epoch > MAX_EPOCH:
            raise ConfigError(f"epoch must be at most 2**62, got {epoch!r}")
        if epoch != self._epoch or self._step >= len(self):
            self._epoch, self._step = int(epoch), 0

    @property
    def failed(self) -> list[str]:
        """Keys of samples that could not be read or decoded at run time (each was replaced)."""
        return self._blocklist.keys

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise ConfigError("this loader was closed (loader.close()); build a new DALIBucketIterator to go on")
        if self._step >= len(self):
            self._epoch, self._step = self._epoch + 1, 0
        while self._step < len(self):
            batch = self._fetch(self._epoch, self._step)
            self._step += 1
            yield batch

    def close(self) -> None:
        """Stop the pipeline and its workers, end the reads from object storage (their threads and sockets) and
        remove the read-ahead folder; the state stays readable (``state_dict``), iterating is refused. Idempotent;
        a loader that is collected, or alive at exit, is closed the same way. Also ``with DALIBucketIterator(...)``."""
        self._closed = True
        self._close_pipeline()
        self._runner = None
        self._release()

    def __enter__(self) -> DALIBucketIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable: the position and everything that decides the batches.

        Taken after the last step of an epoch, the position is the next epoch's first step.
        """
        c = self.config
        epoch, step = self._epoch, self._step
        if step >= self._planner.steps_per_epoch(epoch):
            epoch, step = epoch + 1, 0
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "step": step,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "world_size": c.world_size,
            "rank": c.rank,
            "sync_ranks": c.sync_ranks,
            "leftover": c.leftover,
            "crop": c.crop,
            "flip": c.flip,
            "num_images": len(self.data),
            "manifest": self._source.fingerprint,
            "buckets": c.spec.to_dict() if isinstance(c.spec, BucketSpec) else [b.to_dict() for b in c.spec],
            "repeats": list(c.repeats) if c.repeats is not None else None,
            "captions": self.captions.to_dict(),
            "failed": self._blocklist.reasons(),
            "failed_rows": sorted(self._blocklist.rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: the next batch is the one that would have come.

        The world size may differ if the global batch (world size x batch size) is the same and
        ranks are in sync: the same global batches then continue (elastic resume).
        """
        state = _checked_state(state)
        mine = self.state_dict()
        for name in ("seed", "sync_ranks", "leftover", "crop", "flip", "num_images", "manifest", "buckets", "repeats",
                     "captions"):  # fmt: skip
            if state[name] != mine[name]:
                what = "another manifest (same size, other content)" if name == "manifest" else None
                raise StateError(
                    f"state was saved with {what or f'{name}={state[name]!r}'}, this loader has "
                    f"{'its own' if what else f'{name}={mine[name]!r}'}; build the loader with the same options "
                    "and manifest to resume"
                )
        saved_global = state["world_size"] * state["batch_size"]
        here_global = mine["world_size"] * mine["batch_size"]
        if (state["world_size"], state["batch_size"]) != (mine["world_size"], mine["batch_size"]):
            if not self.config.sync_ranks or saved_global != here_global:
                raise StateError(
                    f"state was saved with world_size {state['world_size']} x batch_size {state['batch_size']} = "
                    f"{saved_global}; this loader has {mine['world_size']} x {mine['batch_size']} = {here_global}. "
                    "Resuming on another world size needs the same global batch and sync_ranks=True "
                    f"(here: batch_size {saved_global // mine['world_size'] if saved_global % mine['world_size'] == 0 else '?'})"
                )
        epoch, step = state["epoch"], state["step"]
        steps = self._planner.steps_per_epoch(epoch)
        if step > steps:
            raise StateError(f"state is at step {step} of epoch {epoch}, which has only {steps} steps here")
        self._blocklist = Blocklist.restore(state["failed"], self._rows_checked(state.get("failed_rows") or []))
        self._epoch, self._step = epoch, step
        if step == steps:  # a state taken at an epoch's end (format 1) resumes at the next epoch
            self._epoch, self._step = epoch + 1, 0
        self._close_pipeline()

    def read_ahead_bytes(self) -> int:
        """Memory the batches the workers compute ahead may hold at most, at the largest bucket: with worker
        processes, ``/dev/shm``, where DALI's pool keeps one chunk per batch computed ahead plus one per batch of
        the pipeline's own prefetch; with worker threads, this process's memory, one batch per batch ahead;
        0 without workers."""
        plan = self._read_ahead_plan
        per_batch = plan["bytes_per_sample"] * self.config.batch_size
        in_shared_memory = self.worker_kind == "process"
        return (plan["source_prefetch"] + (self.prefetch if in_shared_memory else 0)) * per_batch

    @property
    def stats(self) -> dict[str, Any]:
        """What reading from object storage cost so far (zeros for local files): ``requests``, ``retries``,
        ``bytes_read``, ``bytes_served``, read-ahead ``hits`` and ``misses``, ``requests_per_sample`` and
        ``bytes_read_per_byte_served``."""
        io = dict(self._io)
        samples = io["hits"] + io["misses"]
        io["requests_per_sample"] = round(io["requests"] / samples, 3) if samples else 0.0
        io["bytes_read_per_byte_served"] = (
            round(io["bytes_read"] / io["bytes_served"], 3) if io["bytes_served"] else 0.0
        )
        return io

    # -- set-up -------------------------------------------------------------------------------------
    def _remote_reads(self, manifests: list[Manifest], read_ahead: int | None, cache: Any, cache_gb: float):
        """``(RemoteReads or None, read-ahead steps, the private ReadAheadFolder or None)`` for manifests whose
        samples live in object storage."""
        from .data.readahead import ReadAheadFolder, RemoteReads
        from .loader.source import has_urls

        if not any(has_urls(m) for m in manifests):
            return None, 0, None
        steps = read_ahead
        if steps is None:  # every batch the pipeline and the workers prepare ahead, and one more
            steps = (self._read_ahead_plan["source_prefetch"] + self.prefetch + 1) if self.workers else 2
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
        import tempfile

        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        private = ReadAheadFolder(base)
        return RemoteReads(private.path, keep=False, limit_bytes=1 << 30), steps, private

    def _preallocation(self) -> tuple[int, int]:
        """``(height, width)`` for the GPU decoder to preallocate: a high percentile of the served images'
        sides, taken separately and capped (nvImageCodec's hardware decoder reserves batch x H x W x 3)."""
        served = self._served_p99
        height, width = (min(math.ceil(served[side]), PREALLOCATE_MAX_SIDE) for side in ("height", "width"))
        return height, width

    @functools.cached_property
    def _served_p99(self) -> dict[str, float | None]:
        """:func:`~dali_arb.plan.buckets.served_p99` of the served images: from the bucket index's cache, which computed
        them once per node; else from ``STATISTICS_SAMPLE`` rows spread evenly over the usable ones (the whole
        manifest would cost O(N) in every rank). Taken once per loader."""
        cached = getattr(self._planner.index, "served_p99", None)
        if cached:
            return cached
        index = self._planner.index
        usable = int(index.starts[-1])
        served = index.member_rows(np.linspace(0, usable - 1, min(usable, STATISTICS_SAMPLE)).astype(np.int64), 0)
        return served_p99(*(self.data.ints_at(name, served, -1) for name in ("heights", "widths", "length")))

    def _plan_read_ahead(self) -> dict[str, int]:
        """Batches the workers compute ahead, and the bytes a sample takes while it waits (the chunk size of the
        worker processes' ``/dev/shm`` buffers), from the manifest; with worker processes, a ``ResourceError``
        saying what to do when ``/dev/shm`` cannot hold even the smallest set-up."""
        if self.workers == 0:
            return {"bytes_per_sample": 0, "source_prefetch": 0}
        depth = max(2, SOURCE_PREFETCH_PER_WORKER * self.workers)  # every worker busy, and one batch more each
        encoded = int(self._served_p99["length"] or 0)
        sizes = self._planner.assignment.sizes
        pixels = int((sizes[:, 0] * sizes[:, 1]).max())
        per_sample = self.decoder.bytes_per_sample(encoded, pixels)
        per_batch = per_sample * self.config.batch_size
        if self.worker_kind == "thread":  # the threads hand batches over in this process's memory
            return {"bytes_per_sample": per_sample, "source_prefetch": depth}
        free = _free_shared_memory()
        if free is not None:
            # DALI's pool holds one chunk per batch in flight, shared by the workers, plus the pipeline's prefetch
            def need(d: int) -> int:
                return (d + self.prefetch) * per_batch

            while depth > 1 and need(depth) > free:
                depth -= 1
            if need(depth) > free:
                raise ResourceError(
                    f"/dev/shm has {free / 2**20:.0f} MiB free, but the {self.workers} loader worker(s) need about "
                    f"{need(depth) / 2**20:.0f} MiB (batches of {self.config.batch_size} x {per_sample / 2**20:.1f} MiB); "
                    "run the container with --ipc=host or --shm-size=8g, lower batch_size or workers, or use worker_kind='thread' (no /dev/shm)"
                )
        return {"bytes_per_sample": per_sample, "source_prefetch": depth}

    # -- the pipeline -------------------------------------------------------------------------------
    def _rows_checked(self, rows: list[int]) -> Any:
        """``rows_of(keys)`` for :meth:`Blocklist.restore`: the saved rows whose key is the saved key (the
        manifest is the same: its fingerprint was checked), in O(len(rows))."""

        def rows_of(keys: list[str]) -> list[int]:
            valid = [int(r) for r in rows if 0 <= int(r) < len(self.data)]
            wanted = set(keys)
            return [r for r, key in zip(valid, self.data.keys_at(np.array(valid, np.int64))) if key in wanted]

        return rows_of

    def _close_pipeline(self) -> None:
        self._pipe = None
        self._stream = None
        if self._threaded is not None:
            self._threaded.close()
            self._threaded = None

    def _build(
        self, source: Any, *, batch_size: int, device: str, workers: int, dtype: str, threads: int, prefetch: int
    ) -> Any:
        from .loader.pipeline import build_pipeline

        return build_pipeline(
            source,
            decoder=self.decoder,
            batch_size=batch_size,
            device=device,
            device_id=self.device_id if device == "gpu" else None,
            dtype=dtype,
            num_threads=threads,
            workers=workers,
            prefetch=prefetch,
            source_prefetch=self._read_ahead_plan["source_prefetch"] or None,
            bytes_per_sample_hint=self._read_ahead_plan["bytes_per_sample"] or None,
        )

    def _open_pipeline(self, epoch: int, step: int) -> None:
        self._close_pipeline()
        source = self._source.starting_at(epoch, step, self._blocklist.rows)
        workers = self.workers
        if workers and self.worker_kind == "thread":
            source = self._threaded = ThreadedSource(
                source, threads=workers, depth=self._read_ahead_plan["source_prefetch"]
            )
            workers = 0  # DALI calls it in this process
        self._pipe = self._build(
            source,
            batch_size=self.config.batch_size,
            device=self.device,
            workers=workers,
            dtype=self.dtype,
            threads=self.num_threads,
            prefetch=self.prefetch,
        )
        self._stream = (epoch, step)

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self._planner.steps_per_epoch(epoch) else (epoch + 1, 0)

    def _fetch(self, epoch: int, step: int) -> dict[str, Any]:
        recoveries = self.config.batch_size + 1
        for _ in range(recoveries):
            if self._pipe is None or self._stream != (epoch, step):
                self._open_pipeline(epoch, step)
            # unknown while the run is in flight: one that ends any other way than below (Ctrl-C lands in it, say)
            # leaves the pipeline where nobody knows, so the next fetch opens a new one at the loader's step
            self._stream = None
            try:
                outputs = self._run_pipeline()
            except _WorkerDied as died:
                self._abandon_pipeline(died)
                continue
            except DaliArbError:
                self._close_pipeline()
                raise
            except Exception as exc:  # DALI ends a pipeline on one undecodable image: find it, skip it
                ours = raised_by_dali_arb(exc)
                if ours is not None:  # a worker process's own error, wrapped by DALI: as if raised here
                    self._close_pipeline()
                    raise ours from None
                self._release_failed_pipeline()
                self._recover(epoch, step, exc)
                continue
            self._stream = self._advance(epoch, step)
            batch = self._to_batch(outputs, epoch, step)
            corpse = _first_dead(_worker_processes(self._pipe))
            if corpse is not None:  # it died idle: nothing was lost, but the pool runs short from here on
                self._abandon_pipeline(_WorkerDied(corpse), resume="the next step")
            return batch
        raise DataError(
            f"batch {step} of epoch {epoch} kept failing after {recoveries} recoveries, each blocklisting "
            "an undecodable sample; check the files listed in loader.failed and re-index"
        )

    def _run_pipeline(self) -> tuple[Any, Any]:
        """``pipe.run()``, watched: a worker process that dies (the OOM killer, ``kill -9``) can leave DALI
        blocked forever on a lock it held, so the run happens on a helper thread and the workers' liveness
        is checked while waiting. Raises :class:`_WorkerDied` when one has died."""
        processes = _worker_processes(self._pipe)
        if not processes:
            return self._pipe.run()
        if self._runner is None or self._runner.owed:  # a run interrupted (Ctrl-C): its result would come next
            self._runner = _Runner()

        def dead() -> Any:
            return _first_dead(processes)

        try:
            return self._runner.run(self._pipe.run, dead, grace=WORKER_DEATH_GRACE_S)
        except _WorkerDied:
            self._runner = None  # its thread may stay blocked inside DALI: never hand it work again
            raise
        except Exception:
            corpse = dead()
            if corpse is not None:  # DALI noticed first ("Worker data receiving interrupted")
                raise _WorkerDied(corpse) from None
            raise

    def _abandon_pipeline(self, died: _WorkerDied, *, resume: str = "the same step") -> None:
        """Leave a pipeline whose worker died: end its other workers; the next fetch opens a new one where
        the loader stands (the plan makes its batches the same); after ``MAX_WORKER_DEATHS`` deaths, one
        clear error instead."""
        pipe, self._pipe, self._stream = self._pipe, None, None
        for process in _worker_processes(pipe):
            if process.exitcode is None:
                process.kill()
        _finalize_in_background(pipe)
        del pipe
        self._worker_deaths += 1
        what = f"a loader worker process (pid {died.process.pid}) {describe_exit(died.process.exitcode)}"
        if self._worker_deaths > MAX_WORKER_DEATHS:
            raise ResourceError(
                f"{what}, the {self._worker_deaths}th worker death of this loader; give the machine more memory, "
                "or lower workers, prefetch or batch_size"
            )
        log.warning("dali_arb: %s; restarting the pipeline at %s", what, resume)

    def _release_failed_pipeline(self) -> None:
        """Drop a pipeline that hit a critical error, and the memory it held, before anything else runs."""
        self._close_pipeline()
        gc.collect()
        if self.device == "gpu":
            with contextlib.suppress(Exception):
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()

    def _recover(self, epoch: int, step: int, error: Exception) -> None:
        """After a DALI error in ``step``: blocklist the samples that cannot be decoded, or raise one clear
        error when the files are not what failed (out of memory, a broken device, every sample failing)."""
        summary = dali_error_summary(error)
        if is_out_of_memory(error):
            raise ResourceError(
                f"the {self.device.upper()} ran out of memory in batch {step} of epoch {epoch} ({summary}); "
                "lower batch_size, --max-area or prefetch, or give the loader a GPU with more free memory"
            )
        if not isinstance(self.decoder, DaliDecoder):  # the workers decode: DALI only normalises
            raise DeviceError(f"the DALI pipeline failed in batch {step} of epoch {epoch}: {summary}")
        samples = self._source.starting_at(epoch, step, self._blocklist.rows).batch(epoch, step)
        meta = np.stack(samples[-1])  # (B, F): the source's outputs end with meta
        rows = META.unpack(meta).row
        # the CPU decoder shares nvJPEG's parsers' verdict on broken files and costs far less to probe
        culprits = self._probe(samples, device="cpu")
        if not culprits and self.device == "gpu":
            culprits = self._probe(samples, device="gpu")
        if not culprits or (len(culprits) == len(rows) > 1):
            what = "every sample of it fails alone too" if culprits else "each of its samples decodes alone"
            raise DeviceError(
                f"the DALI pipeline failed in batch {step} of epoch {epoch} ({summary}) and {what}: the decoder or "
                "device failed, not the files, so nothing was blocklisted; check the GPU (nvidia-smi) and restart "
                "from your checkpoint"
            )
        for i in culprits:
            self._block(int(rows[i]), Failure.DALI_UNDECODABLE, f" ({summary})")

    def _block(self, row: int, failure: Failure, detail: str = "", *, part: int = 0) -> None:
        """Blocklist manifest ``row`` for ``failure`` of its image (``part`` 0) or of its ``part - 1``-th pair
        (logged once, with where the bytes are)."""
        key = self.data.keys_at(np.array([row]))[0]
        self._blocklist.add(row, key, failure.describe(self._source.location(row, part)) + detail)

    def _probe(self, samples: tuple[list, ...], *, device: str) -> list[int]:
        """Positions of ``samples`` that DALI's decoder on ``device`` cannot decode, each tried alone in one
        pipeline that is rebuilt only after a failure."""
        failed: list[int] = []
        count = len(samples[0])
        start = 0
        while start < count:
            done = 0
            try:
                probe = self._build(
                    _OneAtATime(samples, start), batch_size=1, device=device, workers=0, dtype="uint8", threads=1,
                    prefetch=1,
                )  # fmt: skip
                while start + done < count:
                    probe.run()
                    done += 1
                break
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise ResourceError(
                        f"the {device.upper()} ran out of memory while probing a failed batch; lower batch_size or prefetch"
                    ) from None
                failed.append(start + done)
                start += done + 1
            finally:
                probe = None
        return failed

    def _to_batch(self, outputs: tuple, epoch: int, step: int) -> dict[str, Any]:
        """The batch dict from the pipeline's outputs ``(images, *pairs, meta)``."""
        import torch

        # The pipeline runs DALI's dynamic executor, whose outputs own their memory: hand them to
        # torch through DLPack without a copy, as DALI's own iterator does for such pipelines.
        device = torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")
        tensors = {}
        with torch.cuda.device(device) if self.device == "gpu" else contextlib.nullcontext():
            for (key, _, _), output in zip(self.decoder.parts, outputs[:-1]):
                tensor = torch.from_dlpack(output.as_tensor())
                tensors[key] = tensor.to(torch.bfloat16) if self.dtype == "bfloat16" else tensor
        out = tensors.pop("images")
        shape = list(out.shape)
        m = META.unpack(outputs[-1].as_array())
        if not ((m.epoch == epoch).all() and (m.step == step).all()):  # our own invariant: never silent, even under -O
            self._close_pipeline()
            raise RuntimeError(
                f"dali_arb bug: the pipeline produced epoch {int(m.epoch[0])} step {int(m.step[0])} where the loader "
                f"expected epoch {epoch} step {step}; the batch was not handed out and the next one opens a new "
                "pipeline; please report this with your loader options"
            )
        for i in np.flatnonzero(m.failure != Failure.NONE):
            self._block(int(m.planned_row[i]), Failure(int(m.failure[i])), part=int(m.failed_part[i]))
        for name, column in IO_FIELDS.items():
            self._io[name] += int(m[column].sum())
        rows = m.row
        captions = self.captions.batch(
            self.data.column_at("caption", rows),
            seed=self.config.seed,
            epoch=epoch,
            step=step,
            offset=self._planner.epoch(epoch).offset,
        )
        return {
            "images": out,
            "ids": self.data.keys_at(rows),
            "dataset": torch.from_numpy(self.data.dataset_of(rows)),
            "captions": captions,
            "original_size": torch.from_numpy(m.pairs("orig_height", "orig_width")),
            "crop_top_left": torch.from_numpy(m.pairs("crop_top", "crop_left")),
            "target_size": (int(shape[2]), int(shape[3])),
            "flipped": torch.from_numpy(m.flipped != 0),
            "epoch": epoch,
            "step": step,
            **tensors,
        }


def _checked_state(state: Any) -> dict[str, Any]:
    """``state`` with its fields' types checked; a StateError naming the first bad field."""
    if not isinstance(state, dict):
        raise StateError(f"not a DALIBucketIterator state: a {type(state).__name__}, not a dict")
    if state.get("format") in (1, 2):
        raise StateError(
            f"state format {state['format']} was saved by an earlier dali_arb, whose plans differ from this version's "
            f"(format {STATE_FORMAT}): the saved step does not name the same batch here; to go on at its epoch, call "
            f"loader.set_epoch({state.get('epoch')!r}) instead of load_state_dict (the epoch starts again)"
        )
    if state.get("format") == 3 and state.get("step") != 0:
        raise StateError(
            f"state format 3 was saved by an earlier dali_arb, whose plans differ from this version's (format "
            f"{STATE_FORMAT}: what an epoch trims is drawn from all images, fractional repeats are rounded so that every "
            f"image is served alike): step {state.get('step')!r} of epoch {state.get('epoch')!r} names another batch "
            f"here, and going on from it would serve some images of that epoch twice and others never; call "
            f"loader.set_epoch({state.get('epoch')!r}) instead of load_state_dict (the epoch starts again), or load a "
            "state saved at an epoch's start, which carries over exactly"
        )
    if state.get("format") not in (3, STATE_FORMAT):  # 3 at an epoch's start: its epoch is planned anew, whole
        raise StateError(
            f"not a DALIBucketIterator state of this version (format {state.get('format')!r}, this dali_arb reads "
            f"{STATE_FORMAT}); save it again with this version"
        )
    checked = dict(state)
    for name in ("epoch", "step", "seed", "batch_size", "world_size", "num_images"):
        value = state.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if name in ("batch_size", "world_size") else 0)
        ):
            raise StateError(f"state field {name!r} must be a {'positive' if name in ('batch_size', 'world_size') else 'non-negative'} integer, got {value!r}")  # fmt: skip
        if value > (MAX_EPOCH if name == "epoch" else 2**63 - 1):
            raise StateError(f"state field {name!r} is out of range (at most {'2**62' if name == 'epoch' else '2**63 - 1'}), got {value!r}")  # fmt: skip
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise StateError(
            f"state has no {', '.join(map(repr, missing))} field{'s' if len(missing) > 1 else ''}, which every state of "
            "this version holds (it was edited or made by hand); load the dict that loader.state_dict() returned"
        )
    if not isinstance(state.get("failed", {}), dict):
        raise StateError(f"state field 'failed' must map keys to reasons, got {type(state['failed']).__name__}")
    checked["failed"] = state.get("failed", {})
    rows = state.get("failed_rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows):
        raise StateError(f"state field 'failed_rows' must be a list of manifest rows, got {rows!r:.80}")
    checked["failed_rows"] = rows
    buckets = state.get("buckets")
    try:
        if isinstance(buckets, list):
            checked["buckets"] = [BucketSpec.from_dict(b).to_dict() for b in buckets]
        else:
            checked["buckets"] = BucketSpec.from_dict(buckets).to_dict()
    except (ConfigError, TypeError) as exc:
        raise StateError(f"state field 'buckets' is not a bucket spec ({exc})") from None
    return checked


def _release(remote: Any, folder: Any) -> None:
    """A loader's end: its reads from object storage (fetcher thread, sockets, read-ahead in flight), then its
    read-ahead folder, in that order, so that nothing in flight writes into the folder once it is gone."""
    if remote is not None:
        remote.close()
    if folder is not None:
        folder.remove()


def _free_shared_memory() -> int | None:
    """Bytes free in ``/dev/shm`` (where DALI's workers hand batches over), or None where there is none."""
    try:
        info = os.statvfs("/dev/shm")
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


class _WorkerDied(Exception):
    """A worker process of the running pipeline has ended."""

    def __init__(self, process: Any) -> None:
        super().__init__(f"worker {process.pid} {describe_exit(process.exitcode)}")
        self.process = process


def _worker_processes(pipe: Any) -> list:
    """The ``multiprocessing.Process`` objects of a pipeline's parallel external source (DALI 1.x-2.x keep
    them at ``pipe._py_pool.pool._processes``), or ``[]``."""
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    return list(getattr(pool, "_processes", None) or [])


def _finalize_in_background(obj: Any) -> None:
    """Run ``obj``'s ``weakref.finalize`` callbacks now, on a daemon thread, instead of wherever it is collected.

    DALI closes a pipeline's worker pool in such a callback, and that close waits for its observer thread, which
    takes the lock of the pool's result queue: a worker killed while it held that lock (the OOM killer, or the
    loader ending the others after a death) leaves the close waiting forever. The training loop must not wait
    with it; the daemon thread ends with the process."""
    registry = getattr(weakref.finalize, "_registry", {})
    detached = [f.detach() for f in list(registry) if (f.peek() or (None,))[0] is obj]
    callbacks = [(func, args, kwargs) for _, func, args, kwargs in filter(None, detached)]  # not obj itself
    del detached

    def run() -> None:
        for func, args, kwargs in callbacks:
            with contextlib.suppress(Exception):
                func(*args, **(kwargs or {}))

    threading.Thread(target=run, name="dali_arb-closing-pipeline", daemon=True).start()


def _first_dead(processes: list) -> Any:
    """The first of ``processes`` that has ended, or ``None``."""
    return next((p for p in processes if p.exitcode is not None), None)


def _serve_jobs(jobs: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """A runner thread's loop: run each job, hand back ``(ok, value)``; ``None`` ends it."""
    while (job := jobs.get()) is not None:
        try:
            results.put((True, job()))
        except BaseException as exc:
            results.put((False, exc))
        del job


class _Runner:
    """A daemon thread that runs one callable at a time, so the caller can wait with a watch."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        # the thread holds the queues, not the runner, so the runner can be collected; its thread then ends
        thread = threading.Thread(target=_serve_jobs, args=(self._jobs, self._results), name="dali_arb-pipeline",
                                  daemon=True)  # fmt: skip
        thread.start()
        weakref.finalize(self, self._jobs.put, None)
        #: Jobs whose result was not taken (a wait interrupted by Ctrl-C): their results come first.
        self.owed = 0

    def run(self, job: Any, dead: Any, *, grace: float) -> Any:
        """``job()``'s result (or its exception); :class:`_WorkerDied` when ``dead()`` names a process and
        no result comes within ``grace`` seconds after that."""
        self.owed += 1
        self._jobs.put(job)
        deadline = None
        while True:
            try:
                ok, value = self._results.get(timeout=WATCH_INTERVAL_S)
                self.owed -= 1
            except queue.Empty:
                corpse = dead()
                if corpse is not None:
                    deadline = deadline or time.monotonic() + grace
                    if time.monotonic() >= deadline:
                        raise _WorkerDied(corpse) from None
                continue
            if ok:
                return value
            raise value


class _OneAtATime:
    """An external source serving prepared samples one per run, from position ``start`` (for probing)."""

    def __init__(self, samples: tuple[list, ...], start: int) -> None:
        self.samples = samples
        self.start = start

    def __call__(self, batch_info) -> tuple[list, ...]:
        position = min(self.start + batch_info.iteration, len(self.samples[0]) - 1)
        return tuple([output[position]] for output in self.samples)
