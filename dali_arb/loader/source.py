"""The external source: a stateless, picklable callable that turns a batch index into the outputs its
decoder names (``decoders/``), plus ``mirror`` and ``meta`` (``contracts.META``).

No DALI import here: DALI calls :class:`BatchSource` with its ``BatchInfo`` (only ``.iteration``
is used) from worker processes. Every value is a pure function of the loader's arguments, the
epoch and the step, so resuming reproduces batches bit for bit. Its parts: where a row's bytes are
(``samples.py``), reading them (``data.localfiles`` and ``data.readahead``), stand-ins for bad samples
(``replacements.py``) and the batch's columns (``assembly.py``).

Imports NumPy, pyarrow (``has_urls``), ``errors``, ``processes``, ``data`` (manifest, pairs, readahead, storage,
localfiles, imagefacts; ``data.cache`` in worker processes of a mapped manifest), ``plan`` (planner, geometry) and
the loader's ``contracts``, ``decoders``, ``planning``, ``samples``, ``replacements`` and ``assembly``.
"""

from __future__ import annotations

import copy

import numpy as np

from ..data.imagefacts import check_encoded
from ..data.localfiles import FileProblem, open_local, read_local
from ..data.manifest import Manifest
from ..data.pairs import pair_columns
from ..data.readahead import RemoteReads
from ..data.storage import URL_PATTERN, is_url, max_sample_bytes
from ..data.storage.ranged import RangedObject, ViewBase
from ..errors import ManifestError, ObjectChanged, ObjectMissing, ObjectTooLarge, StorageError
from ..plan.geometry import Geometry
from ..plan.planner import EpochPlan, Planner
from ..processes import die_with_parent
from .assembly import BatchColumns, place
from .contracts import Failure
from .decoders import Decoder
from .decoders.videoframes import ClipFrames
from .planning import LoaderConfig, build_planner
from .replacements import replacement_row, serve_or_replace
from .samples import Datasets, remote_request

__all__ = ["BatchSource"]

#: Columns the worker processes read from an in-memory manifest's file (besides key, width, height).
WORKER_COLUMNS = ["source", "offset", "length", "mtime_ns", "source_size", "etag"]


