"""``DALIBucketIterator``: what a training loop holds. Imports torch and DALI (lazily, on construction)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .buckets import BucketSpec
from .errors import ConfigError, ManifestError, StateError
from .manifest import Manifest
from .planner import LeftoverPolicy
from .source import BatchSource, LoaderConfig
from .world import World

__all__ = ["DALIBucketIterator"]

log = logging.getLogger("dali_arb")
STATE_FORMAT = 1
DTYPES = ("float16", "bfloat16", "float32", "uint8")


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
        manifest: path of a manifest from ``dali-arb index``, or a :class:`Manifest`.
        batch_size: samples per batch on this rank.
        buckets: a :class:`BucketSpec` (default: NovelAI's buckets).
        seed: shared by every rank.
        rank, world_size: ``None`` reads ``torch.distributed`` / torchrun's environment (else 0, 1).
        device: ``"gpu"`` (decode with nvJPEG on this rank's GPU), ``"cpu"``, or ``"auto"``.
        crop: ``"random"`` (seeded by seed, epoch, step and sample) or ``"center"``.
        flip: probability of a horizontal flip.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` (scaled to [-1, 1]) or ``"uint8"`` (raw).
        leftover, sync_ranks: see :class:`Planner`.
        workers: processes reading (and with the ``pillow`` decoder, decoding) images; 0 does it in
            the main process. Default: all cores with ``pillow``, else a quarter of them (1-4).
        num_threads: DALI threads (default: a quarter of the cores with ``pillow``, 4 on GPU, else all cores).
        prefetch: batches DALI prepares ahead.
        device_id: GPU index (default: the local rank).
        decoder: ``"dali"`` (DALI decodes and resizes: nvJPEG on GPU, libjpeg-turbo on CPU), ``"pillow"``
            (the worker processes decode with libjpeg-turbo at reduced DCT scale, 1/2..1/8, when an
            image is much larger than its bucket, and resize the crop window; DALI flips and
            normalises), or ``"auto"``: ``dali`` on GPU, ``pillow`` on CPU, where it is the faster
            (see benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Manifest,
        *,
        batch_size: int,
        buckets: BucketSpec | None = None,
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
        num_threads: int | None = None,
        prefetch: int = 2,
        device_id: int | None = None,
        decoder: str = "auto",
    ) -> None:
        from .pipeline import resolve_device

        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError(f"workers must be a non-negative integer, got {workers!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigError(f"prefetch must be a positive integer, got {prefetch!r}")
        if buckets is not None and not isinstance(buckets, BucketSpec):
            raise ConfigError(f"buckets must be a BucketSpec, got {type(buckets).__name__}")
        if not isinstance(manifest, Manifest):
            manifest = Manifest.read(manifest, columns=["caption", "source", "offset", "length"])
        if "source" not in manifest.table.column_names or manifest.table.column("source").null_count == len(manifest):
            raise ManifestError(
                f"manifest {manifest.path or ''} has no image files to read (it was indexed from metadata without "
                "a path column); index the images themselves with `dali-arb index FOLDER_OR_SHARDS`"
            )
        world = World.detect(rank, world_size)
        self.world = world
        self.device = resolve_device(device)
        self.device_id = (world.local_rank if device_id is None else device_id) if self.device == "gpu" else None
        if decoder not in ("auto", "dali", "pillow"):
            raise ConfigError(f"decoder must be 'auto', 'dali' or 'pillow', got {decoder!r}")
        decoder = ("dali" if self.device == "gpu" else "pillow") if decoder == "auto" else decoder
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
            decoder=decoder,
        )
        self.manifest = manifest
        self._source = BatchSource(manifest, self.config, first_epoch=0, first_step=0)
        self._planner = self._source.planner  # validates batch size, seed, leftover, sizes
        cores = os.cpu_count() or 1
        if self.config.decoder == "pillow":  # the workers decode and resize; DALI only normalises
            self.workers = workers if workers is not None else cores
            self.num_threads = num_threads or max(1, cores // 4)
        else:  # the workers only read bytes; DALI decodes
            self.workers = workers if workers is not None else max(1, min(4, cores // 4))
            self.num_threads = num_threads or (4 if self.device == "gpu" else cores)
        self.prefetch = prefetch
        self._max_side = int(max(manifest.heights.max(), manifest.widths.max()))
        self._epoch = 0
        self._step = 0
        self._pipe: Any = None
        self._stream: tuple[int, int] | None = None  # (epoch, step) the pipeline produces next
        self._failed: dict[str, str] = {}  # key -> reason; the rows behind them are self._source.bad_rows

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
        if epoch != self._epoch or self._step >= len(self):
            self._epoch, self._step = int(epoch), 0

    @property
    def failed(self) -> list[str]:
        """Keys of samples that could not be read or decoded at run time (each was replaced)."""
        return list(self._failed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._step >= len(self):
            self._epoch, self._step = self._epoch + 1, 0
        while self._step < len(self):
            batch = self._fetch(self._epoch, self._step)
            self._step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable: the position and everything that decides the batches."""
        c = self.config
        s = c.spec
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "step": self._step,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "world_size": c.world_size,
            "rank": c.rank,
            "sync_ranks": c.sync_ranks,
            "leftover": c.leftover,
            "crop": c.crop,
            "flip": c.flip,
            "num_images": len(self.manifest),
            "buckets": {
                "max_area": s.max_area,
                "min_dim": s.min_dim,
                "max_dim": s.max_dim,
                "step": s.step,
                "base": list(s.base),
                "no_upscale": s.no_upscale,
                "max_aspect_error": s.max_aspect_error,
            },
            "failed": dict(self._failed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: the next batch is the one that would have come.

        The world size may differ if the global batch (world size x batch size) is the same and
        ranks are in sync: the same global batches then continue (elastic resume).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise StateError(
                f"not a DALIBucketIterator state (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
            )
        mine = self.state_dict()
        for name in ("seed", "sync_ranks", "leftover", "crop", "flip", "num_images", "buckets"):
            if state.get(name) != mine[name]:
                raise StateError(
                    f"state was saved with {name}={state.get(name)!r}, this loader has {name}={mine[name]!r}; "
                    "build the loader with the same options to resume"
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
        epoch, step = int(state["epoch"]), int(state["step"])
        if step < 0 or epoch < 0:
            raise StateError(f"state has a negative position: epoch {epoch}, step {step}")
        self._failed = dict(state.get("failed", {}))
        self._source.bad_rows = set(self._rows_of(list(self._failed)))
        self._epoch, self._step = epoch, step
        self._close_pipeline()

    # -- the pipeline -------------------------------------------------------------------------------
    def _rows_of(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(pa.array(keys, pa.string()), value_set=self.manifest.keys.combine_chunks())
        return [int(i) for i in found.to_pylist() if i is not None]

    def _close_pipeline(self) -> None:
        self._pipe = None
        self._stream = None

    def _open_pipeline(self, epoch: int, step: int) -> None:
        from .pipeline import build_pipeline

        self._close_pipeline()
        self._pipe = build_pipeline(
            self._source.starting_at(epoch, step),
            batch_size=self.config.batch_size,
            device=self.device,
            device_id=self.device_id,
            dtype=self.dtype,
            num_threads=self.num_threads,
            workers=self.workers,
            prefetch=self.prefetch,
            max_image_side=self._max_side,
            decoded_input=self.config.decoder == "pillow",
        )
        self._stream = (epoch, step)

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self._planner.steps_per_epoch(epoch) else (epoch + 1, 0)

    def _fetch(self, epoch: int, step: int) -> dict[str, Any]:
        attempts = self.config.batch_size + 1
        for _ in range(attempts):
            if self._pipe is None or self._stream != (epoch, step):
                self._open_pipeline(epoch, step)
            try:
                images, meta = self._pipe.run()
            except Exception as exc:  # DALI ends a pipeline on one undecodable image: find it, skip it
                self._close_pipeline()
                if not self._blocklist_undecodable(epoch, step, exc):
                    raise
                continue
            self._stream = self._advance(epoch, step)
            return self._to_batch(images, meta, epoch, step)
        raise RuntimeError(f"batch {step} of epoch {epoch} kept failing after {attempts} recoveries")

    def _blocklist_undecodable(self, epoch: int, step: int, error: Exception) -> bool:
        """Decode each sample of the failed batch alone; blocklist the ones that fail. True if any."""
        from .pipeline import build_pipeline

        outputs = self._source.starting_at(epoch, step).batch(epoch, step)
        rows = [int(m[0]) for m in outputs[-1]]  # meta is the last output
        culprits = []
        for i, row in enumerate(rows):
            single = _SingleSample(tuple(out[i] for out in outputs))
            try:
                probe = build_pipeline(
                    single,
                    batch_size=1,
                    device=self.device,
                    device_id=self.device_id,
                    dtype="uint8",
                    workers=0,
                    num_threads=1,
                    prefetch=1,
                    decoded_input=self.config.decoder == "pillow",
                )
                probe.run()
            except Exception as exc:
                culprits.append((row, exc))
        if not culprits:
            return False
        for row, exc in culprits:
            self._source.bad_rows.add(row)
            key = self.manifest.keys_at(np.array([row]))[0]
            self._record_failure(key, f"cannot be decoded by DALI ({_dali_error_summary(exc)})")
        return True

    def _record_failure(self, key: str, reason: str) -> None:
        if key not in self._failed:
            self._failed[key] = reason
            log.warning("dali_arb: sample %r replaced by another of its bucket: %s", key, reason)

    def _to_batch(self, images: Any, meta: Any, epoch: int, step: int) -> dict[str, Any]:
        import torch

        dense = images.as_tensor()
        shape = list(dense.shape())
        # The pipeline runs DALI's dynamic executor, whose outputs own their memory: hand them to
        # torch through DLPack without a copy, as DALI's own iterator does for such pipelines.
        device = torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")
        with torch.cuda.device(device) if self.device == "gpu" else contextlib.nullcontext():
            out = torch.from_dlpack(dense)
        if self.dtype == "bfloat16":
            out = out.to(torch.bfloat16)
        info = np.asarray(meta.as_array(), dtype=np.int64)  # (B, 9): see source.META_FIELDS
        assert (info[:, 6] == epoch).all() and (info[:, 7] == step).all(), "pipeline out of step with the loader"
        rows, planned = info[:, 0], info[:, 1]
        for i in np.flatnonzero(rows != planned):
            key = self.manifest.keys_at(planned[i : i + 1])[0]
            if key not in self._failed:
                self._source.bad_rows.add(int(planned[i]))
                self._record_failure(key, self._source.problem(int(planned[i]), int(shape[2]), int(shape[3])))
        captions = self.manifest.column_at("caption", rows)
        return {
            "images": out,
            "ids": self.manifest.keys_at(rows),
            "captions": [c or "" for c in captions],
            "original_size": torch.from_numpy(np.ascontiguousarray(info[:, 4:6])),
            "crop_top_left": torch.from_numpy(np.ascontiguousarray(info[:, 2:4])),
            "target_size": (int(shape[2]), int(shape[3])),
            "flipped": torch.from_numpy(info[:, 8] != 0),
            "epoch": epoch,
            "step": step,
        }


def _dali_error_summary(error: Exception) -> str:
    """The informative part of a DALI pipeline error: the operator and what it encountered."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line.split("`")[1] for line in lines if line.startswith("Error in") and "`" in line), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    what = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else type(error).__name__)
    return f"{operator.removeprefix('nvidia.dali.fn.')}: {what}"[:200] if operator else what[:200]


class _SingleSample:
    """An external source that serves one prepared sample (for probing decode failures)."""

    def __init__(self, sample: tuple) -> None:
        self.sample = sample

    def __call__(self, batch_info) -> tuple[list, ...]:
        return tuple([value] for value in self.sample)
