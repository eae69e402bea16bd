"""The external source: a stateless, picklable callable that turns a batch index into the outputs its
decoder names (``decoders.py``), plus ``mirror`` and ``meta`` (``outputs.META``).

No DALI import here: DALI calls :class:`BatchSource` with its ``BatchInfo`` (only ``.iteration``
is used) from worker processes. Every value is a pure function of the loader's arguments, the
epoch and the step, so resuming reproduces batches bit for bit.
"""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import dataclass

import numpy as np

from .buckets import BucketSpec, format_size
from .decoders import Decoder
from .errors import ConfigError, DataError, ManifestError
from .geometry import Geometry, cover_crop
from .imagefacts import check_encoded
from .manifest import PINNED_COLUMNS, Manifest
from .outputs import META, Failure
from .planner import EpochPlan, Planner
from .processes import die_with_parent
from .world import World

__all__ = ["BatchSource", "LoaderConfig", "build_planner"]

_MAX_REPLACEMENT_TRIES = 64
#: Columns the worker processes read from an in-memory manifest's file (besides key, width, height).
WORKER_COLUMNS = ["source", "offset", "length"]


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides the batches (all of it goes into ``state_dict``)."""

    batch_size: int
    spec: BucketSpec
    seed: int
    rank: int
    world_size: int
    leftover: str
    sync_ranks: bool
    crop: str
    flip: float

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise ConfigError(f"crop must be 'random' or 'center', got {self.crop!r}")
        if isinstance(self.flip, bool) or not isinstance(self.flip, (int, float)) or not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"flip must be a probability in [0, 1], got {self.flip!r}")


def build_planner(config: LoaderConfig, manifest: Manifest) -> Planner:
    """The one way a loader's planner is made (in the loader and again in each worker): from the bucket
    index of the manifest's cache when it is mapped (``dataplane.py``), else computed."""
    from .dataplane import bucket_index

    return Planner(
        bucket_index(manifest, config.spec),
        batch_size=config.batch_size,
        world=World(config.rank, config.world_size),
        seed=config.seed,
        leftover=config.leftover,
        sync_ranks=config.sync_ranks,
    )


