"""The framework-free loader: a :class:`LoaderSession` holds the position, starts, advances and closes the DALI
pipeline, recovers from bad samples and dead workers, and hands out :class:`Batch` es of DALI outputs and NumPy
arrays. A framework adapter (``dali_arb.torch``, ``dali_arb.jax``) subclasses it and converts each batch.

Imports NumPy, the plan and data layers and the loader's parts; DALI when a pipeline is built; no torch, no JAX.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.manifest import Manifest, ManifestSet
from ..errors import (
    ConfigError,
    DaliArbError,
    DataError,
    ManifestError,
    ResourceError,
    StateError,
    Translation,
    translate,
)
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec
from ..plan.mixture import check_repeats
from ..plan.world import World
from ..processes import describe_exit
from . import recovery, resources
from .blocklist import Blocklist
from .contracts import IO_FIELDS, META, Failure, io_stats
from .decoders import DaliDecoder, Decoder, choose_decoder, cpu_count
from .decoders.video import refuse_large_clips
from .options import Dataset, LoaderOptions
from .planning import LoaderConfig, build_planner
from .source import BatchSource
from .state import check_resumable, checked_epoch, checked_state, compose
from .workers import ThreadedSource

__all__ = ["Batch", "LoaderSession"]

log = logging.getLogger("dali_arb")


@dataclass
class Batch:
    """One batch before any framework sees it. ``parts``: the pipeline's outputs by key (``images``
    ``[B, 3, H, W]``, then one per pair or mask), DALI tensor lists; ``ids``, ``captions``: lists of B;
    ``dataset``: ``int64 [B]``; ``original_size``, ``crop_top_left``: ``int64 [B, 2]``; ``flipped``: ``bool [B]``.
    A video loader's ``parts`` hold ``video`` ``[B, F, 3, H, W]`` instead of ``images``, and ``frame_index``
    (``int64 [B, F]``: source frame numbers) and ``fps`` (``float32 [B]``: the rate the clips are served at) are
    set; None for images."""

    parts: dict[str, Any]
    ids: list[str]
    captions: list[str]
    dataset: np.ndarray
    original_size: np.ndarray
    crop_top_left: np.ndarray
    flipped: np.ndarray
    epoch: int
    step: int
    frame_index: np.ndarray | None = None
    fps: np.ndarray | None = None

    @classmethod
    def of(cls, parts: dict[str, Any], meta: Any, data: ManifestSet, captions: list[str]) -> Batch:
        """The batch of DALI's ``parts`` and the unpacked ``meta`` (:data:`~dali_arb.loader.contracts.META`)."""
        rows = meta.row
        return cls(
            parts=parts, ids=data.keys_at(rows), captions=captions, dataset=data.dataset_of(rows),
            original_size=meta.pairs("orig_height", "orig_width"), crop_top_left=meta.pairs("crop_top", "crop_left"),
            flipped=meta.flipped != 0, epoch=int(meta.epoch[0]), step=int(meta.step[0]),
        )  # fmt: skip


def _rows_of(data: ManifestSet, rows: list[int]) -> Any:
    """``rows_of(keys)`` for :meth:`Blocklist.restore`: the saved ``rows`` whose key is the saved key (the manifest
    is the same: its fingerprint was checked), in O(len(rows))."""

    def rows_of(keys: list[str]) -> list[int]:
        valid = [int(r) for r in rows if 0 <= int(r) < len(data)]
        wanted = set(keys)
        return [r for r, key in zip(valid, data.keys_at(np.array(valid, np.int64))) if key in wanted]

    return rows_of


