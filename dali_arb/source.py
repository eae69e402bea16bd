"""The external source: a stateless, picklable callable that turns a batch index into encoded bytes
plus per-sample resize/crop/flip parameters.

No DALI import here: DALI calls :class:`BatchSource` with its ``BatchInfo`` (only ``.iteration``
is used) from worker processes. Every value is a pure function of the loader's arguments, the
epoch and the step, so resuming reproduces batches bit for bit.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .buckets import BucketSpec
from .errors import ConfigError, ManifestError
from .index import swaps_sides, truncation
from .manifest import Manifest
from .planner import EpochPlan, Planner
from .world import World

__all__ = ["META_FIELDS", "BatchSource", "LoaderConfig", "check_encoded", "cover_crop"]

#: Columns of the per-sample ``meta`` output (int64).
META_FIELDS = ("row", "planned_row", "crop_top", "crop_left", "orig_height", "orig_width", "epoch", "step", "flipped")
_MAX_REPLACEMENT_TRIES = 64


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
    decoder: str = "dali"

    def __post_init__(self) -> None:
        if self.decoder not in ("dali", "pillow"):
            raise ConfigError(f"decoder must be 'dali' or 'pillow', got {self.decoder!r}")
        if self.crop not in ("random", "center"):
            raise ConfigError(f"crop must be 'random' or 'center', got {self.crop!r}")
        if isinstance(self.flip, bool) or not isinstance(self.flip, (int, float)) or not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"flip must be a probability in [0, 1], got {self.flip!r}")


class Geometry(NamedTuple):
    """Where one image goes: source size, size after the cover resize, crop corner, bucket size."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    bucket_h: int
    bucket_w: int