class BatchSource:
    """DALI external source: ``source(batch_info)`` returns one batch of this rank.

    Outputs: one list per name in ``decoder.outputs`` (per-sample arrays), in that order; ``mirror``
    is ``int32 ()`` and ``meta`` is ``int64 (F,)`` (``outputs.META``).

    The stream of batches starts at step ``first_step`` of ``first_epoch`` and runs on through the
    following epochs without end; the loader takes ``len(epoch)`` batches per epoch.

    Args:
        manifest: the manifest the loader serves. Worker processes map the same cache when it is mapped
            (``Manifest.open``), else re-read its file (when it has one); either way they refuse a
            manifest file whose content changed since.
        config: what decides the batches.
        decoder: the :class:`~dali_arb.decoders.Decoder` chosen by the loader.
        planner: the loader's planner (rebuilt from the manifest in worker processes).
        blocked_rows: rows known to be bad (the loader's blocklist): replaced without being read.
    """

    def __init__(
        self,
        manifest: Manifest,
        config: LoaderConfig,
        decoder: Decoder,
        *,
        planner: Planner | None = None,
        first_epoch: int = 0,
        first_step: int = 0,
        blocked_rows: frozenset[int] = frozenset(),
    ) -> None:
        self.config = config
        self.decoder = decoder
        self.first_epoch = first_epoch
        self.first_step = first_step
        self.blocked_rows = frozenset(blocked_rows)
        self.num_rows = len(manifest)
        self.fingerprint = manifest.fingerprint(PINNED_COLUMNS)
        # Workers reopen a manifest that lives in a file instead of receiving it pickled.
        self._manifest_path = str(manifest.path) if manifest.path is not None else None
        cache = manifest.cache
        self._cache = (str(cache.folder), cache.signature) if cache is not None else None
        self._manifest: Manifest | None = manifest
        self._planner = planner
        self._ready = False

    def __getstate__(self) -> dict:
        keep = ("config", "decoder", "first_epoch", "first_step", "blocked_rows", "num_rows", "fingerprint")
        state = {k: self.__dict__[k] for k in keep}
        state["_manifest_path"] = self._manifest_path
        state["_cache"] = self._cache
        if self._manifest_path is None:  # nothing to reload: send the manifest and the planner along
            state["_manifest"] = self._manifest
            state["_planner"] = self._planner
        return state

    def __setstate__(self, state: dict) -> None:
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # in a DALI worker: never outlive the training process
            die_with_parent()
        self.__dict__.update(state)
        self.__dict__.setdefault("_manifest", None)
        self.__dict__.setdefault("_planner", None)
        self.__dict__.setdefault("_cache", None)
        self._ready = False

    # -- lazy set-up (in each worker) -------------------------------------------------------------
    def _setup(self) -> None:
        if self._ready:
            return
        manifest = self._manifest
        if manifest is None and self._cache is not None:
            from .dataplane import ManifestCache

            folder, signature = self._cache
            manifest = ManifestCache.at(folder, manifest_path=self._manifest_path, signature=signature).manifest()
        if manifest is None:
            manifest = Manifest.read(self._manifest_path, columns=WORKER_COLUMNS)
            if manifest.fingerprint(PINNED_COLUMNS) != self.fingerprint:
                raise ManifestError(
                    f"manifest {self._manifest_path} changed on disk after the loader was built "
                    f"({len(manifest)} rows now, {self.num_rows} then, or the same count with other content); "
                    "a live loader never serves a rewritten manifest: build a new loader (or write to a new file)"
                )
        self._sources = manifest.table.column("source")  # Arrow (mapped, shared): no Python string per row
        self._offsets = manifest.int_column("offset", 0)
        self._lengths = manifest.int_column("length", -1)  # -1: the whole file
        self._heights = manifest.heights
        self._widths = manifest.widths
        if self._planner is None:
            self._planner = build_planner(self.config, manifest)
        # Rows of each bucket, for replacements: members[starts[k]:starts[k+1]]
        self._members = self._planner.index.members
        self._member_starts = self._planner.index.starts
        self._found_bad: set[int] = set()
        self._epoch_lengths: dict[int, int] = {}
        if self._manifest_path is not None:
            self._manifest = None  # keep only the arrays above; workers reload the file
        self._ready = True

    def starting_at(self, epoch: int, step: int, blocked_rows: frozenset[int]) -> BatchSource:
        """The same source, its stream starting at ``step`` of ``epoch``, with the loader's current
        blocklist; it shares the set-up arrays (pickling for worker processes drops them)."""
        self._setup()
        restarted = copy.copy(self)
        restarted.first_epoch, restarted.first_step = epoch, step
        restarted.blocked_rows = frozenset(blocked_rows)
        restarted._found_bad = set()
        return restarted

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
        iteration = batch_info if isinstance(batch_info, int) else batch_info.iteration
        epoch, step = self.locate(int(iteration))
        return self.batch(epoch, step)

    def batch(self, epoch: int, step: int) -> tuple[list, ...]:
        """Outputs for ``step`` of ``epoch``: one list of per-sample arrays per ``decoder.outputs`` name."""
        self._setup()
        plan: EpochPlan = self._planner.epoch(epoch)
        rows = plan.rows_at(step)
        bucket = plan.bucket_at(step)
        bucket_h, bucket_w = (int(v) for v in plan.sizes[bucket])
        c = self.config
        # Per-sample randomness keyed by position in the global batch: independent of world size.
        draws = np.random.default_rng([c.seed, epoch, step, 0x5EED]).random((plan.offset + len(rows), 3))[plan.offset :]
        columns: dict[str, list] = {output.name: [] for output in self.decoder.outputs}
        for position, planned in enumerate(rows.tolist()):
            u_y, u_x, u_flip = draws[position]
            row, failure, sample, g = self._serve(
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
                    crop_top=g.top,
                    crop_left=g.resized_w - g.left - g.bucket_w if mirror else g.left,
                    orig_height=g.height,
                    orig_width=g.width,
                    epoch=epoch,
                    step=step,
                    flipped=mirror,
                )
            )
        return tuple(columns[output.name] for output in self.decoder.outputs)

    # -- reading, with deterministic replacement of bad samples ------------------------------------
    def location(self, row: int) -> str:
        """Where ``row``'s bytes are: the file, or ``shard.tar@offset`` inside a shard."""
        self._setup()
        path, offset = self._sources[row].as_py(), int(self._offsets[row])
        return f"{path}@{offset}" if offset else str(path)

    def read(self, row: int) -> tuple[np.ndarray | None, Failure]:
        """Encoded bytes of ``row`` ``uint8 (n,)``, or ``(None, failure)``. Only regular files are read."""
        self._setup()
        path = self._sources[row].as_py()
        if path is None:
            return None, Failure.NO_SOURCE
        offset, length = int(self._offsets[row]), int(self._lengths[row])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        except OSError:
            return None, Failure.MISSING
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None, Failure.NOT_REGULAR
            if length < 0:
                data = os.pread(fd, info.st_size, 0)
            else:
                if offset == 0 and info.st_size != length:  # a whole file: its size must be what was indexed
                    return None, Failure.CHANGED
                if offset + length > info.st_size:  # never allocate for bytes that are not there
                    return None, Failure.SHORT
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    return None, Failure.SHORT
        except OSError:
            return None, Failure.READ_ERROR
        finally:
            os.close(fd)
        problem = check_encoded(data)
        if problem:
            return None, Failure.of_bytes_problem(problem)
        return np.frombuffer(data, np.uint8), Failure.NONE

    def geometry(self, row: int, *, bucket_h: int, bucket_w: int, u_y: float, u_x: float) -> Geometry:
        """Where ``row`` goes in a batch of bucket ``(bucket_h, bucket_w)``, given its crop draws."""
        h, w = int(self._heights[row]), int(self._widths[row])
        rh, rw, top, left = cover_crop(h, w, bucket_h, bucket_w, u_y, u_x, center=self.config.crop == "center")
        return Geometry(h, w, rh, rw, top, left, bucket_h, bucket_w)

    def prepare(self, row: int, geometry: Geometry) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """The decoder's outputs for ``row`` (without mirror and meta), or ``(None, failure)``."""
        data, failure = self.read(row)
        if data is None:
            return None, failure
        return self.decoder.prepare(data, geometry)

    def _serve(
        self, planned: int, bucket: int, epoch: int, step: int, position: int, placement: tuple[int, int, float, float]
    ) -> tuple[int, Failure, dict[str, np.ndarray], Geometry]:
        """``(row, failure of planned, sample, geometry)`` for ``planned`` or, if it cannot be served, a
        deterministic stand-in from the same bucket."""
        bucket_h, bucket_w, u_y, u_x = placement
        row, first_failure = planned, Failure.NONE
        for attempt in range(_MAX_REPLACEMENT_TRIES):
            if row not in self.blocked_rows and row not in self._found_bad:
                g = self.geometry(row, bucket_h=bucket_h, bucket_w=bucket_w, u_y=u_y, u_x=u_x)
                sample, failure = self.prepare(row, g)
                if sample is not None:
                    return row, first_failure, sample, g
                self._found_bad.add(row)  # the loader learns it from meta["failure"]
                if row == planned:
                    first_failure = failure
            row = self.replacement(bucket, epoch, step, position, attempt)
        raise DataError(
            f"no readable image left in bucket {format_size(bucket_h, bucket_w)} after {_MAX_REPLACEMENT_TRIES} "
            f"tries (epoch {epoch}, step {step}): the files behind the manifest have changed or gone; "
            "re-index with `dali-arb index ... --update` and restart from your checkpoint"
        )

    def replacement(self, bucket: int, epoch: int, step: int, position: int, attempt: int) -> int:
        """A deterministic stand-in from the same bucket (images assigned to the batch's bucket)."""
        lo, hi = int(self._member_starts[bucket]), int(self._member_starts[bucket + 1])
        if hi == lo:  # a leftover batch at a bucket that owns no images: any usable image
            lo, hi = 0, len(self._members)
        pick = np.random.default_rng([self.config.seed, epoch, step, position, attempt, 0xBAD]).integers(lo, hi)
        return int(self._members[pick])
