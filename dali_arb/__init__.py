"""dali_arb: aspect-ratio-bucketed image batches, planned in NumPy, decoded by NVIDIA DALI.

``import dali_arb`` needs only NumPy and pyarrow; DALI and torch load when the iterator is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data.manifest import Manifest
from .data.pairs import PairSpec
from .errors import (
    ConfigError,
    DaliArbError,
    DataError,
    DeviceError,
    IndexingError,
    ManifestError,
    PlanError,
    ResourceError,
    StateError,
    StorageError,
)
from .plan.batching import BatchSizing
from .plan.buckets import BucketAssignment, BucketSpec, format_size, parse_size
from .plan.captions import CaptionPolicy
from .plan.mixture import MixedIndex
from .plan.planner import EpochPlan, LeftoverPolicy, Planner
from .plan.world import World

if TYPE_CHECKING:
    from .loader.options import Augment, Dataset, Decode, LoaderOptions, Remote, Workers
    from .torch import DALIBucketIterator

__version__ = "0.1.0"

__all__ = [
    "Augment",
    "BatchSizing",
    "BucketAssignment",
    "BucketSpec",
    "CaptionPolicy",
    "ConfigError",
    "DALIBucketIterator",
    "DaliArbError",
    "DataError",
    "Dataset",
    "Decode",
    "DeviceError",
    "EpochPlan",
    "IndexingError",
    "LeftoverPolicy",
    "LoaderOptions",
    "Manifest",
    "ManifestError",
    "MixedIndex",
    "PairSpec",
    "PlanError",
    "Planner",
    "Remote",
    "ResourceError",
    "StateError",
    "StorageError",
    "Workers",
    "World",
    "format_size",
    "parse_size",
]


#: The loader's option objects (dali_arb.loader.options); they import the loader's registries, so load lazily.
_OPTIONS = ("Augment", "Dataset", "Decode", "LoaderOptions", "Remote", "Workers")


def __getattr__(name: str) -> Any:
    if name == "DALIBucketIterator":  # imports DALI and torch: only on first use
        from .torch import DALIBucketIterator

        return DALIBucketIterator
    if name in _OPTIONS:
        from .loader import options

        return getattr(options, name)
    raise AttributeError(f"module 'dali_arb' has no attribute {name!r}")