def cover_crop(
    height: int, width: int, bucket_h: int, bucket_w: int, u_y: float, u_x: float, *, center: bool
) -> tuple[int, int, int, int]:
    """Resize ``(height, width)`` to cover the bucket (aspect kept, one side exact), then place the crop.

    Returns ``(resized_h, resized_w, top, left)``; ``u_y``, ``u_x`` in [0, 1) pick a random crop.
    """
    scale = max(bucket_h / height, bucket_w / width)
    resized_h = max(bucket_h, round(height * scale))
    resized_w = max(bucket_w, round(width * scale))
    if center:
        return resized_h, resized_w, (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    top = min(int(u_y * (resized_h - bucket_h + 1)), resized_h - bucket_h)
    left = min(int(u_x * (resized_w - bucket_w + 1)), resized_w - bucket_w)
    return resized_h, resized_w, top, left


def check_encoded(data: bytes) -> str | None:
    """Cheap checks on encoded bytes before the decoder sees them: the reason they are bad, or None."""
    if not data:
        return "empty"
    head = data[:16]
    if head[:3] == b"\xff\xd8\xff":
        return truncation("JPEG", data[-65536:])
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return truncation("PNG", data[-65536:])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if len(data) >= declared else "truncated WebP"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not an image (unknown format)"


class BatchSource:
    """DALI external source: ``source(batch_info)`` returns one batch of this rank.

    Outputs, per sample, with the ``dali`` decoder: encoded bytes ``uint8 (n,)``, ``roi_start`` and ``roi_end``
    ``float32 (2,)`` (the crop window in source pixels, ``(y, x)``), ``size`` ``float32 (2,)``
    (bucket ``(h, w)``), ``mirror`` ``int32 ()``, and ``meta`` ``int64 (9,)`` (see ``META_FIELDS``). With the ``pillow`` decoder: the finished crop ``uint8 (bucket_h, bucket_w, 3)``,
    ``mirror`` and ``meta``.

    The stream of batches starts at step ``first_step`` of ``first_epoch`` and runs on through the
    following epochs without end; the loader takes ``len(epoch)`` batches per epoch.
    """

    def __init__(
        self,
        manifest: Manifest,
        config: LoaderConfig,
        *,
        first_epoch: int,
        first_step: int,
        bad_rows: frozenset[int] = frozenset(),
    ) -> None:
        self.config = config
        self.first_epoch = first_epoch
        self.first_step = first_step
        self.bad_rows = set(bad_rows)
        # Workers reload a manifest that lives in a file instead of receiving it pickled.
        self._manifest_path = str(manifest.path) if manifest.path is not None else None
        self._manifest: Manifest | None = manifest
        self.num_rows = len(manifest)
        self._ready = False

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_") or k == "_manifest_path"}
        if self._manifest_path is None:
            state["_manifest"] = self._manifest
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_manifest", None)
        self._ready = False

    # -- lazy set-up (in each worker) -------------------------------------------------------------
    def _setup(self) -> None:
        if self._ready:
            return
        manifest = self._manifest
        if manifest is None:
            manifest = Manifest.read(self._manifest_path, columns=["source", "offset", "length"])
            if len(manifest) != self.num_rows:
                raise ManifestError(
                    f"manifest {self._manifest_path} has {len(manifest)} rows in the worker but {self.num_rows} in the "
                    "loader: it changed on disk, or the loader got a Manifest edited in memory (write it to a new file)"
                )
        table = manifest.table
        self._sources = table.column("source").combine_chunks()  # Arrow: no Python string per row
        self._offsets = np.asarray(table.column("offset").fill_null(0).to_numpy(), np.int64)
        self._lengths = np.asarray(table.column("length").fill_null(-1).to_numpy(), np.int64)
        self._heights = manifest.heights
        self._widths = manifest.widths
        c = self.config
        assignment = c.spec.assign(self._heights, self._widths)
        self._planner = Planner(
            assignment,
            batch_size=c.batch_size,
            world=World(c.rank, c.world_size),
            seed=c.seed,
            leftover=c.leftover,
            sync_ranks=c.sync_ranks,
        )
        # Rows of each bucket, for replacements: members[starts[k]:starts[k+1]]
        bucket = assignment.bucket
        order = np.argsort(bucket, kind="stable")
        order = order[bucket[order] >= 0]
        counts = np.bincount(bucket[order], minlength=len(assignment.sizes))
        self._members = order
        self._member_starts = np.concatenate([[0], np.cumsum(counts)])
        self._epoch_lengths: dict[int, int] = {}
        if self._manifest_path is not None:
            self._manifest = None  # keep only the arrays above; workers reload the file
        self._ready = True

    def starting_at(self, epoch: int, step: int) -> BatchSource:
        """The same source, its stream starting at ``step`` of ``epoch``; it shares the set-up
        arrays (pickling for worker processes drops them) and copies the bad-row set."""
        self._setup()
        restarted = copy.copy(self)
        restarted.first_epoch, restarted.first_step = epoch, step
        restarted.bad_rows = set(self.bad_rows)
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
        """Outputs for ``step`` of ``epoch`` (lists of per-sample arrays)."""
        self._setup()
        plan: EpochPlan = self._planner.epoch(epoch)
        rows = plan.rows[step]
        bucket = int(plan.bucket[step])
        bucket_h, bucket_w = (int(v) for v in plan.sizes[bucket])
        c = self.config
        # Per-sample randomness keyed by position in the global batch: independent of world size.
        draws = np.random.default_rng([c.seed, epoch, step, 0x5EED]).random((plan.offset + len(rows), 3))[plan.offset :]
        payloads, roi_start, roi_end, mirrors, metas = [], [], [], [], []
        for position, planned in enumerate(rows.tolist()):
            u_y, u_x, u_flip = draws[position]
            place = functools.partial(self.geometry, bucket_h=bucket_h, bucket_w=bucket_w, u_y=u_y, u_x=u_x)
            row, payload, (h, w, rh, rw, top, left, _, _) = self._read_or_replace(
                planned, bucket, epoch, step, plan.offset + position, place
            )
            mirror = bool(u_flip < c.flip)
            payloads.append(payload)
            mirrors.append(np.array(mirror, np.int32))
            reported_left = rw - left - bucket_w if mirror else left
            metas.append(np.array([row, planned, top, reported_left, h, w, epoch, step, mirror], np.int64))
            if c.decoder == "dali":  # the crop window in source pixels, for DALI's resize
                y_scale, x_scale = h / rh, w / rw
                roi_start.append(np.array([top * y_scale, left * x_scale], np.float32))
                roi_end.append(np.array([(top + bucket_h) * y_scale, (left + bucket_w) * x_scale], np.float32))
        if c.decoder == "pillow":  # finished crops: nothing left for DALI to place
            return payloads, mirrors, metas
        size = [np.array([bucket_h, bucket_w], np.float32)] * len(payloads)
        return payloads, roi_start, roi_end, size, mirrors, metas

    # -- reading, with deterministic replacement of bad samples ------------------------------------
    def read(self, row: int) -> tuple[np.ndarray | None, str | None]:
        """Encoded bytes of ``row``, or ``(None, reason)``."""
        path = self._sources[row].as_py()
        if path is None:
            return None, "manifest row has no source file"
        offset, length = int(self._offsets[row]), int(self._lengths[row])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return None, f"cannot open {path}: {exc.strerror}"
        try:
            if length < 0:
                size = os.fstat(fd).st_size
                data = os.pread(fd, size, 0)
            else:
                if offset == 0:  # a whole file: its size must be what was indexed
                    size = os.fstat(fd).st_size
                    if size != length:
                        return (
                            None,
                            f"{path} changed since indexing ({size} bytes, indexed {length}); run `dali-arb index --update`",
                        )
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    return None, f"{path} is shorter than indexed (read {len(data)} of {length} bytes at {offset})"
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror}"
        finally:
            os.close(fd)
        problem = check_encoded(data)
        if problem:
            return None, f"{path}: {problem}"
        return np.frombuffer(data, np.uint8), None

    def geometry(self, row: int, *, bucket_h: int, bucket_w: int, u_y: float, u_x: float) -> Geometry:
        """Where ``row`` goes in a batch of bucket ``(bucket_h, bucket_w)``, given its crop draws."""
        h, w = int(self._heights[row]), int(self._widths[row])
        rh, rw, top, left = cover_crop(h, w, bucket_h, bucket_w, u_y, u_x, center=self.config.crop == "center")
        return Geometry(h, w, rh, rw, top, left, bucket_h, bucket_w)

    def _read_or_replace(
        self, planned: int, bucket: int, epoch: int, step: int, position: int, geometry
    ) -> tuple[int, np.ndarray, Geometry]:
        """``(row, payload, geometry)`` for ``planned`` or, if it cannot be served, a deterministic
        stand-in. The payload is the encoded bytes (decoder ``dali``) or the finished crop (``pillow``).
        """
        row = planned
        for attempt in range(_MAX_REPLACEMENT_TRIES):
            if row not in self.bad_rows:
                placed = geometry(row)
                payload, _ = self.prepare(row, placed)
                if payload is not None:
                    return row, payload, placed
                self.bad_rows.add(row)  # the loader logs it once, from the main process
            row = self.replacement(bucket, epoch, step, position, attempt)
        raise RuntimeError(f"no readable image found in bucket {bucket} after {_MAX_REPLACEMENT_TRIES} tries")

    def prepare(self, row: int, geometry: Geometry) -> tuple[np.ndarray | None, str | None]:
        """What the pipeline gets for ``row``: encoded bytes, or with the ``pillow`` decoder the
        finished crop ``uint8 (bucket_h, bucket_w, 3)``; ``(None, reason)`` if it cannot be served."""
        data, reason = self.read(row)
        if data is None or self.config.decoder == "dali":
            return data, reason
        return self.decode_crop(row, data, geometry)

    def problem(self, row: int, bucket_h: int, bucket_w: int) -> str:
        """Why ``row`` cannot be served (for the loader's one warning per sample)."""
        self._setup()
        _, reason = self.prepare(row, self.geometry(row, bucket_h=bucket_h, bucket_w=bucket_w, u_y=0.0, u_x=0.0))
        return reason or "could not be read"

    def decode_crop(self, row: int, data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray | None, str | None]:
        """Decode with libjpeg-turbo at the smallest DCT scale (1/8..1) that still covers the
        resize, EXIF-upright, then resize just the crop window to the bucket (bilinear,
        antialiased): ``uint8 (bucket_h, bucket_w, 3)``, or ``(None, reason)``."""
        import io

        from PIL import Image, ImageOps

        h, w, rh, rw, top, left, bucket_h, bucket_w = geometry
        try:
            with Image.open(io.BytesIO(data.tobytes())) as img:
                rotated = swaps_sides(img)
                stored = (h, w) if rotated else (w, h)
                if img.size != stored:
                    return (
                        None,
                        f"{self._sources[row].as_py()} changed since indexing ({img.size[0]}x{img.size[1]} stored, indexed {w}x{h})",
                    )
                if img.format == "JPEG":
                    img.draft("RGB", (rh, rw) if rotated else (rw, rh))
                upright = ImageOps.exif_transpose(img)
                if upright.mode != "RGB":
                    upright = upright.convert("RGB")
                y_scale, x_scale = upright.height / rh, upright.width / rw
                box = (left * x_scale, top * y_scale, (left + bucket_w) * x_scale, (top + bucket_h) * y_scale)
                return np.asarray(upright.resize((bucket_w, bucket_h), Image.BILINEAR, box=box)), None
        except Exception as exc:  # Pillow raises many kinds on broken files
            return None, f"{self._sources[row].as_py()} cannot be decoded ({type(exc).__name__}: {exc})"

    def replacement(self, bucket: int, epoch: int, step: int, position: int, attempt: int) -> int:
        """A deterministic stand-in from the same bucket (images assigned to the batch's bucket)."""
        lo, hi = int(self._member_starts[bucket]), int(self._member_starts[bucket + 1])
        if hi == lo:  # a leftover batch at a bucket that owns no images: any usable image
            lo, hi = 0, len(self._members)
        pick = np.random.default_rng([self.config.seed, epoch, step, position, attempt, 0xBAD]).integers(lo, hi)
        return int(self._members[pick])
