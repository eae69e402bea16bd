"""Failed requests: what they become (through the one table in :mod:`dali_arb.errors`), whether to retry them
(at most :data:`~.base.RETRIES` times, exponential backoff with full jitter, counted), and the health of each
store: one that has answered nothing for :func:`~.base.store_deadline_s` fails every request at once.

Imports: the standard library, ``dali_arb.errors``, ``.base`` and ``.schemes``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import ObjectChanged, ObjectTooLarge, StorageError, Translation, request_facts, translate
from .base import RETRIES, IOStats, backoff, max_sample_bytes, refused_at, store_deadline_s
from .schemes import split_url, store_name

T = TypeVar("T")


def translated(exc: BaseException, url: str, *, retried: int = RETRIES, version: str | None = None) -> Translation:
    """What the request for ``url`` (of the object's ``version``) that failed with ``exc`` after ``retried``
    retries says and becomes: the ``"request"`` rows of :data:`dali_arb.errors.TABLE`."""
    return translate(
        exc, during="request", url=url, store=store_name(url), retried=retried, version=version,
        refused_at=refused_at(),
    )  # fmt: skip


def failed(exc: BaseException, url: str, *, retried: int = RETRIES) -> StorageError:
    """The error for a request that failed for good: :class:`ObjectMissing` when the object is not there (its
    bucket is), :class:`ObjectChanged` for a range past its end (416), else a :class:`StorageError`; its message
    and fields from :data:`dali_arb.errors.TABLE`."""
    return translated(exc, url, retried=retried).error  # type: ignore[return-value]


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (the server or the network, not the request)."""
    return request_facts(exc, refused_at=refused_at()).transient


class Health:
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
        return scheme, bucket, store_name(url)

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
            f"{store_name(url)} answered nothing for {deadline:g} s (last: {entry[1]}, reading {url}); check "
            f"{endpoint}, the network and the store's status, then run again (a loader resumes from its last "
            "checkpoint; DALI_ARB_STORE_DEADLINE_S sets the wait)",
            source=url,
            cause=entry[1],
            kind="silent",
        )

    def reset(self) -> None:
        """Forget every store's silence (a new run in this process: tests, whose loopback servers may reuse the port
        of one that died earlier, and with it the store's name)."""
        with self._lock:
            self._silent.clear()

    def answered(self, url: str) -> None:
        with self._lock:
            self._silent.pop(self._key(url), None)

    def silent(self, url: str, cause: str) -> None:
        now = time.monotonic()
        with self._lock:
            since, _, probe = self._silent.get(self._key(url), (now, "", now + 2 * store_deadline_s()))
            self._silent[self._key(url)] = (since, cause, probe)

    def settle(self, url: str, said: Translation) -> bool:
        """Record a failed request (what :func:`translated` made of it); whether it is worth retrying."""
        if said.transient:
            self.silent(url, said.facts.cause)
        else:
            self.answered(url)
        return said.transient


HEALTH = Health()


def with_retries(call: Callable[[], T], url: str, stats: IOStats | None, *, version: str | None = None) -> T:
    """``call()`` (a request for ``url``, of the object's ``version`` when it names one: ``If-Match``), retried while
    its failure is transient; the error it becomes after (a 412 to ``If-Match``: :class:`ObjectChanged`)."""
    for attempt in range(RETRIES + 1):
        HEALTH.check(url)
        try:
            if stats is not None:
                stats.add(requests=1)
            result = call()
        except Exception as exc:
            said = translated(exc, url, retried=attempt, version=version)
            if not HEALTH.settle(url, said) or attempt == RETRIES:
                raise said.error from exc
            if stats is not None:
                stats.add(retries=1)
            time.sleep(backoff(attempt))
        else:
            HEALTH.answered(url)
            return result
    raise AssertionError("unreachable")  # pragma: no cover


def check_size(url: str, size: int, expected: int) -> None:
    """ObjectChanged when an object of ``size`` bytes is not the ``expected`` size (-1: unknown); ObjectTooLarge
    when it is over :func:`max_sample_bytes` (before its body is read)."""
    if expected >= 0 and size != expected:
        raise ObjectChanged(
            f"{url} changed since indexing: {size} bytes, not {expected}", source=url, kind="size_changed"
        )
    limit = max_sample_bytes()
    if size > limit:
        raise ObjectTooLarge(
            f"{url} is {size} bytes, over the {limit} bytes one sample may be (DALI_ARB_MAX_SAMPLE_BYTES)",
            source=url,
            kind="too_large",
        )


def _bare_etag(tag: str) -> str:
    """An ETag without its quotes and weak prefix (a GCS listing gives them bare, its GETs quoted)."""
    return tag.removeprefix("W/").strip('"')


def check_version(url: str, meta: dict[str, Any], version: str | None) -> None:
    """ObjectChanged when the object a GET read (its ``meta``) is not the indexed ``version`` (its ETag; None: not
    checked), for stores that ignore ``If-Match``."""
    etag = meta.get("e_tag")
    if version is not None and etag is not None and _bare_etag(etag) != _bare_etag(version):
        raise ObjectChanged(
            f"{url} changed since indexing: its ETag is {etag}, not {version}", source=url, kind="version_changed"
        )
