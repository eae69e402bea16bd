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


# -- reading DALI's failures (DALI is not imported: its errors are read by their text) --------------------
def raised_by_dali_arb(error: BaseException) -> DaliArbError | None:
    """The dali_arb error (a DataError, a ManifestError...) that the source raised: itself (worker threads, no
    workers), or, from a worker process, rebuilt from the traceback DALI hands on as the text of its own
    ``Exception("Exception traceback received from worker thread ...")`` (its cause keeps the message only)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DaliArbError):
            return error
        for line in reversed(str(error).splitlines()):
            name, colon, message = line.strip().partition(": ")
            kind = globals().get(name.removeprefix("dali_arb.errors.")) if name.startswith("dali_arb.") else None
            if colon and isinstance(kind, type) and issubclass(kind, DaliArbError):
                return kind(message)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return any(
        marker in text
        for marker in (
            "out of memory",
            "cudaerrormemoryallocation",
            "allocator_failure",
            "std::bad_alloc",
            "cuda_error_out_of_memory",
        )
    )


def dali_error_summary(error: BaseException) -> str:
    """The informative part of a DALI pipeline error: the operator and what it encountered."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line.split("`")[1] for line in lines if line.startswith("Error in") and "`" in line), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    what = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else type(error).__name__)
    return f"{operator.removeprefix('nvidia.dali.fn.')}: {what}"[:200] if operator else what[:200]
