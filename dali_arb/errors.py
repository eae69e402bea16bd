"""Exceptions raised by dali_arb.

Every error a user can cause says what was wrong, echoes the offending value or file, and says
what to do. The CLI prints ``str(error)`` as one line and exits non-zero.

Hierarchy::

    DaliArbError                 base of everything raised on purpose
    ├── ConfigError              a bad option value (also a ValueError)
    ├── ManifestError            a manifest that is missing, unreadable or malformed
    ├── IndexingError            a source that cannot be indexed (missing path, empty folder)
    ├── PlanError                data and options that cannot make a plan (too few images)
    ├── StateError               a state_dict that does not fit this loader
    ├── DataError                the data cannot be served at run time (a bucket with no readable image left)
    ├── StorageError             a store, its credentials or the OS failed (5xx after retries, 401/403, no
    │   │                        answer before the deadline, a server that ignores Range, EMFILE, EIO): the
    │   │                        run stops and nothing is blocklisted; its subclasses are a sample's own
    │   ├── ObjectMissing        the object is not there (deleted after indexing)
    │   ├── ObjectChanged        the object's size is not the indexed one
    │   └── ObjectTooLarge       the object is larger than one sample may be (``DALI_ARB_MAX_SAMPLE_BYTES``)
    └── DeviceError              a device that is not there (``--device gpu`` without a GPU)
        └── ResourceError        a device or shared memory that ran out (GPU memory, ``/dev/shm``)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DaliArbError",
    "DataError",
    "DeviceError",
    "IndexingError",
    "ManifestError",
    "ObjectChanged",
    "ObjectMissing",
    "ObjectTooLarge",
    "PlanError",
    "ResourceError",
    "StateError",
    "StorageError",
]


class DaliArbError(Exception):
    """Base class of every error dali_arb raises on purpose."""


class ConfigError(DaliArbError, ValueError):
    """An option has a value that cannot work."""


class ManifestError(DaliArbError):
    """A manifest is missing, unreadable, or lacks what it must hold."""


class IndexingError(DaliArbError):
    """A source given to the indexer cannot be indexed."""


class PlanError(DaliArbError):
    """The data and options cannot make a plan (for example, fewer images than one batch)."""


class StateError(DaliArbError):
    """A ``state_dict`` does not fit the loader it is loaded into."""


class DeviceError(DaliArbError):
    """A requested device is not available."""


class DataError(DaliArbError):
    """The data cannot be served at run time (for example, every image of a bucket became unreadable)."""


class StorageError(DaliArbError):
    """A store, its credentials or the OS failed (not the sample): the message names the URL or file, the store's
    own words and what to do. Raised out of the loader; never a reason to blocklist a sample."""


class ObjectMissing(StorageError):
    """The object is not in the store (a sample deleted after indexing)."""


class ObjectChanged(StorageError):
    """The object's size differs from the indexed one (a sample rewritten after indexing)."""


class ObjectTooLarge(StorageError):
    """The object is larger than one sample may cost (``DALI_ARB_MAX_SAMPLE_BYTES``); its body is not read."""


class ResourceError(DeviceError):
    """A device or shared-memory resource ran out (GPU memory, ``/dev/shm``); the message says what to lower."""
