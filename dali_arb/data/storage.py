"""Reading datasets where they live: ``s3://``, ``gs://`` and ``http(s)://`` URLs, through obstore (the Rust
``object_store``: async, one API for every store; chosen by measurement, ``benchmarks/RESULTS.md``).

Credentials and endpoints come from each store's standard environment, nothing project-specific:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (an
``http://`` endpoint such as a local MinIO just works), ``AWS_PROFILE`` (through boto3's credential chain, when
boto3 is installed); ``GOOGLE_APPLICATION_CREDENTIALS`` for ``gs://``. HTTP(S) cannot list: give shard or
metadata URLs there.

Transient failures (5xx, ``SlowDown``, dropped connections, timeouts) are retried here, not inside obstore, so
that they can be counted: at most :data:`RETRIES` times with exponential backoff and full jitter. A failure is
classified by the store's answer (its exception type, HTTP status, error code, the network error's kind), never by
words in the URL. A store that has answered nothing for :data:`STORE_DEADLINE_S` fails every request at once.
Failures become one line naming the URL, the store's own words and what to do
(:class:`~dali_arb.errors.StorageError`): the loader stops and blocklists nothing. Only the sample's own problems
(404, changed size, over :data:`MAX_SAMPLE_BYTES`) are its subclasses, which the loader turns into a
:class:`~dali_arb.loader.contracts.Failure` code and replaces.

Redirects to another host are not followed (they would carry the request's credentials, such as
``x-amz-security-token``, there) unless ``DALI_ARB_FOLLOW_REDIRECTS=1``: obstore has no redirect option, so every
host but the store's own (and its provider's credential services) is routed to a proxy address that refuses
connections. Where an ``HTTP(S)_PROXY`` is set, that proxy is used as it is and redirects are followed.

obstore is imported lazily; nothing here runs for local paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, BinaryIO

from ..errors import ConfigError, ObjectChanged, ObjectMissing, ObjectTooLarge, StorageError

__all__ = [
    "MAX_SAMPLE_BYTES",
    "RETRIES",
    "STORE_DEADLINE_S",
    "Fetcher",
    "IOStats",
    "ObjectInfo",
    "endpoint_of",
    "expand_sources",
    "get_bytes",
    "get_range",
    "head",
    "is_url",
    "list_prefix",
    "max_sample_bytes",
    "split_url",
    "store_deadline_s",
]

SCHEMES = ("s3", "gs", "http", "https")
#: Retries of a transient failure (5xx, SlowDown, dropped connection, timeout) before it counts as a failure.
RETRIES = 6
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
#: Ranges of one object closer than this are fetched with one request (bytes between them are read and dropped).
COALESCE_GAP = 64 << 10
#: Once a store has answered nothing for this many seconds (every request a timeout, a refused or dropped
#: connection, a 5xx), every request to it fails at once; ``DALI_ARB_STORE_DEADLINE_S`` overrides it.
STORE_DEADLINE_S = 60.0
#: Seconds to connect, and to wait for the next bytes of an answer (never more than the deadline).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
#: The most bytes one sample may cost; a larger one is a "too large" failure, never read whole.
#: ``DALI_ARB_MAX_SAMPLE_BYTES`` overrides it.
MAX_SAMPLE_BYTES = 256 << 20
#: A URL at the start of a text (``scheme://``): :func:`is_url`, and the loader's scan of a whole source column.
URL_PATTERN = r"^([a-zA-Z][a-zA-Z0-9+.-]*)://"
_URL = re.compile(URL_PATTERN)
_ANY_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_STATUS = re.compile(r"status code: (\d{3})([^:\n]*)|\bstatus: (\d{3}),")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_CODE = re.compile(r"<Code>(\w+)</Code>")
#: Words of a failed request (its URLs removed) that say the network or the server failed, not the request.
_TRANSIENT = re.compile(
    r"\b(SlowDown|Slow Down|RequestTimeout|InternalError|ServiceUnavailable|timed? ?out|connection (reset|refused|"
    r"closed|aborted)|broken pipe|error sending request|incomplete ?message|unexpected eof)\b",
    re.IGNORECASE,
)
_REJECTED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired")


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


def _positive(name: str, default: float) -> float:
    """The positive number in the environment variable ``name``, else ``default``; a ConfigError echoing it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {text!r}; unset it for the default ({default:g})")
    return value


