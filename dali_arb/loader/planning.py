"""THE planner factory: what decides the batches (:class:`LoaderConfig`) and the one way a loader's
:class:`~dali_arb.plan.planner.Planner` is made from manifests. Imports the plan layer, ``data.manifest`` and
``loader.options``."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.manifest import Manifest
from ..errors import ConfigError
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec
from ..plan.frames import FrameSpec
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
    #: clips instead of images (issue 21): the frame buckets and how clips are cut; None: images only
    frames: FrameSpec | None = None

    def __post_init__(self) -> None:
        Augment(crop=self.crop, flip=self.flip)  # the one check of crop and flip
        if self.frames is not None and not isinstance(self.frames, FrameSpec):
            raise ConfigError(f"frames must be a FrameSpec or None, got {type(self.frames).__name__}")

    @property
    def sizing(self) -> BatchSizing:
        """``batch_size`` as a :class:`~dali_arb.plan.batching.BatchSizing`."""
        return BatchSizing.of(self.batch_size)

    def to_dict(self) -> dict[str, object]:
        """Its piece of ``state_dict()``: the plan's settings (``buckets`` and ``repeats`` as JSON data). With batch
        sizes by bucket, ``batch_size`` is ``None`` and ``batching`` holds :meth:`BatchSizing.to_dict` (else
        ``None``). With clips, ``frames`` holds :meth:`FrameSpec.to_dict` and its ``fingerprint`` (a resume with other
        frame options is refused); without, there is no ``frames`` key (an image loader's state is unchanged)."""
        spec = self.spec.to_dict() if isinstance(self.spec, BucketSpec) else [b.to_dict() for b in self.spec]
        sizing = self.sizing
        batching = {"batching": None if sizing.fixed is not None else sizing.to_dict()}
        return {**batching, "seed": self.seed, "batch_size": sizing.fixed, "world_size": self.world_size,
                "rank": self.rank, "sync_ranks": self.sync_ranks, "leftover": self.leftover, "crop": self.crop, "flip": self.flip,
                "buckets": spec, "repeats": list(self.repeats) if self.repeats is not None else None,
                **self._frames_dict()}  # fmt: skip

    def _frames_dict(self) -> dict[str, object]:
        if self.frames is None:
            return {}
        return {"frames": {**self.frames.to_dict(), "fingerprint": self.frames.fingerprint()}}

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
    return make_planner(
        [bucket_index(m, s) for m, s in zip(manifests, specs)],
        specs,
        repeats=config.repeats or None,
        seed=config.seed,
        batch_size=config.batch_size,
        world=World(config.rank, config.world_size),
        leftover=config.leftover,
        sync_ranks=config.sync_ranks,
        frames=config.frames,
        videos=None if config.frames is None else [m.video_columns() for m in manifests],
    )