def has_urls(manifest: Manifest) -> bool:
    """Whether any of ``manifest``'s samples lives in object storage: every row looked at, in Arrow (a dictionary
    column's distinct values only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "source" not in manifest.table.column_names:
        return False
    column = manifest.table.column("source")
    chunks = [c.dictionary for c in column.chunks] if pa.types.is_dictionary(column.type) else column.chunks
    return any(pc.any(pc.match_substring_regex(chunk, URL_PATTERN)).as_py() for chunk in chunks)


def _bytes_or_failure(
    result: bytes | FileProblem | StorageError, *, image: bool = True
) -> tuple[np.ndarray | None, Failure]:
    """A sample's encoded bytes ``uint8 (n,)``, or ``(None, failure)`` for its own problem: what a local file
    (:func:`~dali_arb.data.localfiles.read_local`) or the store (``RemoteReads.take``) gave, checked
    (:func:`~dali_arb.data.imagefacts.check_encoded`). A StorageError that is not the sample's own (the store, its
    credentials or the network failed) is raised: the run stops, nothing is blocklisted."""
    if isinstance(result, FileProblem):
        return None, Failure[result.name]
    if isinstance(result, ObjectMissing):
        return None, Failure.MISSING
    if isinstance(result, ObjectChanged):
        return None, Failure.CHANGED
    if isinstance(result, ObjectTooLarge):
        return None, Failure.TOO_LARGE
    if isinstance(result, StorageError):  # (a copy: the fetcher hands one error to every sample of a request)
        raise result.copy() from result.__cause__
    problem = check_encoded(result) if image else (None if result else "empty")
    if problem:
        return None, Failure.of_bytes_problem(problem)
    return np.frombuffer(result, np.uint8), Failure.NONE


class BatchSource:
    """DALI external source: ``source(batch_info)`` returns one batch of this rank.

    Outputs: one list per name in ``decoder.outputs`` (per-sample arrays), in that order; ``mirror``
    is ``int32 ()`` and ``meta`` is ``int64 (F,)`` (``contracts.META``).

    The stream of batches starts at step ``first_step`` of ``first_epoch`` and runs on through the
    following epochs without end; the loader takes ``len(epoch)`` batches per epoch.

    Args:
        manifests: the manifest the loader serves, or one per dataset (rows are global rows: dataset ``d``'s
            row ``r`` is ``offsets[d] + r``, :class:`~dali_arb.plan.rows.GlobalRows`). Worker processes map the
            same caches when they are mapped (``Manifest.open``), else re-read the files (when there are files);
            either way they refuse a manifest file whose content changed since.
        config: what decides the batches.
        decoder: the :class:`~dali_arb.loader.decoders.Decoder` chosen by the loader.
        planner: the loader's planner (rebuilt from the manifests in worker processes).
        blocked_rows: rows known to be bad (the loader's blocklist): replaced without being read.
        remote: how samples in object storage are read (:class:`~dali_arb.data.readahead.RemoteReads`).
        read_ahead_steps: iterations ahead whose samples in object storage are fetched in the background
            (``L``); 0 fetches each such sample when it is needed, one request at a time.
    """

    def __init__(
        self,
        manifests: Manifest | list[Manifest],
        config: LoaderConfig,
        decoder: Decoder,
        *,
        planner: Planner | None = None,
        first_epoch: int = 0,
        first_step: int = 0,
        blocked_rows: frozenset[int] = frozenset(),
        remote: RemoteReads | None = None,
        read_ahead_steps: int = 0,
    ) -> None:
        manifests = [manifests] if isinstance(manifests, Manifest) else list(manifests)
        self.remote = remote if remote is not None else RemoteReads(None)
        self.read_ahead_steps = int(read_ahead_steps)
        self.config = config
        self.decoder = decoder
        self.first_epoch = first_epoch
        self.first_step = first_step
        self.blocked_rows = frozenset(blocked_rows)
        self.num_rows = [len(m) for m in manifests]
        pinned = [m.pinned for m in manifests]
        self.fingerprint: str | list[str] = pinned[0] if len(pinned) == 1 else pinned
        # Workers reopen manifests that live in files instead of receiving them pickled: (path, cache) each.
        self._homes = [
            (
                str(m.path) if m.path is not None else None,
                (str(m.cache.folder), m.cache.signature) if m.cache is not None else None,
                p,
            )
            for m, p in zip(manifests, pinned)
        ]
        self._manifests: list[Manifest] | None = manifests
        self._planner = planner
        self._remote_rows = any(has_urls(m) for m in manifests)  # once, here: workers receive it
        self._ready = False

    def __getstate__(self) -> dict:
        keep = ("config", "decoder", "first_epoch", "first_step", "blocked_rows", "num_rows",
                "fingerprint", "_homes", "remote", "read_ahead_steps", "_remote_rows")  # fmt: skip
        state = {k: self.__dict__[k] for k in keep}
        if any(path is None for path, _, _ in self._homes):  # nothing to reload: send manifests and planner along
            state["_manifests"] = self._manifests
            state["_planner"] = self._planner
        return state

    def __setstate__(self, state: dict) -> None:
        import multiprocessing

        self.__dict__.update(state)
        if multiprocessing.parent_process() is not None:  # in a DALI worker: never outlive the training process
            die_with_parent()
            self.decoder.enter_worker()
        self.__dict__.setdefault("_manifests", None)
        self.__dict__.setdefault("_planner", None)
        self._ready = False

    # -- lazy set-up (in each worker) -------------------------------------------------------------
    def _reopen(self, d: int) -> Manifest:
        """Dataset ``d``'s manifest as the loader had it: its mapped cache, else its file, checked unchanged."""
        path, cache, pinned = self._homes[d]
        if cache is not None:
            from ..data.cache import ManifestCache

            folder, signature = cache
            return ManifestCache.at(folder, manifest_path=path, signature=signature).manifest()
        paired = [c for name, _ in self.decoder.pairs for c in pair_columns(name)]
        manifest = Manifest.read(path, columns=WORKER_COLUMNS + paired)
        if manifest.pinned != pinned:
            raise ManifestError(
                f"manifest {path} changed on disk after the loader was built "
                f"({len(manifest)} rows now, {self.num_rows[d]} then, or the same count with other content); "
                "a live loader never serves a rewritten manifest: build a new loader (or write to a new file)"
            )
        return manifest

    def _setup(self) -> None:
        if self._ready:
            return
        manifests = self._manifests or [self._reopen(d) for d in range(len(self._homes))]
        self._datasets = Datasets(manifests, self.decoder.pairs)
        if self._planner is None:
            self._planner = build_planner(self.config, manifests)
        self._found_bad: dict[int, tuple[Failure, int]] = {}  # row -> (failure, part), found by this source
        self._epoch_lengths: dict[int, int] = {}
        if all(path is not None for path, _, _ in self._homes):
            self._manifests = None  # keep only the arrays above; workers reload the files
        self._ready = True

    def starting_at(self, epoch: int, step: int, blocked_rows: frozenset[int]) -> BatchSource:
        """The same source, its stream starting at ``step`` of ``epoch``, with the loader's current
        blocklist; it shares the set-up arrays (pickling for worker processes drops them)."""
        restarted = self._view()
        restarted.first_epoch, restarted.first_step = epoch, step
        restarted.blocked_rows = frozenset(blocked_rows)
        restarted._found_bad = {}
        return restarted

    def for_thread(self) -> BatchSource:
        """A view for one more thread serving this stream (:class:`~dali_arb.loader.workers.ThreadedSource`): the arrays,
        the plan and the samples found bad are shared; reads from object storage are its own."""
        self.decoder.enter_worker()
        view = self._view()
        view.remote = copy.copy(self.remote)  # RemoteReads copies its settings only: its own fetcher and counters
        return view

    def close(self) -> None:
        """End a :meth:`for_thread` view's own reads from object storage (its fetcher thread and sockets)."""
        self.remote.close()

    def _view(self) -> BatchSource:
        """A shallow copy that shares the set-up (``copy.copy`` would go through ``__getstate__``, which drops
        it for worker processes: every copy would map the caches and plan again)."""
        self._setup()
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view

    @property
    def planner(self) -> Planner:
        self._setup()
        return self._planner

    def epoch_length(self, epoch: int) -> int:
        self._setup()
        if epoch not in self._epoch_lengths:
            self._epoch_lengths[epoch] = len(self._planner.epoch(epoch))
        return self._epoch_lengths[epoch]

    def locate(self, iteration: int) -> tuple[int, int]:
        """``(epoch, step)`` of the ``iteration``-th batch of the stream."""
        epoch, step = self.first_epoch, self.first_step + iteration
        while step >= self.epoch_length(epoch):
            step -= self.epoch_length(epoch)
            epoch += 1
        return epoch, step

    # -- DALI entry point -------------------------------------------------------------------------
    def __call__(self, batch_info) -> tuple[list, ...]:
        iteration = int(batch_info if isinstance(batch_info, int) else batch_info.iteration)
        epoch, step = self.locate(iteration)
        outputs = self.batch(epoch, step)
        if self.read_ahead_steps and self._remote_rows:
            # the plan says what comes: start fetching iteration + L (the first iteration also 1 .. L - 1)
            L = self.read_ahead_steps
            for ahead in range(1, L + 1) if iteration == 0 else (L,):
                target_epoch, target_step = self.locate(iteration + ahead)
                rows = self.rows_of(self._planner.epoch(target_epoch).rows_at(target_step))
                self.remote.read_ahead(self._datasets.requests(self._fetched_whole(rows)))
        return outputs

    def batch(self, epoch: int, step: int) -> tuple[list, ...]:
        """Outputs for ``step`` of ``epoch``: one list of per-sample arrays per ``decoder.outputs`` name."""
        self._setup()
        plan: EpochPlan = self._planner.epoch(epoch)
        rows = plan.rows_at(step)  # samples: manifest rows, or clip ids when the plan is over clips
        if self.read_ahead_steps and self._remote_rows:
            self.remote.gather(
                self._datasets.requests(self._fetched_whole(self.rows_of(rows)))
            )  # at once, concurrently
        bucket = plan.bucket_at(step)
        bucket_h, bucket_w = (int(v) for v in plan.sizes[bucket])
        # every clip of a step is served at the step's frame count (a pooled leftover clip may be longer)
        frames = int(plan.frames_at(step)) if self._clips is not None else None
        offset = plan.offset_at(step)
        c = self.config
        # Per-sample randomness keyed by position in the global batch: independent of world size.
        draws = np.random.default_rng([c.seed, epoch, step, 0x5EED]).random((offset + len(rows), 3))[offset:]
        columns = BatchColumns(self.decoder.outputs)
        for position, planned in enumerate(rows.tolist()):
            u_y, u_x, u_flip = draws[position]
            served, failure, failed_part, (sample, g) = self._serve(
                planned, bucket, epoch, step, offset + position, (bucket_h, bucket_w, float(u_y), float(u_x)), frames
            )
            mirror = bool(u_flip < c.flip)
            row = self.row_of(served)
            columns.add(sample, row=row, planned=self.row_of(planned), failure=failure, failed_part=failed_part,
                        geometry=g, mirror=mirror, epoch=epoch, step=step,
                        original=self._datasets.original_size(row))  # fmt: skip
        self.remote.clear()
        if self._remote_rows:  # what was read since the last batch travels on its first sample
            columns.count_reads(self.remote.stats.take())
        return columns.outputs()

    # -- reading, with deterministic replacement of bad samples ------------------------------------
    def location(self, row: int, part: int = 0) -> str:
        """Where the bytes of ``row``'s image (``part`` 0) or its ``part - 1``-th pair are: the file, or
        ``shard.tar@offset`` inside a shard; a pair's prefixed by its kind and name."""
        self._setup()
        path, offset, _ = self._datasets.where(row, part)
        where = f"{path}@{offset}" if offset else str(path)
        if part:
            name, kind = self.decoder.pairs[part - 1]
            return f"{kind} {name!r} {where}"
        return where

    # -- clips: a plan over clips serves clip ids (``planner.clips``), a plan over rows serves rows ------------
    @property
    def _clips(self):
        """The planner's clip table when it plans clips (``frames=`` given), else None."""
        return getattr(self._planner, "clips", None) if getattr(self.config, "frames", None) is not None else None

    def row_of(self, sample: int) -> int:
        """The manifest row (global) of a planned ``sample``: itself, or its clip's row."""
        self._setup()
        clips = self._clips
        return int(clips.row[sample]) if clips is not None else int(sample)

    def rows_of(self, samples: np.ndarray) -> np.ndarray:
        """``int64 [B]`` manifest rows of planned ``samples`` ``int64 [B]``."""
        clips = self._clips
        return np.asarray(clips.row, np.int64)[samples] if clips is not None else samples

    def clip_frames(self, sample: int, length: int | None = None) -> ClipFrames | None:
        """Which frames of its video ``sample`` serves (:func:`~dali_arb.plan.frames.frame_indices`, a pure
        function of the clip table and the manifest): the first ``length`` frames of its window (the step's frame
        count, ``EpochPlan.frames_at``; None: the clip's own length), or None when its row is an image."""
        from ..plan.frames import frame_indices

        row = self.row_of(sample)
        n_frames, fps, times = self._datasets.clip_facts(row)
        clips = self._clips
        if n_frames < 0 or clips is None:
            return None
        own = int(clips.length[sample])
        if length is not None and length > own:  # our invariant: the planner serves a clip at most at its length
            raise RuntimeError(f"dali_arb bug: clip {sample} of {own} frames planned in a step of {length} frames")
        length = own if length is None else int(length)
        indices = frame_indices(self.config.frames, start=int(clips.start[sample]), length=length, n_frames=n_frames,
                                fps=fps, frame_times=times)  # fmt: skip
        return ClipFrames(np.asarray(indices, np.int64), fps, times)

    def clip_rate(self, clip: ClipFrames | None) -> float:
        """The frame rate a clip is served at: the target rate (``fps=``) or its video's own; an image's is the
        target rate, or 0."""
        target = getattr(self.config.frames, "fps", None)
        if target:
            return float(target)
        return float(clip.fps) if clip is not None else 0.0

    def _fetched_whole(self, rows: np.ndarray) -> np.ndarray:
        """``int64 (b,)`` the ones of ``rows`` (``int64 (B,)``, global) whose bytes are read whole, so gathered and read
        ahead: every row but videos, which a video decoder reads in pieces (:meth:`open_video`)."""
        if not getattr(self.decoder, "video", False):
            return rows
        return rows[~self._datasets.is_video(rows)]

    def open_video(self, row: int) -> tuple[ViewBase | None, Failure]:
        """``row``'s video as a read-only, seekable file that a decoder reads in pieces (close it): the local file or
        tar member (:class:`~dali_arb.data.localfiles.LocalRange`, ``pread``), or the object read by ranged GETs
        of a few cached blocks (:class:`~dali_arb.data.storage.ranged.RangedObject`); or ``(None, failure)``. Its
        identity (size, modification time; size and ETag in object storage) is checked as :meth:`read` checks it;
        ``DALI_ARB_MAX_SAMPLE_BYTES`` does not apply (the file is never read whole: ``max_clip_mb`` bounds a clip).
        A StorageError (the OS or the store failed) is raised."""
        self._setup()
        path, offset, length = self._datasets.where(row, 0)
        if path is None:
            return None, Failure.NO_SOURCE
        expected = self._datasets.identity(row, 0, path)
        if is_url(path):
            size = expected.size if expected.size is not None else (length if offset == 0 and length >= 0 else None)
            try:  # (without a recorded size, a whole object's size must be its length, as for a whole read)
                view = RangedObject(path, offset=offset, length=length, size=size, version=expected.etag,
                                    stats=self.remote.stats)  # fmt: skip
            except StorageError as exc:  # its HEAD (a size unknown): the object's own problem, or the store's
                return None, _bytes_or_failure(exc)[1]
            return view, Failure.NONE
        opened = open_local(path, offset, length, expected)
        if isinstance(opened, FileProblem):
            return None, Failure[opened.name]
        return opened, Failure.NONE

    def read(self, row: int, part: int = 0, *, image: bool = True) -> tuple[np.ndarray | None, Failure]:
        """Encoded bytes ``uint8 (n,)`` of ``row``'s image (``part`` 0) or of its ``part - 1``-th pair, or
        ``(None, failure)`` (``image``: the bytes are checked as an image's; a video's are checked by its decoder).
        Only regular files are read; a StorageError (the OS, the disk or the store failed) is raised."""
        self._setup()
        path, offset, length = self._datasets.where(row, part)  # once per sample: the costliest column read
        if path is None:
            return None, Failure.NO_SOURCE
        if length > max_sample_bytes():  # what one sample may cost: never read
            return None, Failure.TOO_LARGE
        expected = self._datasets.identity(row, part, path)
        if is_url(path):
            return _bytes_or_failure(self.remote.take(remote_request(path, offset, length, expected.etag)), image=image)
        return _bytes_or_failure(read_local(path, offset, length, expected), image=image)

    def geometry(self, row: int, *, bucket_h: int, bucket_w: int, u_y: float, u_x: float) -> Geometry:
        """Where ``row`` goes in a batch of bucket ``(bucket_h, bucket_w)``, given its crop draws."""
        h, w = self._datasets.size(row)
        return place(h, w, bucket_h=bucket_h, bucket_w=bucket_w, u_y=u_y, u_x=u_x, center=self.config.crop == "center")

    def prepare(self, row: int, geometry: Geometry) -> tuple[dict[str, np.ndarray] | None, Failure, int]:
        """The decoder's outputs for ``row``'s image and pairs (without mirror and meta), or ``(None, failure,
        part)`` naming the part that failed (0: the image, ``i + 1``: its ``i``-th pair)."""
        data, failure = self.read(row)
        if data is None:
            return None, failure, 0
        sample, failure = self.decoder.prepare(data, geometry)
        if sample is None:
            return None, failure, 0
        for i, ((name, kind), (height, width)) in enumerate(zip(self.decoder.pairs, self._datasets.pair_sizes(row))):
            data, failure = self.read(row, i + 1)
            if data is None:
                return None, failure, i + 1
            # the pair's own size, the image's cover size and crop: the same window, scaled
            pair_geometry = geometry._replace(height=height, width=width)
            part, failure = self.decoder.prepare(data, pair_geometry, channels=1 if kind == "mask" else 3)
            if part is None:
                return None, failure, i + 1
            sample.update({f"{name}.{o.name}": part[o.name] for o in self.decoder.part_outputs})
        return sample, Failure.NONE, 0

    def prepare_sample(
        self, sample: int, geometry: Geometry, frames: int | None = None
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """A video decoder's outputs for planned ``sample`` (a clip of a video, or an image as a 1-frame clip) at
        ``frames`` frames (the step's; None: the clip's own length), with its ``frame_index`` (``int64 [F]``) and
        ``fps`` (``float32 ()``), or ``(None, failure)``."""
        row = self.row_of(sample)
        clip = self.clip_frames(sample, frames)
        if clip is None:  # an image: its bytes, whole
            data, failure = self.read(row)
            if data is None:
                return None, failure
            served, failure = self.decoder.prepare(data, geometry)
            indices = np.zeros(1, np.int64)
        else:  # a video: a view the decoder reads in pieces (the header, the clip's keyframe onwards)
            view, failure = self.open_video(row)
            if view is None:
                return None, failure
            with view:
                served, failure = self.decoder.prepare_clip(view, clip, geometry)
            if view.error is not None:  # a read failed: the video's own problem (replaced), or the store's (raised)
                return _bytes_or_failure(view.error)
            indices = clip.indices
        if served is None:
            return None, failure
        served["frame_index"] = np.ascontiguousarray(indices, np.int64)
        served["fps"] = np.array(self.clip_rate(clip), np.float32)
        return served, Failure.NONE

    def _serve(
        self,
        planned: int,
        bucket: int,
        epoch: int,
        step: int,
        position: int,
        placement: tuple[int, int, float, float],
        frames: int | None = None,
    ) -> tuple[int, Failure, int, tuple[dict[str, np.ndarray], Geometry]]:
        """``(row, failure of planned, its failed part, (sample, geometry))`` for ``planned`` or, if it cannot be
        served, a deterministic stand-in from the same bucket (:func:`~dali_arb.loader.replacements.serve_or_replace`)."""
        bucket_h, bucket_w, u_y, u_x = placement

        def serve(sample: int) -> tuple[tuple[dict[str, np.ndarray], Geometry] | None, Failure, int]:
            row = self.row_of(sample)
            g = self.geometry(row, bucket_h=bucket_h, bucket_w=bucket_w, u_y=u_y, u_x=u_x)
            if getattr(self.decoder, "video", False):
                served, failure = self.prepare_sample(sample, g, frames)
                return (served, g) if served is not None else None, failure, 0
            served, failure, part = self.prepare(row, g)
            return (served, g) if served is not None else None, failure, part

        def usable(sample: int) -> bool:
            row = self.row_of(sample)
            return row not in self.blocked_rows and row not in self._found_bad

        return serve_or_replace(
            planned,
            serve=serve,
            usable=usable,
            found_bad=lambda sample, failure, part: self._found_bad.setdefault(self.row_of(sample), (failure, part)),
            known_bad=lambda sample: self._found_bad.get(self.row_of(sample)),  # the loader learns it from the meta
            stand_in=lambda attempt: self.replacement(bucket, epoch, step, position, attempt),
            bucket_size=(bucket_h, bucket_w),
            epoch=epoch,
            step=step,
        )

    def replacement(self, bucket: int, epoch: int, step: int, position: int, attempt: int) -> int:
        """A deterministic stand-in from the same bucket (images assigned to the batch's bucket)."""
        return replacement_row(self._planner.index, self.config.seed, bucket, epoch, step, position, attempt)
