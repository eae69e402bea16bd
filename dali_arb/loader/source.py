"""The external source: a stateless, picklable callable that turns a batch index into the outputs its
decoder names (``decoders.py``), plus ``mirror`` and ``meta`` (``outputs.META``).

No DALI import here: DALI calls :class:`BatchSource` with its ``BatchInfo`` (only ``.iteration``
is used) from worker processes. Every value is a pure function of the loader's arguments, the
epoch and the step, so resuming reproduces batches bit for bit.
"""

from __future__ import annotations

import copy
import errno
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..data.imagefacts import check_encoded
from ..data.manifest import NO_IDENTITY, Manifest
from ..data.pairs import pair_columns
from ..data.readahead import RemoteReads
from ..data.storage import URL_PATTERN, Request, is_url, max_sample_bytes
from ..errors import DataError, ManifestError, ObjectChanged, ObjectMissing, ObjectTooLarge, StorageError
from ..plan.buckets import format_size
from ..plan.geometry import Geometry, cover_crop
from ..plan.planner import EpochPlan, Planner
from ..processes import die_with_parent
from .contracts import IO_FIELDS, META, Failure
from .decoders import Decoder
from .planning import LoaderConfig, build_planner

__all__ = ["BatchSource"]

_MAX_REPLACEMENT_TRIES = 64
#: Errors of opening a sample's file that are the file's own (it is gone, or its permissions shut this process
#: out: the indexer read it): the sample is replaced. Any other OSError is the OS or the disk failing (EMFILE,
#: ENFILE, ENOMEM, EIO, ESTALE...): the run stops and nothing is blocklisted, so a resume loses nothing.
_THE_FILES_OWN = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM})
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


def _os_failure(path: str, error: OSError) -> StorageError:
    """The error that stops the run when the OS or the disk fails reading ``path`` (not the file)."""
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    return StorageError(
        f"cannot read {path}: {error.strerror} ({name}): the OS or the disk failed, not the file; fix that (the "
        "open-file limit `ulimit -n`, memory, the disk) and resume from the last checkpoint"
    )


@dataclass
class _Rows:
    """One dataset's arrays a worker reads (Arrow and NumPy, mapped and shared: no Python object per row):
    ``locations[part]`` is ``(sources, offsets, lengths)`` of its images (part 0) and of each pair;
    ``pair_sizes[i]`` is ``(heights, widths)`` of pair ``i``; ``identity`` is ``(sizes, mtimes, etags)`` of the
    images' sources at indexing (:data:`~dali_arb.data.manifest.IDENTITY`; ``NO_IDENTITY`` or null where unknown,
    ``etags`` None when the manifest has none)."""

    locations: list[tuple]
    heights: np.ndarray
    widths: np.ndarray
    pair_sizes: list[tuple[np.ndarray, np.ndarray]]
    identity: tuple


class _Identity(NamedTuple):
    """What a sample's source was when it was indexed (None where unknown): its size in bytes, its modification
    time (local files) and its ETag (object storage)."""

    size: int | None
    mtime_ns: int | None
    etag: str | None


_UNKNOWN = _Identity(None, None, None)


def _remote_request(url: str, offset: int, length: int, version: str | None = None) -> Request:
    """The request for ``length`` bytes at ``offset`` of ``url`` (``length`` -1: the whole object), of the
    object's ``version`` (its ETag at indexing; None: not checked)."""
    return Request(url, offset, offset + length if length >= 0 else -1, whole=offset == 0, version=version)


def _local_change(info: os.stat_result, offset: int, length: int, expected: _Identity) -> Failure:
    """Whether the file ``info`` (its ``fstat``) is still the one indexed: the local identity is its size and
    mtime (a copy that keeps them, ``cp -a`` or ``rsync -a``, serves on; a ``chmod`` changes only the ctime).
    Without a recorded size (older manifests), a whole file's size must be its ``length``."""
    size = expected.size if expected.size is not None else (length if offset == 0 and length >= 0 else None)
    if size is not None and info.st_size != size:
        return Failure.CHANGED
    if expected.mtime_ns is not None and info.st_mtime_ns != expected.mtime_ns:
        return Failure.CHANGED
    return Failure.NONE