def _bucket_config(datasets: list[Dataset]) -> tuple[BucketSpec | tuple[BucketSpec, ...], tuple[float, ...] | None]:
    """The plan's ``spec`` (one shared, or one per dataset) and ``repeats`` (``None``: one dataset, served once)."""
    specs = [d.buckets or BucketSpec() for d in datasets]
    spec = specs[0] if all(s == specs[0] for s in specs) else tuple(specs)
    given = len(datasets) > 1 or any(d.repeats is not None for d in datasets)
    repeats = (
        check_repeats([1.0 if d.repeats is None else d.repeats for d in datasets], len(datasets)) if given else None
    )
    return spec, repeats


def _open_manifests(datasets: list[Dataset], cache_dir: Any) -> list[Manifest]:
    manifests = [d.manifest if isinstance(d.manifest, Manifest) else Manifest.open(d.manifest, cache_dir=cache_dir)
                 for d in datasets]  # fmt: skip
    for m in manifests:
        if len(m) == 0:
            raise ManifestError(
                f"manifest {m.path or ''} is empty: no images; index a folder with images "
                "(`dali-arb index FOLDER_OR_SHARDS -o MANIFEST`)",
                source=None if m.path is None else str(m.path),
                kind="no_images",
            )
        if "source" not in m.table.column_names or m.table.column("source").null_count == len(m):
            raise ManifestError(
                f"manifest {m.path or ''} has no image files to read (it was indexed from metadata without "
                "a path column); index the images themselves with `dali-arb index FOLDER_OR_SHARDS`",
                source=None if m.path is None else str(m.path),
                kind="no_images",
            )
    return manifests


def _video_decoder(options: LoaderOptions, device: str, data: ManifestSet) -> Decoder:
    """The video decoder of a loader with ``frames=`` (:func:`~dali_arb.loader.decoders.video.choose_video_decoder`),
    refused with one clear line where it cannot serve the datasets."""
    from .decoders.video import choose_video_decoder

    if data.pairs:
        raise ConfigError(f"paired images ({', '.join(data.pairs)}) are not served with frames= (video) yet; "
                          "load the pairs without frames=, or index the videos without --pair")  # fmt: skip
    if options.decode.decoder != "auto":
        raise ConfigError(f"with frames= (video) the decoder is chosen by video_decoder= ('auto', 'pyav', "
                          f"'dali_video'), not decoder={options.decode.decoder!r}")  # fmt: skip
    decoder = choose_video_decoder(options.video.decoder, device)
    if not decoder.serves_images and options.video.images == "include":
        raise ConfigError(f"video_decoder={decoder.name!r} decodes videos only; give images='exclude' "
                          "(or video_decoder='pyav', which serves images as 1-frame clips)")  # fmt: skip
    return decoder


