"""THE planner factory: what decides the batches (:class:`LoaderConfig`) and the one way a loader's
:class:`~dali_arb.plan.planner.Planner` is made from manifests. Imports the plan layer, ``data.manifest`` and
``loader.options``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.manifest import Manifest
from ..errors import ConfigError
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec
from ..plan.planner import Planner, make_planner
from ..plan.world import World
from .options import Augment

__all__ = ["LoaderConfig", "build_planner"]


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides the batches (all of it goes into ``state_dict``).

    ``batch_size``: an ``int`` (every bucket the same) or a :class:`~dali_arb.plan.batching.BatchSizing` (a pixel
    budget or a table); ``spec``: one :class:`BucketSpec` for every dataset, or a tuple of one per dataset;
    ``repeats``: per dataset, ``None`` for once each (see :mod:`dali_arb.plan.mixture`)."""

    batch_size: int | BatchSizing
    spec: BucketSpec | tuple[BucketSpec, ...]
    seed: int
    rank: int
    world_size: int
    leftover: str
    sync_ranks: bool
    crop: str
    flip: float
    repeats: tuple[float, ...] | None = None
    #: the clips' :class:`~dali_arb.plan.frames.FrameSpec` (``frames=``), or None: the plan is over images
    frames: Any = None

    def __post_init__(self) -> None:
        Augment(crop=self.crop, flip=self.flip)  # the one check of crop and flip

    @property
    def sizing(self) -> BatchSizing:
        """``batch_size`` as a :class:`~dali_arb.plan.batching.BatchSizing`."""
        return BatchSizing.of(self.batch_size)

    def to_dict(self) -> dict[str, object]:
        """Its piece of ``state_dict()``: the plan's settings (``buckets`` and ``repeats`` as JSON data). With batch
        sizes by bucket, ``batch_size`` is ``None`` and ``batching`` holds :meth:`BatchSizing.to_dict` (else
        ``None``)."""
        spec = self.spec.to_dict() if isinstance(self.spec, BucketSpec) else [b.to_dict() for b in self.spec]
        sizing = self.sizing
        batching = {"batching": None if sizing.fixed is not None else sizing.to_dict()}
        return {**batching, "seed": self.seed, "batch_size": sizing.fixed, "world_size": self.world_size,
                "rank": self.rank, "sync_ranks": self.sync_ranks, "leftover": self.leftover, "crop": self.crop, "flip": self.flip,
                "buckets": spec, "repeats": list(self.repeats) if self.repeats is not None else None,
                **({"frames": self.frames.fingerprint()} if self.frames is not None else {})}  # fmt: skip

    def specs(self, count: int) -> tuple[BucketSpec, ...]:
        """The bucket options of each of ``count`` datasets."""
        if isinstance(self.spec, BucketSpec):
            return (self.spec,) * count
        if len(self.spec) != count or not all(isinstance(s, BucketSpec) for s in self.spec):
            raise ConfigError(f"buckets must be one BucketSpec, or one per dataset ({count}), got {self.spec!r}")
        return tuple(self.spec)


def build_planner(config: LoaderConfig, manifests: Manifest | list[Manifest]) -> Planner:
    """The loader's planner (in the loader and again in each worker): :func:`~dali_arb.plan.planner.make_planner`
    over the bucket index of each manifest's cache when it is mapped (``data/cache.py``), else computed."""
    from ..data.cache import bucket_index

    manifests = [manifests] if isinstance(manifests, Manifest) else list(manifests)
    specs = config.specs(len(manifests))
    video = {"frames": config.frames} if config.frames is not None else {}
    if video:  # the clips are cut from each manifest's video columns (frames, fps, duration)
        video["videos"] = [m.video_columns() for m in manifests]
    return make_planner(
        [bucket_index(m, s) for m, s in zip(manifests, specs)],
        specs,
        repeats=config.repeats or None,
        seed=config.seed,
        batch_size=config.batch_size,
        world=World(config.rank, config.world_size),
        leftover=config.leftover,
        sync_ranks=config.sync_ranks,
        **video,
    )
