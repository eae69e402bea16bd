"""Reading datasets where they live: ``s3://``, ``gs://`` and ``http(s)://`` URLs, through obstore (the Rust
``object_store``: async, one API for every store; chosen by measurement, ``benchmarks/RESULTS.md``).

Credentials and endpoints come from each store's standard environment, nothing project-specific:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (an
``http://`` endpoint such as a local MinIO just works), ``AWS_PROFILE`` (through boto3's credential chain, when
boto3 is installed); ``GOOGLE_APPLICATION_CREDENTIALS`` for ``gs://``. HTTP(S) cannot list: give shard or
metadata URLs there.

Transient failures (5xx, ``SlowDown``, dropped connections, timeouts) are retried here, not inside obstore, so
that they can be counted: at most :data:`RETRIES` times with exponential backoff and full jitter. Other failures
become one line naming the URL and what to do (:class:`~dali_arb.errors.StorageError`), or, for a sample, a
:class:`~dali_arb.outputs.Failure` code so that the loader replaces it.

obstore is imported lazily; nothing here runs for local paths.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from .errors import ObjectChanged, ObjectMissing, StorageError

__all__ = [
    "RETRIES",
    "Fetcher",
    "IOStats",
    "ObjectInfo",
    "expand_sources",
    "get_bytes",
    "get_range",
    "head",
    "is_url",
    "list_prefix",
    "split_url",
]

SCHEMES = ("s3", "gs", "http", "https")
#: Retries of a transient failure (5xx, SlowDown, dropped connection, timeout) before it counts as a failure.
RETRIES = 6
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
#: Ranges of one object closer than this are fetched with one request (bytes between them are read and dropped).
COALESCE_GAP = 64 << 10
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_TRANSIENT = re.compile(
    r"\b(50[0-4]|SlowDown|Slow Down|RequestTimeout|InternalError|timed? ?out|connection|reset|broken pipe|"
    r"error sending request|incomplete|unexpected eof|service unavailable)\b",
    re.IGNORECASE,
)


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and _URL.match(text) is not None


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or host, key)`` of ``url``; a StorageError for a scheme this version does not read."""
    match = _URL.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in SCHEMES:
        raise StorageError(f"unsupported URL scheme {scheme!r} in {url}; use s3://, gs://, https:// (or a local path)")
    rest = url[match.end() :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url} names no {'host' if scheme.startswith('http') else 'bucket'}")
    return scheme, bucket, key


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


#: The environment a store is configured from: a change makes a new store.
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_REGION", "AWS_PROFILE", "AWS_SKIP_SIGNATURE", "AWS_EC2_METADATA_DISABLED",
             "GOOGLE_APPLICATION_CREDENTIALS")  # fmt: skip


def _store(scheme: str, bucket: str) -> Any:
    """The obstore store of one bucket (or HTTP host), configured from the environment; one per process and
    setting of the environment."""
    return _store_for(scheme, bucket, tuple(os.environ.get(name) for name in _SETTINGS))


