"""The registry of URL schemes (:data:`SCHEMES`: the one place they are listed), and what reads it: URL parsing
(:func:`is_url`, :func:`split_url`), the store of a URL (:func:`store_of`, one per bucket and setting of the
environment) and the names and endpoints in messages.

Imports: the standard library, ``dali_arb.errors`` and this package's backends (obstore only when a store is made).
"""

from __future__ import annotations

import functools
import os
import re
from datetime import timedelta
from typing import Any

from ...errors import StorageError
from .base import COMMON_SETTINGS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S, Backend, store_deadline_s
from .gcs import GCS
from .http import HTTP, HTTPS
from .local import Local
from .s3 import S3

#: Every scheme this version reads, by name, in the order messages list them. Add a backend here (or, in a test,
#: ``monkeypatch.setitem(SCHEMES, name, backend)``) and URL parsing, stores and messages follow.
SCHEMES: dict[str, Backend] = {backend.scheme: backend for backend in (S3(), GCS(), HTTPS(), HTTP(), Local())}
#: A URL at the start of a text (``scheme://``, any scheme: one that is not in :data:`SCHEMES` is a URL that
#: :func:`split_url` refuses, naming those that are, never a local path): :func:`is_url`, and the loader's scan
#: of a whole source column.
URL_PATTERN = r"^([a-zA-Z][a-zA-Z0-9+.-]*)://"
_URL = re.compile(URL_PATTERN)


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and _URL.match(text) is not None


def supported() -> str:
    """The schemes of :data:`SCHEMES` as a user writes them: ``s3://, gs://, ...``."""
    return ", ".join(f"{scheme}://" for scheme in SCHEMES)


def backend_of(url: str) -> Backend:
    """The backend of ``url``'s scheme; a StorageError naming :data:`SCHEMES` for a scheme that is not there."""
    match = _URL.match(url)
    scheme = match.group(1).lower() if match else ""
    backend = SCHEMES.get(scheme)
    if backend is None:
        raise StorageError(
            f"unsupported URL scheme {scheme!r} in {url}; use {supported()} (or a local path)", source=url
        )
    return backend


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or host, key)`` of ``url``; a StorageError for a scheme not in :data:`SCHEMES`."""
    backend = backend_of(url)
    rest = url[_URL.match(url).end() :]
    bucket, _, key = rest.partition("/")
    if backend.container and not bucket:
        raise StorageError(f"{url} names no {backend.container}", source=url)
    if not backend.container and bucket:
        raise StorageError(f"{url} names a host ({bucket}); write {backend.scheme}:///absolute/path", source=url)
    return backend.scheme, bucket, key


def endpoint_of(url: str) -> str:
    """The endpoint ``url`` is read from when it is not the store's default (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` for ``s3://``; HTTP URLs name their host themselves), else ``""``."""
    match = _URL.match(url)
    backend = SCHEMES.get(match.group(1).lower()) if match else None
    return backend.endpoint() if backend is not None else ""


def store_name(url: str) -> str:
    """The store behind ``url``, as the user knows it: ``s3://bucket (at ENDPOINT)``, or the HTTP origin."""
    scheme, bucket, _ = split_url(url)
    return SCHEMES[scheme].store_name(bucket)


def store_of(url: str) -> tuple[Any, str]:
    """``(store, path inside it)`` for ``url``."""
    scheme, bucket, key = split_url(url)
    return store(scheme, bucket), key


def store(scheme: str, bucket: str) -> Any:
    """The obstore store of one bucket (or HTTP host), configured from the environment; one per process and
    setting of the environment."""
    backend = SCHEMES[scheme]
    names = (*backend.settings, *COMMON_SETTINGS)
    return _store_for(backend, bucket, tuple((name, os.environ.get(name)) for name in names))


@functools.cache
def _store_for(backend: Backend, bucket: str, settings: tuple) -> Any:
    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}  # retries are ours (counted)
    deadline = store_deadline_s()
    # a stalled answer is noticed by the read timeout; the whole request (a shard streamed) may take long
    options: dict[str, Any] = {"timeout": "1h", "connect_timeout": timedelta(seconds=min(CONNECT_TIMEOUT_S, deadline)),
                               "read_timeout": timedelta(seconds=min(READ_TIMEOUT_S, deadline))}  # fmt: skip
    return backend.store(bucket, options, retry)
