"""Data on disk and in stores: the manifest, pairs, image facts, storage, read-ahead, the node cache. No DALI or torch."""

from . import cache as _cache  # noqa: F401  (registers the node cache as what Manifest.open maps through)