class LoaderSession:
    """Aspect-ratio-bucketed batches of ``datasets`` with ``options``, as framework-free :class:`Batch` es.

    ``len(session)`` is the number of steps in the current epoch, equal on every rank; iterating runs the rest of
    it, then the next epoch. Subclasses convert batches in :meth:`convert` (the default returns the Batch)."""

    def __init__(self, datasets: list[Dataset], options: LoaderOptions) -> None:
        from .pipeline import resolve_device

        if not datasets:
            raise ConfigError("give at least one manifest")
        self.options = options
        spec, repeats = _bucket_config(datasets)
        manifests = _open_manifests(datasets, options.cache_dir)
        self.data = ManifestSet(manifests)
        self.world = world = World.detect(options.rank, options.world_size)
        decode = options.decode
        self.device = resolve_device(decode.device)
        self.device_id = (
            (world.local_rank if decode.device_id is None else decode.device_id) if self.device == "gpu" else None
        )
        self.dtype = decode.dtype
        self.config = LoaderConfig(
            batch_size=options.batch_size, spec=spec, seed=options.seed, rank=world.rank,
            world_size=world.world_size, leftover=options.leftover.value, sync_ranks=options.sync_ranks,
            crop=options.augment.crop, flip=options.augment.flip, repeats=repeats, frames=options.video.spec(),
        )  # fmt: skip
        self.captions = options.captions
        #: Each dataset's caption policy: its own, else the loader's.
        self._captions_of = [d.captions or options.captions for d in datasets]
        self.manifests = manifests
        self.manifest = manifests[0]  # the only one, or the first dataset's
        self._planner = build_planner(self.config, manifests)  # validates batch size, seed, buckets, repeats
        #: The largest batch of any step (the batch size, or with batch sizes by bucket the largest): what the
        #: pipeline is built for; each step serves its own bucket's batch (DALI's external source varies it).
        self.batch_size = int(self._planner.max_batch)
        gpu = self.device == "gpu"
        if options.video.on:
            self.decoder: Decoder = _video_decoder(options, self.device, self.data)
            refuse_large_clips(self.decoder, self._planner, self.data, options.video.max_clip_mb)
        else:
            self.decoder = choose_decoder(
                decode.decoder, self.device, pairs=tuple(self.data.pairs.items()),
                hw_decoder_load=decode.hw_decoder_load, jpeg_scaling=decode.jpeg_scaling,
                preallocate=self._preallocation() if gpu and decode.decoder in ("auto", "dali") else None,
            )  # fmt: skip
        cores = max(1, cpu_count() // world.local_world_size)  # the ranks of a node share its cores
        work = options.workers
        self.workers = work.count if work.count is not None else self.decoder.default_workers(cores)
        self.worker_kind = work.kind
        self.num_threads = decode.num_threads or self.decoder.default_threads(cores, gpu=gpu)
        self.prefetch = work.prefetch
        self._read_ahead_plan = resources.plan_read_ahead(
            workers=self.workers, kind=self.worker_kind, prefetch=self.prefetch, batch_size=self.batch_size,
            decoder=self.decoder, planner=self._planner, encoded=int(self._served_p99["length"] or 0),
        )  # fmt: skip
        ahead = (self._read_ahead_plan["source_prefetch"] + self.prefetch + 1) if self.workers else 2
        remote, read_ahead_steps, folder = resources.remote_reads(
            manifests, steps=options.remote.read_ahead, ahead=ahead, cache=options.remote.sample_cache,
            cache_gb=options.remote.sample_cache_gb,
        )  # fmt: skip
        # at close(), when collected, or at exit: the loader's own reads end, then its read-ahead folder goes
        self._release = weakref.finalize(self, resources.release, remote, folder)
        self._source = BatchSource(manifests, self.config, self.decoder, planner=self._planner, remote=remote,
                                   read_ahead_steps=read_ahead_steps)  # fmt: skip
        self._closed = False
        self._io: dict[str, int] = dict.fromkeys(IO_FIELDS, 0)
        self._epoch, self._step = 0, 0
        self._pipe: Any = None
        self._stream: tuple[int, int] | None = None  # (epoch, step) the pipeline produces next
        self._blocklist = Blocklist()
        self._runner: recovery.Runner | None = None
        self._threaded: ThreadedSource | None = None  # the running pipeline's worker threads
        self._worker_deaths = 0

    @functools.cached_property
    def _served_p99(self) -> dict[str, float | None]:
        """:func:`~dali_arb.loader.resources.served_p99_of` this loader's images; taken once, when first needed."""
        return resources.served_p99_of(self._planner, self.data)

    def _preallocation(self) -> tuple[int, int]:
        return resources.preallocation(self._served_p99)

    # -- the public surface -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self._planner.steps_per_epoch(self._epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step at the next iteration."""
        epoch = checked_epoch(epoch)
        if epoch != self._epoch or self._step >= len(self):
            self._epoch, self._step = epoch, 0

    @property
    def failed(self) -> list[str]:
        """Keys of samples that could not be read or decoded at run time (each was replaced)."""
        return self._blocklist.keys

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise ConfigError(f"this loader was closed (loader.close()); build a new {type(self).__name__} to go on")
        if self._step >= len(self):
            self._epoch, self._step = self._epoch + 1, 0
        while self._step < len(self):
            batch = self._fetch(self._epoch, self._step)
            self._step += 1
            yield batch

    def convert(self, batch: Batch) -> Any:
        """What iterating hands out for ``batch``: the Batch itself here; a framework's arrays in an adapter."""
        return batch

    def close(self) -> None:
        """Stop the pipeline and its workers, end the reads from object storage (their threads and sockets) and
        remove the read-ahead folder; the state stays readable (``state_dict``), iterating is refused. Idempotent;
        a loader that is collected, or alive at exit, is closed the same way. Also usable as a context manager."""
        self._closed = True
        self._close_pipeline()
        self._runner = None
        self._release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable: the position and everything that decides the batches, composed from the
        pieces each component owns (:mod:`dali_arb.loader.state`). Taken after the last step of an epoch, the
        position is the next epoch's first step."""
        epoch, step = self._epoch, self._step
        if step >= self._planner.steps_per_epoch(epoch):
            epoch, step = epoch + 1, 0
        return compose(
            {"epoch": epoch, "step": step},
            self.config.to_dict(),
            {"num_images": len(self.data), "manifest": self._source.fingerprint},
            {"captions": self._captions_state()},
            self._blocklist.to_dict(),
        )

    def _captions_state(self) -> dict[str, Any]:
        """The loader's caption policy, or where a dataset has its own, ``{"datasets": [policy of each]}``."""
        if all(p is self.captions for p in self._captions_of):
            return self.captions.to_dict()
        return {"datasets": [p.to_dict() for p in self._captions_of]}

    def _batch_captions(self, rows: np.ndarray, *, epoch: int, step: int, offset: int) -> list[str]:
        """The captions of the samples at global ``rows`` of ``step`` (the first at global position ``offset``),
        each drawn by its dataset's policy."""
        texts = self.data.column_at("caption", rows)
        if all(p is self.captions for p in self._captions_of):
            return self.captions.batch(texts, seed=self.config.seed, epoch=epoch, step=step, offset=offset)
        out = []
        for i, (text, d) in enumerate(zip(texts, self.data.dataset_of(rows).tolist())):
            out += self._captions_of[d].batch([text], seed=self.config.seed, epoch=epoch, step=step, offset=offset + i)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: the next batch is the one that would have come.

        The world size may differ if the global batch (world size x batch size) is the same and
        ranks are in sync: the same global batches then continue (elastic resume).
        """
        state = checked_state(state)
        check_resumable(state, self.state_dict(), datasets=len(self.manifests), units=self._global_units)
        epoch, step = state["epoch"], state["step"]
        steps = self._planner.steps_per_epoch(epoch)
        if step > steps:
            raise StateError(f"state is at step {step} of epoch {epoch}, which has only {steps} steps here")
        self._blocklist = Blocklist.restore(state["failed"], _rows_of(self.data, state.get("failed_rows") or []))
        self._epoch, self._step = epoch, step
        if step == steps:  # a state taken at an epoch's end (format 1) resumes at the next epoch
            self._epoch, self._step = epoch + 1, 0
        self._close_pipeline()

    def _global_units(self, state: dict[str, Any]) -> list[int]:
        """Each bucket's global batch (world size x its batch) under the batch sizes of ``state``."""
        sizing = (
            BatchSizing.of(state["batch_size"])
            if state["batching"] is None
            else BatchSizing.from_dict(state["batching"])
        )
        return (state["world_size"] * sizing.per_bucket(self._planner.index.sizes, self._planner.frames)).tolist()

    def read_ahead_bytes(self) -> int:
        """Memory the batches the workers compute ahead may hold at most (:func:`resources.read_ahead_bytes`)."""
        return resources.read_ahead_bytes(self._read_ahead_plan, batch_size=self.batch_size,
                                          kind=self.worker_kind, prefetch=self.prefetch)  # fmt: skip

    @property
    def stats(self) -> dict[str, Any]:
        """What reading from object storage cost so far (:func:`~dali_arb.loader.contracts.io_stats`)."""
        return io_stats(self._io)

    # -- the pipeline -------------------------------------------------------------------------------
    def _close_pipeline(self) -> None:
        self._pipe = None
        self._stream = None
        if self._threaded is not None:
            self._threaded.close()
            self._threaded = None

    def _build(self, source: Any, *, batch_size: int, device: str, workers: int, dtype: str, threads: int,
               prefetch: int) -> Any:  # fmt: skip
        from .pipeline import build_pipeline

        plan = self._read_ahead_plan
        return build_pipeline(
            source, decoder=self.decoder, batch_size=batch_size, device=device,
            device_id=self.device_id if device == "gpu" else None, dtype=dtype, num_threads=threads, workers=workers,
            prefetch=prefetch, source_prefetch=plan["source_prefetch"] or None,
            bytes_per_sample_hint=plan["bytes_per_sample"] or None,
        )  # fmt: skip

    def _open_pipeline(self, epoch: int, step: int) -> None:
        self._close_pipeline()
        source = self._source.starting_at(epoch, step, self._blocklist.rows)
        workers = self.workers
        if workers and self.worker_kind == "thread":
            depth = self._read_ahead_plan["source_prefetch"]
            source = self._threaded = ThreadedSource(source, threads=workers, depth=depth)
            workers = 0  # DALI calls it in this process
        self._pipe = self._build(source, batch_size=self.batch_size, device=self.device, workers=workers,
                                 dtype=self.dtype, threads=self.num_threads, prefetch=self.prefetch)  # fmt: skip
        self._stream = (epoch, step)

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self._planner.steps_per_epoch(epoch) else (epoch + 1, 0)

    def _fetch(self, epoch: int, step: int) -> Any:
        recoveries = self.batch_size + 1
        for _ in range(recoveries):
            if self._pipe is None or self._stream != (epoch, step):
                self._open_pipeline(epoch, step)
            # unknown while the run is in flight: one that ends any other way than below (Ctrl-C lands in it, say)
            # leaves the pipeline where nobody knows, so the next fetch opens a new one at the loader's step
            self._stream = None
            try:
                outputs = self._run_pipeline()
            except recovery.WorkerDied as died:
                self._abandon_pipeline(died)
                continue
            except DaliArbError:
                self._close_pipeline()
                raise
            except Exception as exc:  # DALI ends a pipeline on one undecodable image: find it, skip it
                said = translate(exc, during="pipeline", device=self.device, epoch=epoch, step=step)
                if said.kind == "ours":  # a worker process's own error, wrapped by DALI: as if raised here
                    self._close_pipeline()
                    raise said.error from None
                self._release_failed_pipeline()
                self._recover(epoch, step, said)
                continue
            self._stream = self._advance(epoch, step)
            batch = self._to_batch(outputs, epoch, step)
            corpse = recovery.first_dead(recovery.worker_processes(self._pipe))
            if corpse is not None:  # it died idle: nothing was lost, but the pool runs short from here on
                self._abandon_pipeline(recovery.WorkerDied(corpse), resume="the next step")
            return batch
        raise DataError(
            f"batch {step} of epoch {epoch} kept failing after {recoveries} recoveries, each blocklisting "
            "an undecodable sample; check the files listed in loader.failed and re-index",
            epoch=epoch,
            step=step,
            kind="recoveries",
        )

    def _run_pipeline(self) -> tuple[Any, ...]:
        """``pipe.run()``, watched for worker processes that die (:func:`~dali_arb.loader.recovery.run_watched`)."""
        processes = recovery.worker_processes(self._pipe)
        if not processes:
            return self._pipe.run()
        if self._runner is None or self._runner.owed:  # a run interrupted (Ctrl-C): its result would come next
            self._runner = recovery.Runner()
        try:
            return recovery.run_watched(self._pipe.run, self._runner, processes)
        except recovery.WorkerDied:
            self._runner = None  # its thread may stay blocked inside DALI: never hand it work again
            raise

    def _abandon_pipeline(self, died: recovery.WorkerDied, *, resume: str = "the same step") -> None:
        """Leave a pipeline whose worker died: end its other workers; the next fetch opens a new one where
        the loader stands (the plan makes its batches the same); after ``MAX_WORKER_DEATHS`` deaths, one
        clear error instead."""
        pipe, self._pipe, self._stream = self._pipe, None, None
        recovery.abandon(pipe)
        del pipe
        self._worker_deaths += 1
        what = f"a loader worker process (pid {died.process.pid}) {describe_exit(died.process.exitcode)}"
        if self._worker_deaths > recovery.MAX_WORKER_DEATHS:
            raise ResourceError(
                f"{what}, the {self._worker_deaths}th worker death of this loader; give the machine more memory, "
                "or lower workers, prefetch or batch_size",
                cause=describe_exit(died.process.exitcode),
                kind="worker_deaths",
            )
        log.warning("dali_arb: %s; restarting the pipeline at %s", what, resume)

    def _release_failed_pipeline(self) -> None:
        """Drop a pipeline that hit a critical error, and the memory it held, before anything else runs."""
        self._close_pipeline()
        recovery.release_unused_memory(gpu=self.device == "gpu")

    def _recover(self, epoch: int, step: int, said: Translation) -> None:
        """After a DALI error in ``step`` (``said``: its row of :data:`~dali_arb.errors.TABLE`): blocklist the
        samples that cannot be decoded, or raise one clear error when the files are not what failed
        (:func:`~dali_arb.loader.recovery.culprits`)."""
        samples = self._source.starting_at(epoch, step, self._blocklist.rows).batch(epoch, step)

        def build(source: Any, *, device: str) -> Any:
            return self._build(source, batch_size=1, device=device, workers=0, dtype="uint8", threads=1, prefetch=1)

        dali_video = self.decoder.name == "dali_video"  # DALI decodes the clips (NVDEC; VP9/MJPEG on the CPU)
        for row in recovery.culprits(said, samples, build, device=self.device, cpu_probe=not dali_video,
                                     decodes_in_dali=isinstance(self.decoder, DaliDecoder) or dali_video):  # fmt: skip
            self._block(row, Failure.DALI_UNDECODABLE, f" ({said.facts.summary})")

    def _block(self, row: int, failure: Failure, detail: str = "", *, part: int = 0) -> None:
        """Blocklist manifest ``row`` for ``failure`` of its image (``part`` 0) or of its ``part - 1``-th pair
        (logged once, with where the bytes are)."""
        key = self.data.keys_at(np.array([row]))[0]
        self._blocklist.add(row, key, failure.describe(self._source.location(row, part)) + detail)

    def _to_batch(self, outputs: tuple, epoch: int, step: int) -> Any:
        return self.convert(self._assemble(outputs, epoch, step))

    def _assemble(self, outputs: tuple, epoch: int, step: int) -> Batch:
        """The :class:`Batch` of the pipeline's outputs ``(images, *pairs, meta)``; records the samples the
        source replaced and what reading them cost."""
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
        offset = self._planner.epoch(epoch).offset_at(step)
        captions = self._batch_captions(m.row, epoch=epoch, step=step, offset=offset)
        parts = {key: output for (key, _, _), output in zip(self.decoder.parts, outputs[:-1])}
        batch = Batch.of(parts, m, self.data, captions)
        if getattr(self.decoder, "video", False):  # (video, frame_index, fps, meta)
            batch.parts = {"video": outputs[0]}
            batch.frame_index = np.stack([np.asarray(outputs[1][i]) for i in range(len(outputs[1]))])
            batch.fps = np.asarray(outputs[2].as_array(), np.float32).reshape(-1)
        return batch