def store_deadline_s() -> float:
    """Seconds a store may answer nothing before every request to it fails (:data:`STORE_DEADLINE_S`)."""
    return _positive("DALI_ARB_STORE_DEADLINE_S", STORE_DEADLINE_S)


def max_sample_bytes() -> int:
    """The most bytes one sample may cost (:data:`MAX_SAMPLE_BYTES`, or ``DALI_ARB_MAX_SAMPLE_BYTES``)."""
    return int(_positive("DALI_ARB_MAX_SAMPLE_BYTES", MAX_SAMPLE_BYTES))


_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
#: Hosts a store may talk to besides its endpoint: its provider's credential services.
_PROVIDER_HOSTS = {"s3": ("amazonaws.com", "169.254.169.254", "169.254.170.2"),
                   "gs": ("googleapis.com", "metadata.google.internal", "169.254.169.254")}  # fmt: skip
_refuser: socket.socket | None = None
_refuser_lock = threading.Lock()


def _refusing_address() -> str:
    """``127.0.0.1:PORT`` of a socket bound (so no one else can listen there) but never listening: a connection to
    it is refused by the kernel before a byte is sent. One per process (a forked child shares its parent's)."""
    global _refuser
    with _refuser_lock:
        if _refuser is None:
            _refuser = socket.socket()
            _refuser.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{_refuser.getsockname()[1]}"


def _no_cross_origin_redirects(options: dict[str, Any], scheme: str, host: str | None) -> None:
    """Route every host but ``host`` (and the provider's own) to the refusing address, so that a redirect to another
    origin fails before it carries anything there; nothing where ``DALI_ARB_FOLLOW_REDIRECTS`` or a proxy is set."""
    if _truthy("DALI_ARB_FOLLOW_REDIRECTS") or any(os.environ.get(name) for name in _PROXIES):
        return
    hosts = [host] if host else []
    options["proxy_url"] = f"http://{_refusing_address()}"
    options["proxy_excludes"] = ",".join(hosts + list(_PROVIDER_HOSTS.get(scheme, ())))


#: The environment a store is configured from: a change makes a new store.
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_REGION", "AWS_PROFILE", "AWS_SKIP_SIGNATURE", "AWS_EC2_METADATA_DISABLED",
             "GOOGLE_APPLICATION_CREDENTIALS", "DALI_ARB_STORE_DEADLINE_S", "DALI_ARB_FOLLOW_REDIRECTS",
             *_PROXIES)  # fmt: skip


def _store(scheme: str, bucket: str) -> Any:
    """The obstore store of one bucket (or HTTP host), configured from the environment; one per process and
    setting of the environment."""
    return _store_for(scheme, bucket, tuple(os.environ.get(name) for name in _SETTINGS))


@functools.cache
def _store_for(scheme: str, bucket: str, settings: tuple) -> Any:
    from urllib.parse import urlsplit

    from obstore.store import GCSStore, HTTPStore, S3Store

    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}  # retries are ours (counted)
    deadline = store_deadline_s()
    # a stalled answer is noticed by the read timeout; the whole request (a shard streamed) may take long
    options: dict[str, Any] = {"timeout": "1h", "connect_timeout": timedelta(seconds=min(CONNECT_TIMEOUT_S, deadline)),
                               "read_timeout": timedelta(seconds=min(READ_TIMEOUT_S, deadline))}  # fmt: skip
    if scheme == "s3":
        endpoint = endpoint_of(f"s3://{bucket}")
        _no_cross_origin_redirects(options, scheme, urlsplit(endpoint).hostname if endpoint else None)
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
        _no_cross_origin_redirects(options, scheme, "storage.googleapis.com")
        return GCSStore(bucket, client_options=options, retry_config=retry)
    _no_cross_origin_redirects(options, scheme, urlsplit(f"{scheme}://{bucket}").hostname)
    options["allow_http"] = scheme == "http"
    return HTTPStore.from_url(f"{scheme}://{bucket}", client_options=options, retry_config=retry)


