"""The node's cache folder: where it lives, and the local copies of manifests in object storage kept in it.

Where: the ``cache_dir`` argument (``--cache-dir``), else ``$DALI_ARB_CACHE``, else ``$XDG_CACHE_HOME/dali_arb``,
else ``~/.cache/dali_arb``. A URL manifest (``s3://bucket/m.parquet``) is copied to
``v<CACHE_FORMAT>/remote/<url digest>-<version digest>.parquet`` once per version of the object
(:func:`local_manifest`); the mapped columns beside it are :mod:`dali_arb.data.cache`'s.

Imports the standard library and ``errors``; ``storage`` (and obstore) only when a URL is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ManifestError, ResourceError, StorageError, redact

__all__ = ["CACHE_ENV", "CACHE_FORMAT", "cache_error", "cache_root", "local_manifest", "text_digest"]

#: The environment variable naming the cache folder.
CACHE_ENV = "DALI_ARB_CACHE"
#: Bumped when the layout changes; each format lives in its own ``v<N>`` folder.
CACHE_FORMAT = 4  # 2: pair columns; runs of every source column; 3: the sources' identity (mtime_ns, source_size, etag); 4: original sizes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, ``$DALI_ARB_CACHE``, ``$XDG_CACHE_HOME/dali_arb`` or ``~/.cache/dali_arb``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dali_arb"


def text_digest(text: str) -> str:
    """blake2b (128 bits) of ``text``: how the cache names a path, a URL or options."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_error(root: Path, exc: OSError, doing: str) -> ResourceError:
    """The one line saying the cache folder ``root`` cannot be written (``exc``) and where to point it instead."""
    reason = exc.strerror or type(exc).__name__
    return ResourceError(
        f"cannot {doing} in the dali_arb cache {root} ({reason}); point ${CACHE_ENV} or --cache-dir at a "
        "writable folder with room for about the manifest's size"
    )


def local_manifest(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str | os.PathLike:
    """``path`` itself, or for a URL (``s3://bucket/m.parquet``) a local copy in the cache folder, fetched once per
    version of the object.

    A version is named by the object's ETag, size and Last-Modified (a rewrite within one second at the same size has
    another ETag), and fetched only while the ETag still matches (``If-Match``), so a copy never holds another
    version's bytes. A store that gives no ETag (some HTTP servers) is named by size and Last-Modified, to the
    second: a warning says so, as a rewrite within that second at the same size would be served stale."""
    from .storage import is_url

    if not is_url(path):
        return path
    url = str(path)
    folder = cache_root(cache_dir) / f"v{CACHE_FORMAT}" / "remote"
    try:
        for _ in range(3):  # the object may be rewritten between the HEAD and the GET: look again
            version = _remote_version(url)
            local = folder / f"{text_digest(url)}-{text_digest(json.dumps(version, sort_keys=True))}.parquet"
            with contextlib.suppress(OSError):
                if local.stat().st_size == version["size"]:
                    return local
            folder.mkdir(parents=True, exist_ok=True)
            if _download_version(url, version, local):
                return local
        raise ManifestError(f"manifest {url} kept changing while it was copied; open it again once it is written")
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from None
    except OSError as exc:
        raise cache_error(cache_root(cache_dir), exc, f"copy manifest {url}") from None


def _remote_version(url: str) -> dict[str, Any]:
    """What names a version of the object at ``url``: its ETag (or None), size and Last-Modified, as the store
    gives them (a warning where it gives no ETag)."""
    import obstore

    from .storage import store_of, with_retries

    store, key = store_of(url)
    meta = with_retries(lambda: obstore.head(store, key), url, None)
    modified = meta.get("last_modified")
    version = {
        "e_tag": meta.get("e_tag") or None,
        "size": int(meta["size"]),
        "last_modified": modified.isoformat() if modified is not None else None,
    }
    if version["e_tag"] is None:
        import warnings

        warnings.warn(
            f"{redact(url)} has no ETag: its local copy is known by size and Last-Modified ({version['last_modified']}) "
            "only, so a rewrite within that second at the same size is not seen; serve it from a store that sends "
            "ETags, or write a changed manifest to a new name",
            UserWarning,
            stacklevel=4,
        )
    return version


def _download_version(url: str, version: dict[str, Any], local: Path) -> bool:
    """Copy the object at ``url`` into ``local`` (whole or not at all, through a temporary file created exclusively)
    if it is still ``version``; False if it changed meanwhile."""
    import obstore
    from obstore.exceptions import PreconditionError

    from .storage import store_of, with_retries

    store, key = store_of(url)
    options = {"if_match": version["e_tag"]} if version["e_tag"] else {}

    def fetch() -> int | None:
        try:
            fd, partial = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".partial", dir=local.parent)
            fh = os.fdopen(fd, "wb")
        except OSError as exc:
            raise _LocalWriteFailed(exc) from exc
        try:
            size = 0
            with fh:
                for chunk in obstore.get(store, key, options=options).stream(min_chunk_size=8 << 20):
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise _LocalWriteFailed(exc) from exc
                    size += len(chunk)
            if size != version["size"]:
                return None  # rewritten between the HEAD and the GET (a store with no ETag to hold it)
            os.chmod(partial, 0o644)
            os.replace(partial, local)
            return size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)

    try:
        return with_retries(fetch, url, None) is not None
    except Exception as exc:
        if isinstance(exc.__cause__, PreconditionError):
            return False
        if isinstance(exc.__cause__, _LocalWriteFailed):
            raise exc.__cause__.error from None  # the disk's failure, not the store's
        raise


class _LocalWriteFailed(Exception):
    """Carries a failed local write through the store's retries (never retried, never blamed on the store)."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error
