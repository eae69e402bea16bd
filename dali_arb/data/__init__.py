"""Data on disk and in stores: the manifest, pairs, image facts, storage, read-ahead, the node cache. No DALI or torch."""