class BatchSource:
    """DALI external source: ``source(batch_info)`` returns one batch of this rank.

    Outputs: one list per name in ``decoder.outputs`` (per-sample arrays), in that order; ``mirror``
    is ``int32 ()`` and ``meta`` is ``int64 (F,)`` (``outputs.META``).

    The stream of batches starts at step ``first_step`` of ``first_epoch`` and runs on through the
    following epochs without end; the loader takes ``len(epoch)`` batches per epoch.

    Args:
        manifests: the manifest the loader serves, or one per dataset (rows are global rows: dataset ``d``'s
            row ``r`` is ``offsets[d] + r``). Worker processes map the same caches when they are mapped
            (``Manifest.open``), else re-read the files (when there are files); either way they refuse a
            manifest file whose content changed since.
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
        self.offsets = np.concatenate([[0], np.cumsum(self.num_rows)]).astype(np.int64)
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
        keep = ("config", "decoder", "first_epoch", "first_step", "blocked_rows", "num_rows", "offsets",
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
        self._datasets = []
        for manifest in manifests:
            locations = [(manifest.table.column("source"), manifest.int_column("offset", 0),
                          manifest.int_column("length", -1))]  # fmt: skip
            pair_sizes = []
            for name, _ in self.decoder.pairs:
                source, offset, length, width, height = pair_columns(name)
                locations.append(
                    (manifest.table.column(source), manifest.int_column(offset, 0), manifest.int_column(length, -1))
                )
                pair_sizes.append((manifest.int_column(height, 1), manifest.int_column(width, 1)))
            identity = (manifest.int_column("source_size", NO_IDENTITY), manifest.int_column("mtime_ns", NO_IDENTITY),
                        manifest.table.column("etag") if "etag" in manifest.table.column_names else None)  # fmt: skip
            self._datasets.append(_Rows(locations, manifest.heights, manifest.widths, pair_sizes, identity))
        if self._planner is None:
            self._planner = build_planner(self.config, manifests)
        self._found_bad: set[int] = set()
        self._epoch_lengths: dict[int, int] = {}
        if all(path is not None for path, _, _ in self._homes):
            self._manifests = None  # keep only the arrays above; workers reload the files
        self._ready = True

    def _split(self, row: int) -> tuple[_Rows, int]:
        """The dataset of global ``row`` and its row there."""
        if len(self._datasets) == 1:  # (called several times per sample: no search for one dataset)
            return self._datasets[0], row
        d = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self._datasets[d], int(row - self.offsets[d])

    def starting_at(self, epoch: int, step: int, blocked_rows: frozenset[int]) -> BatchSource:
        """The same source, its stream starting at ``step`` of ``epoch``, with the loader's current
        blocklist; it shares the set-up arrays (pickling for worker processes drops them)."""
        restarted = self._view()
        restarted.first_epoch, restarted.first_step = epoch, step
        restarted.blocked_rows = frozenset(blocked_rows)
        restarted._found_bad = set()
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
                self.remote.read_ahead(self._requests(self._planner.epoch(target_epoch).rows_at(target_step)))
        return outputs

    def _where(self, row: int, part: int) -> tuple[str | None, int, int]:
        """``(path or URL, offset, length)`` of global ``row``'s ``part`` (``length`` -1: the whole file)."""
        rows, local = self._split(row)
        sources, offsets, lengths = rows.locations[part]
        return sources[local].as_py(), int(offsets[local]), int(lengths[local])

    def _identity(self, row: int, part: int, path: str | None) -> _Identity:
        """What the source ``path`` of global ``row``'s ``part`` was at indexing: the row's identity for its image,
        and for a pair in the image's own source (a tar shard's member); unknown for other pairs."""
        rows, local = self._split(row)
        if part and path != self._where(row, 0)[0]:
            return _UNKNOWN
        sizes, mtimes, etags = rows.identity
        size, mtime = int(sizes[local]), int(mtimes[local])
        return _Identity(
            None if size == NO_IDENTITY else size,
            None if mtime == NO_IDENTITY else mtime,
            etags[local].as_py() if etags is not None else None,
        )

    def _request(self, row: int, part: int) -> Request | None:
        """The object-storage request for ``row``'s ``part``, or None when its bytes are in a local file."""
        path, offset, length = self._where(row, part)
        if path is None or not is_url(path):
            return None
        return _remote_request(path, offset, length, self._identity(row, part, path).etag)

    def _requests(self, rows: np.ndarray) -> list[Request]:
        """Requests for every part of ``rows`` that lies in object storage."""
        parts = range(1 + len(self.decoder.pairs))
        return [r for row in rows.tolist() for part in parts if (r := self._request(row, part)) is not None]

    def batch(self, epoch: int, step: int) -> tuple[list, ...]:
        """Outputs for ``step`` of ``epoch``: one list of per-sample arrays per ``decoder.outputs`` name."""
        self._setup()
        plan: EpochPlan = self._planner.epoch(epoch)
        rows = plan.rows_at(step)
        if self.read_ahead_steps and self._remote_rows:
            self.remote.gather(self._requests(rows))  # every sample of the batch at once, concurrently
        bucket = plan.bucket_at(step)
        bucket_h, bucket_w = (int(v) for v in plan.sizes[bucket])
        c = self.config
        # Per-sample randomness keyed by position in the global batch: independent of world size.
        draws = np.random.default_rng([c.seed, epoch, step, 0x5EED]).random((plan.offset + len(rows), 3))[plan.offset :]
        columns: dict[str, list] = {output.name: [] for output in self.decoder.outputs}
        for position, planned in enumerate(rows.tolist()):
            u_y, u_x, u_flip = draws[position]
            row, failure, failed_part, sample, g = self._serve(
                planned, bucket, epoch, step, plan.offset + position, (bucket_h, bucket_w, float(u_y), float(u_x))
            )
            mirror = bool(u_flip < c.flip)
            for name, value in sample.items():
                columns[name].append(value)
            columns["mirror"].append(np.array(mirror, np.int32))
            columns["meta"].append(
                META.pack(
                    row=row,
                    planned_row=planned,
                    failure=failure,
                    failed_part=failed_part,
                    crop_top=g.top,
                    crop_left=g.resized_w - g.left - g.bucket_w if mirror else g.left,
                    orig_height=g.height,
                    orig_width=g.width,
                    epoch=epoch,
                    step=step,
                    flipped=mirror,
                    **dict.fromkeys(IO_FIELDS.values(), 0),
                )
            )
        self.remote.clear()
        if self._remote_rows:  # what was read since the last batch travels on its first sample
            counts = self.remote.stats.take()
            first = columns["meta"][0]
            for name, column in IO_FIELDS.items():
                first[META.fields.index(column)] = counts[name]
        return tuple(columns[output.name] for output in self.decoder.outputs)

    # -- reading, with deterministic replacement of bad samples ------------------------------------
    def location(self, row: int, part: int = 0) -> str:
        """Where the bytes of ``row``'s image (``part`` 0) or its ``part - 1``-th pair are: the file, or
        ``shard.tar@offset`` inside a shard; a pair's prefixed by its kind and name."""
        self._setup()
        path, offset, _ = self._where(row, part)
        where = f"{path}@{offset}" if offset else str(path)
        if part:
            name, kind = self.decoder.pairs[part - 1]
            return f"{kind} {name!r} {where}"
        return where

    def read(self, row: int, part: int = 0) -> tuple[np.ndarray | None, Failure]:
        """Encoded bytes ``uint8 (n,)`` of ``row``'s image (``part`` 0) or of its ``part - 1``-th pair, or
        ``(None, failure)``. Only regular files are read."""
        self._setup()
        path, offset, length = self._where(row, part)  # once per sample: the path is the costliest column read
        if path is None:
            return None, Failure.NO_SOURCE
        if length > max_sample_bytes():  # what one sample may cost: never read
            return None, Failure.TOO_LARGE
        expected = self._identity(row, part, path)
        if is_url(path):
            return self._read_remote(_remote_request(path, offset, length, expected.etag))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        except OSError as exc:
            if exc.errno in _THE_FILES_OWN:
                return None, Failure.MISSING
            raise _os_failure(path, exc) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None, Failure.NOT_REGULAR
            changed = _local_change(info, offset, length, expected)
            if changed:
                return None, changed
            if length < 0:
                if info.st_size > max_sample_bytes():
                    return None, Failure.TOO_LARGE
                data = os.pread(fd, info.st_size, 0)
            else:
                if offset + length > info.st_size:  # never allocate for bytes that are not there
                    return None, Failure.SHORT
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    return None, Failure.SHORT
        except OSError as exc:  # the file opened: reading it failed in the OS or the disk (EIO)
            raise _os_failure(path, exc) from None
        finally:
            os.close(fd)
        problem = check_encoded(data)
        if problem:
            return None, Failure.of_bytes_problem(problem)
        return np.frombuffer(data, np.uint8), Failure.NONE

    def _read_remote(self, request: Request) -> tuple[np.ndarray | None, Failure]:
        """The sample's bytes, or its own failure (gone, changed, too large); a StorageError (the store, its
        credentials or the network failed) is raised: the run stops, nothing is blocklisted."""
        result = self.remote.take(request)
        if isinstance(result, ObjectMissing):
            return None, Failure.MISSING
        if isinstance(result, ObjectChanged):
            return None, Failure.CHANGED
        if isinstance(result, ObjectTooLarge):
            return None, Failure.TOO_LARGE
        if isinstance(result, StorageError):  # (a copy: the fetcher hands one error to every sample of a request)
            raise type(result)(*result.args) from result.__cause__
        problem = check_encoded(result)
        if problem:
            return None, Failure.of_bytes_problem(problem)
        return np.frombuffer(result, np.uint8), Failure.NONE

    def geometry(self, row: int, *, bucket_h: int, bucket_w: int, u_y: float, u_x: float) -> Geometry:
        """Where ``row`` goes in a batch of bucket ``(bucket_h, bucket_w)``, given its crop draws."""
        rows, row = self._split(row)
        h, w = int(rows.heights[row]), int(rows.widths[row])
        rh, rw, top, left = cover_crop(h, w, bucket_h, bucket_w, u_y, u_x, center=self.config.crop == "center")
        return Geometry(h, w, rh, rw, top, left, bucket_h, bucket_w)

    def prepare(self, row: int, geometry: Geometry) -> tuple[dict[str, np.ndarray] | None, Failure, int]:
        """The decoder's outputs for ``row``'s image and pairs (without mirror and meta), or ``(None, failure,
        part)`` naming the part that failed (0: the image, ``i + 1``: its ``i``-th pair)."""
        data, failure = self.read(row)
        if data is None:
            return None, failure, 0
        sample, failure = self.decoder.prepare(data, geometry)
        if sample is None:
            return None, failure, 0
        rows, local = self._split(row)
        for i, ((name, kind), (heights, widths)) in enumerate(zip(self.decoder.pairs, rows.pair_sizes)):
            data, failure = self.read(row, i + 1)
            if data is None:
                return None, failure, i + 1
            # the pair's own size, the image's cover size and crop: the same window, scaled
            pair_geometry = geometry._replace(height=int(heights[local]), width=int(widths[local]))
            part, failure = self.decoder.prepare(data, pair_geometry, channels=1 if kind == "mask" else 3)
            if part is None:
                return None, failure, i + 1
            sample.update({f"{name}.{o.name}": part[o.name] for o in self.decoder.part_outputs})
        return sample, Failure.NONE, 0

    def _serve(
        self, planned: int, bucket: int, epoch: int, step: int, position: int, placement: tuple[int, int, float, float]
    ) -> tuple[int, Failure, int, dict[str, np.ndarray], Geometry]:
        """``(row, failure of planned, its failed part, sample, geometry)`` for ``planned`` or, if it cannot be
        served, a deterministic stand-in from the same bucket."""
        bucket_h, bucket_w, u_y, u_x = placement
        row, first_failure, first_part = planned, Failure.NONE, 0
        for attempt in range(_MAX_REPLACEMENT_TRIES):
            if row not in self.blocked_rows and row not in self._found_bad:
                g = self.geometry(row, bucket_h=bucket_h, bucket_w=bucket_w, u_y=u_y, u_x=u_x)
                sample, failure, part = self.prepare(row, g)
                if sample is not None:
                    return row, first_failure, first_part, sample, g
                self._found_bad.add(row)  # the loader learns it from meta["failure"]
                if row == planned:
                    first_failure, first_part = failure, part
            row = self.replacement(bucket, epoch, step, position, attempt)
        raise DataError(
            f"no readable image left in bucket {format_size(bucket_h, bucket_w)} after {_MAX_REPLACEMENT_TRIES} "
            f"tries (epoch {epoch}, step {step}): the files behind the manifest have changed or gone; "
            "re-index with `dali-arb index ... --update` and restart from your checkpoint"
        )

    def replacement(self, bucket: int, epoch: int, step: int, position: int, attempt: int) -> int:
        """A deterministic stand-in from the same bucket (images assigned to the batch's bucket)."""
        index = self._planner.index
        lo, hi = int(index.starts[bucket]), int(index.starts[bucket + 1])
        if hi == lo:  # a leftover batch at a bucket that owns no images: any usable image
            lo, hi = 0, int(index.starts[-1])
        pick = np.random.default_rng([self.config.seed, epoch, step, position, attempt, 0xBAD]).integers(lo, hi)
        return int(index.member_rows(np.array([pick]), epoch)[0])