@functools.cache
def _store_for(scheme: str, bucket: str, settings: tuple) -> Any:
    from obstore.store import GCSStore, HTTPStore, S3Store

    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}  # retries are ours (counted)
    options: dict[str, Any] = {"timeout": "60s", "connect_timeout": "10s"}
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        options["allow_http"] = endpoint.startswith("http://")
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = endpoint
        static = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not static and os.environ.get("AWS_PROFILE"):
            try:
                from obstore.auth.boto3 import Boto3CredentialProvider
            except ImportError:
                raise StorageError(
                    f"AWS_PROFILE={os.environ['AWS_PROFILE']} needs boto3 to read ~/.aws (pip install boto3), or set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            kwargs["credential_provider"] = Boto3CredentialProvider()
        elif not static and not _truthy("AWS_SKIP_SIGNATURE") and _truthy("AWS_EC2_METADATA_DISABLED"):
            raise StorageError(
                f"no AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE; AWS_SKIP_SIGNATURE=true for a public bucket)"
            )
        return S3Store(bucket, client_options=options, retry_config=retry, **kwargs)
    if scheme == "gs":
        return GCSStore(bucket, client_options=options, retry_config=retry)
    options["allow_http"] = scheme == "http"
    return HTTPStore.from_url(f"{scheme}://{bucket}", client_options=options, retry_config=retry)


def store_of(url: str) -> tuple[Any, str]:
    """``(store, path inside it)`` for ``url``."""
    scheme, bucket, key = split_url(url)
    return _store(scheme, bucket), key


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (the server or the network, not the request)."""
    from obstore import exceptions as E

    if isinstance(exc, (E.NotFoundError, E.PermissionDeniedError, E.UnauthenticatedError, E.PreconditionError,
                        FileNotFoundError, PermissionError)):  # fmt: skip
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool(_TRANSIENT.search(str(exc)))


def describe(exc: BaseException, url: str) -> str:
    """One line for a request that failed for good: what, the URL, what to do."""
    from obstore import exceptions as E

    text = str(exc)
    if "NoSuchBucket" in text:
        return f"bucket of {url} does not exist (NoSuchBucket); check the URL (and AWS_ENDPOINT_URL, AWS_REGION)"
    if isinstance(exc, (E.NotFoundError, FileNotFoundError)) or re.search(r"\b404 Not Found\b", text):
        return f"not found: {url}"
    if isinstance(exc, (E.UnauthenticatedError,)) or re.search(
        r"\b401\b|InvalidAccessKeyId|SignatureDoesNotMatch", text
    ):
        return (
            f"credentials rejected for {url} (InvalidAccessKeyId or SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if isinstance(exc, (E.PermissionDeniedError, PermissionError)) or re.search(r"\b403\b|AccessDenied", text):
        return f"access denied to {url} (403): the credentials lack permission to read it"
    if is_transient(exc):
        return f"{url}: the store kept failing after {RETRIES} retries ({_first_line(text)})"
    return f"cannot read {url}: {_first_line(text)}"


def failed(exc: BaseException, url: str) -> StorageError:
    """The error for a request that failed for good: :class:`ObjectMissing` when the object is not there (its
    bucket is), else a :class:`StorageError`; the message from :func:`describe`."""
    from obstore import exceptions as E

    text = str(exc)
    missing = "NoSuchBucket" not in text and (
        isinstance(exc, (E.NotFoundError, FileNotFoundError)) or re.search(r"\b404 Not Found\b", text)
    )
    error = (ObjectMissing if missing else StorageError)(describe(exc, url))
    error.__cause__ = exc
    return error


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "unknown error")[:200]


@dataclass
class IOStats:
    """Counters of one reader: requests made, retries, bytes read from the store, bytes served to samples,
    read-ahead hits and misses, samples that failed."""

    requests: int = 0
    retries: int = 0
    bytes_read: int = 0
    bytes_served: int = 0
    hits: int = 0
    misses: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def take(self) -> dict[str, int]:
        """The counts since the last ``take`` (and reset them)."""
        with self._lock:
            names = [f.name for f in fields(self) if not f.name.startswith("_")]
            out = {n: getattr(self, n) for n in names}
            for n in names:
                setattr(self, n, 0)
            return out


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))  # full jitter


def _with_retries(call, url: str, stats: IOStats | None):
    for attempt in range(RETRIES + 1):
        try:
            if stats is not None:
                stats.add(requests=1)
            return call()
        except Exception as exc:
            if attempt == RETRIES or not is_transient(exc):
                raise failed(exc, url) from exc
            if stats is not None:
                stats.add(retries=1)
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


# -- synchronous requests (indexing, manifests) ----------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    """An object found by a listing: its URL, size in bytes and modification time (ns since the epoch)."""

    url: str
    size: int
    mtime_ns: int


def _info(url_prefix: str, meta: dict) -> ObjectInfo:
    modified = meta.get("last_modified")
    mtime = int(modified.timestamp() * 1e9) if modified is not None else 0
    return ObjectInfo(url_prefix + meta["path"], int(meta["size"]), mtime)


def list_prefix(url: str) -> Iterator[ObjectInfo]:
    """Every object under the prefix ``url`` (``s3://bucket/prefix/``), recursively, in key order per page."""
    import obstore

    scheme, bucket, key = split_url(url)
    if scheme.startswith("http"):
        raise StorageError(f"{url}: HTTP cannot list a folder; give .tar shard or .parquet/.csv metadata URLs")
    store = _store(scheme, bucket)
    base = f"{scheme}://{bucket}/"
    prefix = key.rstrip("/") + "/" if key else None
    try:
        for page in _with_retries(lambda: obstore.list(store, prefix, chunk_size=1000), url, None):
            for meta in page:
                yield _info(base, meta)
    except StorageError:
        raise
    except Exception as exc:
        raise failed(exc, url) from exc


def head(url: str, stats: IOStats | None = None) -> ObjectInfo:
    """Size and modification time of the object at ``url``."""
    import obstore

    store, key = store_of(url)
    scheme, bucket, _ = split_url(url)
    return _info(f"{scheme}://{bucket}/", _with_retries(lambda: obstore.head(store, key), url, stats))


def get_range(url: str, start: int, end: int, stats: IOStats | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` (with retries)."""
    import obstore

    store, key = store_of(url)
    data = _with_retries(lambda: bytes(obstore.get_range(store, key, start=start, end=end)), url, stats)
    if stats is not None:
        stats.add(bytes_read=len(data))
    return data


def get_bytes(url: str, stats: IOStats | None = None) -> bytes:
    """The whole object at ``url`` (with retries)."""
    import obstore

    store, key = store_of(url)
    data = _with_retries(lambda: bytes(obstore.get(store, key).bytes()), url, stats)
    if stats is not None:
        stats.add(bytes_read=len(data))
    return data


def download(url: str, path: str | os.PathLike, stats: IOStats | None = None) -> int:
    """Stream the object at ``url`` into the local file ``path`` (written whole or not at all); its size."""
    import obstore

    store, key = store_of(url)
    partial = f"{path}.{os.getpid()}.partial"

    def fetch() -> int:
        size = 0
        with open(partial, "wb") as fh:
            for chunk in obstore.get(store, key).stream(min_chunk_size=8 << 20):
                fh.write(chunk)
                size += len(chunk)
        return size

    try:
        size = _with_retries(fetch, url, stats)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    if stats is not None:
        stats.add(bytes_read=size)
    return size


def upload(path: str | os.PathLike, url: str, stats: IOStats | None = None) -> int:
    """Write the local file ``path`` to ``url`` (with retries); returns its size. A reader sees the whole object
    or none of it: obstore's puts are atomic, multipart above 5 MiB."""
    from pathlib import Path

    import obstore

    store, key = store_of(url)
    _with_retries(lambda: obstore.put(store, key, Path(path)), url, stats)
    return os.path.getsize(path)


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

    from .errors import ConfigError

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
                info.url for info in list_prefix(f"{scheme}://{bucket}/{folder}")
                if fnmatch.fnmatchcase(info.url, item)
            )  # fmt: skip
            if not matched:
                raise StorageError(f"no object matches {item}; check the pattern (and the bucket's contents)")
            out += matched
        else:
            out.append(item)
    return out


# -- the loader's reader: many ranges at once, coalesced, from a background event loop ----------------
@dataclass(frozen=True)
class Request:
    """Bytes ``[start, end)`` of ``url``; ``whole``: the request is the whole object, whose size must be ``end``."""

    url: str
    start: int
    end: int
    whole: bool = False


class Fetcher:
    """Fetches many ranges concurrently (at most ``concurrency`` requests in flight) on an event loop of its own
    thread, coalescing ranges of one object that lie within :data:`COALESCE_GAP` of each other. One per process
    (worker processes make their own after they start)."""

    def __init__(self, *, concurrency: int = 32, stats: IOStats | None = None) -> None:
        self.concurrency = concurrency
        self.stats = stats or IOStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dali_arb-fetcher", daemon=True)
        self._thread.start()
        self._gate: asyncio.Semaphore | None = None

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        """The bytes of each request (or the StorageError that ended it), in order; blocks until all are done."""
        return asyncio.run_coroutine_threadsafe(self._fetch(requests), self._loop).result()

    def submit(self, requests: list[Request], done) -> None:
        """Fetch in the background; ``done(requests, results)`` runs on the fetcher's thread when all are done."""

        async def run() -> None:
            done(requests, await self._fetch(requests))

        asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def _fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        results: list[bytes | StorageError | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.url, []).append(i)
        jobs = []
        for url, members in groups.items():
            members.sort(key=lambda i: requests[i].start)
            run: list[int] = []
            for i in members:
                r = requests[i]
                if r.whole or (
                    run and (requests[run[-1]].whole or r.start - max(requests[j].end for j in run) > COALESCE_GAP)
                ):
                    if run:
                        jobs.append(self._span(url, run, requests, results))
                    run = []
                run.append(i)
            if run:
                jobs.append(self._span(url, run, requests, results))
        await asyncio.gather(*jobs)
        return results  # type: ignore[return-value]

    async def _span(self, url: str, members: list[int], requests: list[Request], results: list) -> None:
        """One request covering ``members`` (ranges of ``url``), split into their results."""
        import obstore

        start = min(requests[i].start for i in members)
        end = max(requests[i].end for i in members)
        whole = len(members) == 1 and requests[members[0]].whole
        try:
            store, key = store_of(url)
        except StorageError as exc:
            for i in members:
                results[i] = exc
            return
        for attempt in range(RETRIES + 1):
            async with self._gate:
                self.stats.add(requests=1)
                try:
                    if whole:  # the object's size must still be the indexed one (a changed file)
                        got = await obstore.get_async(store, key)
                        size = int(got.meta["size"])
                        if size != end:
                            for i in members:
                                results[i] = ObjectChanged(f"{url} changed since indexing: {size} bytes, not {end}")
                            return
                        data = bytes(await got.bytes_async())
                    else:
                        data = bytes(await obstore.get_range_async(store, key, start=start, end=end))
                    break
                except Exception as exc:
                    if attempt == RETRIES or not is_transient(exc):
                        error = failed(exc, url)
                        for i in members:
                            results[i] = error
                        return
                    self.stats.add(retries=1)
            await asyncio.sleep(_backoff(attempt))
        self.stats.add(bytes_read=len(data))
        for i in members:
            r = requests[i]
            results[i] = data[r.start - start : r.end - start]