def endpoint_of(url: str) -> str:
    """The endpoint ``url`` is read from when it is not the store's default (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` for ``s3://``; HTTP URLs name their host themselves), else ``""``."""
    if url.lower().startswith("s3://"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return ""


def store_of(url: str) -> tuple[Any, str]:
    """``(store, path inside it)`` for ``url``."""
    scheme, bucket, key = split_url(url)
    return _store(scheme, bucket), key


@dataclass(frozen=True)
class Answer:
    """What a failed request says, read from the error's type and the structured parts of its text (its URLs
    removed first: a key such as ``img-503.jpg`` says nothing): the HTTP ``status``, the store's error ``code``
    (``SlowDown``, ``InvalidAccessKeyId``), the network error's ``kind`` (reqwest's ``Connect``, ``Timeout``...),
    and ``cause``, a short phrase for the user."""

    status: int | None
    code: str | None
    kind: str | None
    cause: str
    redirected: bool = False
    ignores_range: bool = False
    missing: bool = False


def answer(exc: BaseException) -> Answer:
    """The :class:`Answer` of a failed request."""
    from obstore import exceptions as E

    text = _ANY_URL.sub("<url>", str(exc))
    status_match = _STATUS.search(text)
    status = int(status_match.group(1) or status_match.group(3)) if status_match else None
    code = (_CODE.search(text) or [None, None])[1]
    kind = (_HTTP_KIND.search(text) or [None, None])[1]
    missing = isinstance(exc, (E.NotFoundError, FileNotFoundError)) or status == 404
    redirected = _refuser is not None and f"{_refusing_address()}," in str(exc)
    ignores_range = any(
        words in text for words in ("NotPartial", "non-partial response when range", "Range request not supported")
    )
    if redirected:
        cause = "redirected to another host"
    elif ignores_range:
        cause = "the server ignores Range requests: it answered 200 with the whole object"
    elif status is not None:
        reason = status_match.group(2).strip() if status_match.group(1) else ""
        cause = " ".join(filter(None, [str(status), reason])) + (f", {code}" if code else "")
    elif kind is not None:
        os_message = _OS_MESSAGE.search(text)
        detail = os_message.group(1).lower() if os_message else {"Timeout": "timed out"}.get(kind, "")
        cause = {"Connect": "cannot connect", "Timeout": "no answer"}.get(kind, "connection dropped") + (
            f": {detail}" if detail else ""
        )
    else:
        cause = _first_line(text)
    return Answer(status, code, kind, cause, redirected, ignores_range, missing)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (the server or the network, not the request)."""
    from obstore import exceptions as E

    if isinstance(exc, (E.NotFoundError, E.PermissionDeniedError, E.UnauthenticatedError, E.PreconditionError,
                        FileNotFoundError, PermissionError)):  # fmt: skip
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    said = answer(exc)
    if said.redirected or said.ignores_range:
        return False
    if said.status is not None:
        return said.status in (408, 429) or said.status >= 500
    if said.kind is not None or said.code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
        return True
    return bool(_TRANSIENT.search(_ANY_URL.sub("<url>", str(exc))))


def describe(exc: BaseException, url: str, *, retried: int = RETRIES) -> str:
    """One line for a request that failed for good: what, the URL, the store's own words, what to do."""
    from obstore import exceptions as E

    said = answer(exc)
    if said.code == "NoSuchBucket":
        return f"bucket of {url} does not exist (NoSuchBucket); check the URL (and AWS_ENDPOINT_URL, AWS_REGION)"
    if said.missing:
        return f"not found: {url}"
    if said.status == 416:
        return f"{url} is shorter than indexed (416 Range Not Satisfiable)"
    if said.redirected:
        return (
            f"{url}: the store redirected the request to another host, which is not followed (it would carry the "
            "request's credentials there); use the URL (or AWS_ENDPOINT_URL) of the host that serves the data, or "
            "set DALI_ARB_FOLLOW_REDIRECTS=1 to follow redirects"
        )
    if said.ignores_range:
        return (
            f"{url}: the server ignores Range requests (it answered 200 with the whole object to a ranged GET); "
            "serve the shards from a server with byte ranges (HTTP 206), or copy them here and index the copies"
        )
    if isinstance(exc, E.UnauthenticatedError) or said.status == 401 or said.code in _REJECTED:
        return (
            f"credentials rejected for {url} ({said.code or said.cause}): check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or GOOGLE_APPLICATION_CREDENTIALS), then run again (a "
            "loader resumes from its last checkpoint)"
        )
    if isinstance(exc, (E.PermissionDeniedError, PermissionError)) or said.status == 403:
        return f"access denied to {url} (403): the credentials lack permission to read it"
    if is_transient(exc):
        tries = f" after {retried} retries" if retried else ""
        return (
            f"{url}: the store {_store_name(url)} kept failing{tries} ({said.cause}); check its status and the "
            "network, then run again (a loader resumes from its last checkpoint)"
        )
    return f"cannot read {url}: {said.cause}"


def failed(exc: BaseException, url: str, *, retried: int = RETRIES) -> StorageError:
    """The error for a request that failed for good: :class:`ObjectMissing` when the object is not there (its
    bucket is), :class:`ObjectChanged` for a range past its end (416), else a :class:`StorageError`; the message
    from :func:`describe`."""
    said = answer(exc)
    if said.missing and said.code != "NoSuchBucket":
        kind: type[StorageError] = ObjectMissing
    elif said.status == 416:
        kind = ObjectChanged
    else:
        kind = StorageError
    error = kind(describe(exc, url, retried=retried))
    error.__cause__ = exc
    return error


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "unknown error")[:200]


