"""What every store shares: limits and deadlines (from the environment), the :class:`Backend` a scheme plugs in,
the refusal of cross-origin redirects, the :class:`Request` the loader makes and its :class:`IOStats`.

Imports: the standard library and ``dali_arb.errors`` (obstore only inside a backend's ``store``).
"""

from __future__ import annotations

import os
import random
import socket
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from ...errors import ConfigError, redact

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
#: Proxies from the environment: where one is set, it is used as it is and redirects are followed.
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
#: The environment every store is configured from (besides its backend's ``settings``): a change makes a new store.
COMMON_SETTINGS = ("DALI_ARB_STORE_DEADLINE_S", "DALI_ARB_FOLLOW_REDIRECTS", *PROXIES)


def truthy(name: str) -> bool:
    """Whether the environment variable ``name`` says yes (1, true, yes, on)."""
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


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential, full jitter."""
    return random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))


# -- redirects to other hosts are refused ------------------------------------------------------------------
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


def refused_at() -> str | None:
    """The address redirects are routed to (:func:`no_cross_origin_redirects`), once one was made; else None."""
    return _refusing_address() if _refuser is not None else None


def no_cross_origin_redirects(options: dict[str, Any], host: str | None, provider_hosts: tuple[str, ...]) -> None:
    """Route every host but ``host`` (and ``provider_hosts``, the provider's credential services) to the refusing
    address, so that a redirect to another origin fails before it carries anything there; nothing where
    ``DALI_ARB_FOLLOW_REDIRECTS`` or a proxy is set."""
    if truthy("DALI_ARB_FOLLOW_REDIRECTS") or any(os.environ.get(name) for name in PROXIES):
        return
    hosts = [host] if host else []
    options["proxy_url"] = f"http://{_refusing_address()}"
    options["proxy_excludes"] = ",".join(hosts + list(provider_hosts))


# -- a scheme's backend --------------------------------------------------------------------------------------
class Backend:
    """How one URL scheme is read: the obstore store of one bucket (or host), and what the user may need to know.
    Subclasses set the class attributes and :meth:`store`; registered in ``schemes.SCHEMES`` by scheme.

    Attributes:
        scheme: the URL scheme (``s3``), lower case.
        label: the store's kind in messages (``S3``, ``HTTP``).
        container: what follows ``scheme://`` (``"bucket"``, ``"host"``), or ``""`` where nothing does
            (``file:///path``).
        can_list: whether a prefix can be listed (HTTP cannot).
        settings: the environment variables the store is configured from (a change makes a new store).
        help: one line on its credentials and endpoint, for error messages and ``--help``.
        provider_hosts: hosts besides the store's own it may talk to (its provider's credential services).
    """

    scheme: str = ""
    label: str = ""
    container: str = "bucket"
    can_list: bool = True
    settings: tuple[str, ...] = ()
    help: str = ""
    provider_hosts: tuple[str, ...] = ()

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        """The obstore store of ``bucket`` (or host) with obstore's ``client_options`` and ``retry_config``."""
        raise NotImplementedError(f"backend {self.scheme!r} makes no store")

    def endpoint(self) -> str:
        """The endpoint it is read from when not the store's default (from the environment), else ``""``."""
        return ""

    def store_name(self, bucket: str) -> str:
        """The store as the user knows it: ``s3://bucket (at ENDPOINT)``, the HTTP origin."""
        endpoint = self.endpoint()
        return redact(f"{self.scheme}://{bucket}" + (f" (at {endpoint})" if endpoint else ""))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scheme}://>"


# -- what the loader asks for and what it cost ---------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """Bytes ``[start, end)`` of ``url``; ``whole``: the request is the whole object, whose size must be ``end``;
    ``version``: the ETag the object had when it was indexed (None: unknown, not checked)."""

    url: str
    start: int
    end: int
    whole: bool = False
    version: str | None = None


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
