"""Synchronous requests (indexing, manifests): list a prefix, head, get a range or an object, download a file
whole or not at all, upload a file or bytes, delete an object, expand brace ranges and globs into URLs.

Imports: the standard library, ``dali_arb.errors``, ``.base``, ``.schemes``, ``.retries``; obstore and
braceexpand inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from ...errors import ConfigError, ObjectMissing, StorageError
from .base import IOStats
from .retries import HEALTH, translated, with_retries
from .schemes import SCHEMES, is_url, split_url, store, store_of


@dataclass(frozen=True)
class ObjectInfo:
    """An object found by a listing: its URL, size in bytes, modification time (ns since the epoch) and strong
    ETag (its version; None where the store gives none)."""

    url: str
    size: int
    mtime_ns: int
    etag: str | None = None


def strong_etag(meta: dict[str, Any]) -> str | None:
    """The ETag of an object's ``meta`` (obstore's), or None when there is none or it is weak (``W/"..."``: it
    names no bytes, and a GET with ``If-Match`` would never match it)."""
    etag = meta.get("e_tag")
    return etag if etag and not etag.startswith("W/") else None


def info(url_prefix: str, meta: dict[str, Any]) -> ObjectInfo:
    """The :class:`ObjectInfo` of obstore's ``meta`` of an object under ``url_prefix`` (``s3://bucket/``)."""
    modified = meta.get("last_modified")
    mtime = int(modified.timestamp() * 1e9) if modified is not None else 0
    return ObjectInfo(url_prefix + meta["path"], int(meta["size"]), mtime, strong_etag(meta))


def list_prefix(url: str) -> Iterator[ObjectInfo]:
    """Every object under the prefix ``url`` (``s3://bucket/prefix/``), recursively, in key order per page."""
    import obstore

    scheme, bucket, key = split_url(url)
    if not SCHEMES[scheme].can_list:
        raise StorageError(
            f"{url}: {SCHEMES[scheme].label} cannot list a folder; give .tar shard or .parquet/.csv metadata URLs",
            source=url,
            kind="cannot_list",
        )
    found = store(scheme, bucket)
    base = f"{scheme}://{bucket}/"  # (file:///: obstore's paths have no leading /)
    prefix = key.rstrip("/") + "/" if key else None
    try:
        for page in with_retries(lambda: obstore.list(found, prefix, chunk_size=1000), url, None):
            HEALTH.answered(url)
            for meta in page:
                yield info(base, meta)
    except StorageError:
        raise
    except Exception as exc:  # a page failed (pages are not retried: the listing would start again)
        said = translated(exc, url, retried=0)
        HEALTH.settle(url, said)
        raise said.error from exc


def head(url: str, stats: IOStats | None = None) -> ObjectInfo:
    """Size and modification time of the object at ``url``."""
    import obstore

    found, key = store_of(url)
    scheme, bucket, _ = split_url(url)
    return info(f"{scheme}://{bucket}/", with_retries(lambda: obstore.head(found, key), url, stats))


def get_range(url: str, start: int, end: int, stats: IOStats | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` (with retries)."""
    import obstore

    found, key = store_of(url)
    data = with_retries(lambda: bytes(obstore.get_range(found, key, start=start, end=end)), url, stats)
    if stats is not None:
        stats.add(bytes_read=len(data))
    return data


def get_bytes(url: str, stats: IOStats | None = None) -> bytes:
    """The whole object at ``url`` (with retries)."""
    import obstore

    found, key = store_of(url)
    data = with_retries(lambda: bytes(obstore.get(found, key).bytes()), url, stats)
    if stats is not None:
        stats.add(bytes_read=len(data))
    return data


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it for every thread); 0o022 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A new file to write ``path``'s content into, moved onto ``path`` when the block ends (removed on error).

    It is created beside ``path`` exclusively, under a random name (``tempfile.mkstemp``: ``O_CREAT | O_EXCL |
    O_NOFOLLOW``), so a file or symlink planted in a shared folder is never written through, and ``os.replace``
    swaps the directory entry (a symlink at ``path`` is replaced, its target untouched). Mode: 0o666 less the
    umask, as ``open`` gives."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def download(url: str, path: str | os.PathLike, stats: IOStats | None = None) -> int:
    """Stream the object at ``url`` into the local file ``path`` (written whole or not at all, see
    :func:`replacing`); its size."""
    import obstore

    found, key = store_of(url)
    with replacing(path) as fh:

        def fetch() -> int:
            fh.seek(0)
            fh.truncate()  # a retry starts over
            size = 0
            for chunk in obstore.get(found, key).stream(min_chunk_size=8 << 20):
                fh.write(chunk)
                size += len(chunk)
            return size

        size = with_retries(fetch, url, stats)
    if stats is not None:
        stats.add(bytes_read=size)
    return size


def upload(path: str | os.PathLike, url: str, stats: IOStats | None = None) -> int:
    """Write the local file ``path`` to ``url`` (with retries); returns its size. A reader sees the whole object
    or none of it: obstore's puts are atomic, multipart above 5 MiB."""
    from pathlib import Path

    import obstore

    found, key = store_of(url)
    with_retries(lambda: obstore.put(found, key, Path(path)), url, stats)
    return os.path.getsize(path)


def put_bytes(url: str, data: bytes, stats: IOStats | None = None) -> None:
    """Write ``data`` as the object at ``url`` (with retries; atomic, as :func:`upload`)."""
    import obstore

    found, key = store_of(url)
    with_retries(lambda: obstore.put(found, key, data), url, stats)


def delete(url: str, stats: IOStats | None = None) -> None:
    """Delete the object at ``url`` (with retries); one that is not there is no error."""
    import obstore

    found, key = store_of(url)
    try:
        with_retries(lambda: obstore.delete(found, key), url, stats)
    except ObjectMissing:
        pass


def exists(url: str) -> bool:
    """Whether an object is at ``url``."""
    try:
        head(url)
    except ObjectMissing:
        return False
    return True


def expand_sources(source: str) -> list[str]:
    """The URLs a source stands for: webdataset brace ranges (``{00000..00099}``, ``{a,b}``) and globs
    (``s3://b/shards/*.tar``, listed) expanded; anything else as it is."""
    import fnmatch

    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        expanded = list(braceexpand(source)) if "{" in source else [source]
    except UnbalancedBracesError:
        raise ConfigError(
            f"unbalanced braces in {source}: close each brace, e.g. {{00000..00099}} for a range or {{a,b}} for a choice"
        ) from None
    out: list[str] = []
    for item in expanded:
        if is_url(item) and any(c in item for c in "*?["):
            scheme, bucket, key = split_url(item)
            fixed = re.split(r"[*?\[]", key, maxsplit=1)[0]
            folder = fixed.rsplit("/", 1)[0] + "/" if "/" in fixed else ""
            matched = sorted(
                found.url for found in list_prefix(f"{scheme}://{bucket}/{folder}")
                if fnmatch.fnmatchcase(found.url, item)
            )  # fmt: skip
            if not matched:
                raise StorageError(
                    f"no object matches {item}; check the pattern (and the bucket's contents)", source=item
                )
            out += matched
        else:
            out.append(item)
    return out