def _store_name(url: str) -> str:
    """The store behind ``url``, as the user knows it: ``s3://bucket (at ENDPOINT)``, or the HTTP origin."""
    scheme, bucket, _ = split_url(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None
    return f"{scheme}://{bucket}" + (f" (at {endpoint})" if endpoint else "")


class _Health:
    """When each store (of this process) began failing without an answer, and why: once that lasts longer than
    :func:`store_deadline_s`, requests to it fail at once (a black-holed endpoint costs one deadline, not hundreds of
    timeouts), but for one every further deadline, which finds out whether it is back. Any answer (data, a 404, a
    403) clears it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._silent: dict[tuple, tuple[float, str, float]] = {}  # store -> (since, cause, next probe)

    @staticmethod
    def _key(url: str) -> tuple:
        scheme, bucket, _ = split_url(url)
        return scheme, bucket, _store_name(url)

    def check(self, url: str) -> None:
        """A StorageError when the store of ``url`` has answered nothing for longer than the deadline."""
        deadline = store_deadline_s()
        now = time.monotonic()
        with self._lock:
            entry = self._silent.get(self._key(url))
            if entry is None or now - entry[0] < deadline:
                return
            if now >= entry[2]:  # this request goes through: the store may be back
                self._silent[self._key(url)] = (entry[0], entry[1], now + deadline)
                return
        endpoint = "the endpoint (AWS_ENDPOINT_URL)" if url.startswith("s3://") else "the URL"
        raise StorageError(
            f"{_store_name(url)} answered nothing for {deadline:g} s (last: {entry[1]}, reading {url}); check "
            f"{endpoint}, the network and the store's status, then run again (a loader resumes from its last "
            "checkpoint; DALI_ARB_STORE_DEADLINE_S sets the wait)"
        )

    def answered(self, url: str) -> None:
        with self._lock:
            self._silent.pop(self._key(url), None)

    def silent(self, url: str, exc: BaseException) -> None:
        cause = answer(exc).cause
        now = time.monotonic()
        with self._lock:
            since, _, probe = self._silent.get(self._key(url), (now, "", now + 2 * store_deadline_s()))
            self._silent[self._key(url)] = (since, cause, probe)

    def settle(self, url: str, exc: BaseException) -> bool:
        """Record a failed request; whether it is worth retrying (transient)."""
        transient = is_transient(exc)
        if transient:
            self.silent(url, exc)
        else:
            self.answered(url)
        return transient


_HEALTH = _Health()


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
        _HEALTH.check(url)
        try:
            if stats is not None:
                stats.add(requests=1)
            result = call()
        except Exception as exc:
            if not _HEALTH.settle(url, exc) or attempt == RETRIES:
                raise failed(exc, url, retried=attempt) from exc
            if stats is not None:
                stats.add(retries=1)
            time.sleep(_backoff(attempt))
        else:
            _HEALTH.answered(url)
            return result
    raise AssertionError("unreachable")  # pragma: no cover


# -- synchronous requests (indexing, manifests) ----------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    """An object found by a listing: its URL, size in bytes, modification time (ns since the epoch) and strong
    ETag (its version; None where the store gives none)."""

    url: str
    size: int
    mtime_ns: int
    etag: str | None = None


def strong_etag(meta: dict) -> str | None:
    """The ETag of an object's ``meta`` (obstore's), or None when there is none or it is weak (``W/"..."``: it
    names no bytes, and a GET with ``If-Match`` would never match it)."""
    etag = meta.get("e_tag")
    return etag if etag and not etag.startswith("W/") else None


def _info(url_prefix: str, meta: dict) -> ObjectInfo:
    modified = meta.get("last_modified")
    mtime = int(modified.timestamp() * 1e9) if modified is not None else 0
    return ObjectInfo(url_prefix + meta["path"], int(meta["size"]), mtime, strong_etag(meta))


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
            _HEALTH.answered(url)
            for meta in page:
                yield _info(base, meta)
    except StorageError:
        raise
    except Exception as exc:  # a page failed (pages are not retried: the listing would start again)
        _HEALTH.settle(url, exc)
        raise failed(exc, url, retried=0) from exc


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

    store, key = store_of(url)
    with replacing(path) as fh:

        def fetch() -> int:
            fh.seek(0)
            fh.truncate()  # a retry starts over
            size = 0
            for chunk in obstore.get(store, key).stream(min_chunk_size=8 << 20):
                fh.write(chunk)
                size += len(chunk)
            return size

        size = _with_retries(fetch, url, stats)
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

    from ..errors import ConfigError

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


def _check_version(url: str, meta: dict, version: str | None) -> None:
    """ObjectChanged when the object a GET read (its ``meta``) is not the indexed ``version`` (its ETag; None: not
    checked), for stores that ignore ``If-Match``."""
    etag = meta.get("e_tag")
    if version is not None and etag is not None and etag != version:
        raise ObjectChanged(f"{url} changed since indexing: its ETag is {etag}, not {version}")


def _precondition_failed(exc: BaseException, url: str, version: str | None) -> ObjectChanged | None:
    """A GET refused because the object's ETag is no longer ``version`` (``If-Match``: 412), as ObjectChanged."""
    from obstore.exceptions import PreconditionError

    if version is None or not isinstance(exc, PreconditionError):
        return None
    error = ObjectChanged(f"{url} changed since indexing: its ETag is no longer {version}")
    error.__cause__ = exc
    return error


# -- the loader's reader: many ranges at once, coalesced, from a background event loop ----------------
def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A fetcher's thread: run ``loop`` until stopped, then cancel what is left, wait for it, and close the loop
    (its selector and self-pipe: the thread leaves no descriptor behind)."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


@dataclass(frozen=True)
class Request:
    """Bytes ``[start, end)`` of ``url``; ``whole``: the request is the whole object, whose size must be ``end``;
    ``version``: the ETag the object had when it was indexed (None: unknown, not checked)."""

    url: str
    start: int
    end: int
    whole: bool = False
    version: str | None = None


class Fetcher:
    """Fetches many ranges concurrently (at most ``concurrency`` requests in flight) on an event loop of its own
    thread, coalescing ranges of one object that lie within :data:`COALESCE_GAP` of each other. One per process
    (worker processes make their own after they start)."""

    def __init__(self, *, concurrency: int = 32, stats: IOStats | None = None) -> None:
        self.concurrency = concurrency
        self.stats = stats or IOStats()
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()  # orders every schedule before the stop that close() schedules
        self._closed = False
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="dali_arb-fetcher", daemon=True)
        self._thread.start()
        self._gate: asyncio.Semaphore | None = None

    def close(self) -> None:
        """Cancel every fetch in flight (a waiting :meth:`fetch` raises ``CancelledError``; no ``done`` callback
        runs after this), end the thread and close its event loop. Idempotent; callable from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)  # after everything scheduled before it
        if threading.current_thread() is not self._thread:  # (a finalizer may run on the fetcher's own thread)
            self._thread.join()

    def _schedule(self, coroutine: Any) -> Any:
        """``coroutine`` running on the loop: its concurrent future, or None (and the coroutine dropped) once closed."""
        with self._lock:
            if not self._closed:
                return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        coroutine.close()
        return None

    def fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        """The bytes of each request (or the StorageError that ended it), in order; blocks until all are done.
        After :meth:`close`, a RuntimeError: nothing reads through a closed fetcher."""
        future = self._schedule(self._fetch(requests))
        if future is None:
            raise RuntimeError("dali_arb: a read through a fetcher that was closed with its pipeline")
        return future.result()

    def submit(self, requests: list[Request], done) -> None:
        """Fetch in the background; ``done(requests, results)`` runs on the fetcher's thread when all are done
        (never after :meth:`close`: a closed fetcher drops the submission)."""

        async def run() -> None:
            done(requests, await self._fetch(requests))

        self._schedule(run())

    async def _fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        results: list[bytes | StorageError | None] = [None] * len(requests)
        groups: dict[tuple[str, str | None], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.url, r.version), []).append(i)  # (one request reads one version)
        jobs = []
        for (url, _), members in groups.items():
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
        """One request covering ``members`` (ranges of ``url``, one expected version), split into their results."""
        start = min(requests[i].start for i in members)
        end = max(requests[i].end for i in members)
        whole = len(members) == 1 and requests[members[0]].whole
        version = requests[members[0]].version
        try:
            data = await self._get(url, start, end, whole, version)
        except StorageError as exc:
            for i in members:
                results[i] = exc
            return
        self.stats.add(bytes_read=len(data))
        for i in members:
            r = requests[i]
            results[i] = data if r.end < 0 else data[r.start - start : r.end - start]

    async def _get(self, url: str, start: int, end: int, whole: bool, version: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``url``, or the whole object when ``whole`` (whose size must be ``end``, any
        size up to :func:`max_sample_bytes` when ``end`` is -1), with retries; a StorageError when it fails, an
        ObjectChanged when the object is not the indexed ``version`` (its ETag; None: not checked)."""
        import obstore

        store, key = store_of(url)
        for attempt in range(RETRIES + 1):
            _HEALTH.check(url)
            async with self._gate:
                self.stats.add(requests=1)
                try:
                    if whole or version is not None:  # the GET's meta names the object read: the indexed one?
                        options: dict[str, Any] = {} if whole else {"range": (start, end)}
                        if version is not None:
                            options["if_match"] = version  # another version: 412, not its bytes
                        got = await obstore.get_async(store, key, options=options)
                        _HEALTH.answered(url)
                        if whole:  # the object's size must still be the indexed one, and affordable
                            _check_size(url, int(got.meta["size"]), end)
                        _check_version(url, got.meta, version)
                        return bytes(await got.bytes_async())
                    data = bytes(await obstore.get_range_async(store, key, start=start, end=end))
                    _HEALTH.answered(url)
                    return data
                except StorageError:
                    raise
                except Exception as exc:
                    refused = _precondition_failed(exc, url, version)
                    if refused is not None:  # the store answered: the object is another version
                        _HEALTH.answered(url)
                        raise refused from exc
                    if not _HEALTH.settle(url, exc) or attempt == RETRIES:
                        raise failed(exc, url, retried=attempt) from exc
                    self.stats.add(retries=1)
            await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


def _check_size(url: str, size: int, expected: int) -> None:
    """ObjectChanged when an object of ``size`` bytes is not the ``expected`` size (-1: unknown); ObjectTooLarge
    when it is over :func:`max_sample_bytes` (before its body is read)."""
    if expected >= 0 and size != expected:
        raise ObjectChanged(f"{url} changed since indexing: {size} bytes, not {expected}")
    limit = max_sample_bytes()
    if size > limit:
        raise ObjectTooLarge(
            f"{url} is {size} bytes, over the {limit} bytes one sample may be (DALI_ARB_MAX_SAMPLE_BYTES)"
        )
