"""Reading datasets where they live: ``s3://``, ``gs://``, ``http(s)://`` and ``file://`` URLs, through obstore
(the Rust ``object_store``: async, one API for every store; chosen by measurement, ``benchmarks/RESULTS.md``).

One backend per scheme (``s3.py``, ``gcs.py``, ``http.py``, ``local.py``), listed once in
:data:`~.schemes.SCHEMES`: URL parsing, stores and messages read it. Credentials and endpoints come from each
store's standard environment, nothing project-specific: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (an ``http://`` endpoint such as a local MinIO just
works), ``AWS_PROFILE`` (through boto3's credential chain, when boto3 is installed); ``GOOGLE_APPLICATION_CREDENTIALS``
for ``gs://``. HTTP(S) cannot list: give shard or metadata URLs there.

Transient failures (5xx, ``SlowDown``, dropped connections, timeouts) are retried here (``retries.py``), not inside
obstore, so that they can be counted: at most :data:`RETRIES` times with exponential backoff and full jitter
(:data:`~.base.BACKOFF_S`). A failure is classified by the store's answer (its exception type, HTTP status, error
code, the network error's kind), never by words in the URL, through the one table of
:data:`dali_arb.errors.TABLE`. A store that has answered nothing for :data:`STORE_DEADLINE_S` fails every request
at once. Failures become one line naming the URL, the store's own words and what to do
(:class:`~dali_arb.errors.StorageError`, its fields ``source``, ``cause``, ``status``, ``code`` and ``kind`` set):
the loader stops and blocklists nothing. Only the sample's own problems (404, changed size, over
:data:`MAX_SAMPLE_BYTES`) are its subclasses, which the loader turns into a
:class:`~dali_arb.loader.contracts.Failure` code and replaces.

Redirects to another host are not followed (they would carry the request's credentials, such as
``x-amz-security-token``, there) unless ``DALI_ARB_FOLLOW_REDIRECTS=1``: obstore has no redirect option, so every
host but the store's own (and its provider's credential services) is routed to a proxy address that refuses
connections. Where an ``HTTP(S)_PROXY`` is set, that proxy is used as it is and redirects are followed.

Modules: ``base`` (limits, deadlines, :class:`~.base.Backend`, :class:`Request`, :class:`IOStats`), the backends,
``schemes`` (the registry, URL parsing, stores), ``retries`` (translation, retries, each store's health),
``objects`` (synchronous requests), ``fetcher`` (the loader's concurrent reader). Every name other modules import
is re-exported here. Imports: the standard library, ``dali_arb.errors``; obstore lazily (nothing here runs for
local paths), braceexpand in :func:`expand_sources`.
"""

from __future__ import annotations

from .base import (
    BACKOFF_S,
    COALESCE_GAP,
    MAX_SAMPLE_BYTES,
    RETRIES,
    STORE_DEADLINE_S,
    Backend,
    IOStats,
    Request,
    backoff,
    max_sample_bytes,
    store_deadline_s,
)
from .fetcher import Fetcher
from .local import file_url
from .objects import (
    ObjectInfo,
    delete,
    download,
    exists,
    expand_sources,
    get_bytes,
    get_range,
    head,
    info,
    list_prefix,
    put_bytes,
    replacing,
    strong_etag,
    upload,
)
from .retries import check_size, check_version, failed, is_transient, translated, with_retries
from .schemes import SCHEMES, URL_PATTERN, backend_of, endpoint_of, is_url, split_url, store_name, store_of

__all__ = [
    "BACKOFF_S",
    "COALESCE_GAP",
    "MAX_SAMPLE_BYTES",
    "RETRIES",
    "SCHEMES",
    "STORE_DEADLINE_S",
    "URL_PATTERN",
    "Backend",
    "Fetcher",
    "IOStats",
    "ObjectInfo",
    "Request",
    "backend_of",
    "backoff",
    "check_size",
    "check_version",
    "delete",
    "download",
    "endpoint_of",
    "exists",
    "expand_sources",
    "failed",
    "file_url",
    "get_bytes",
    "get_range",
    "head",
    "info",
    "is_transient",
    "is_url",
    "list_prefix",
    "max_sample_bytes",
    "put_bytes",
    "replacing",
    "split_url",
    "store_deadline_s",
    "store_name",
    "store_of",
    "strong_etag",
    "translated",
    "upload",
    "with_retries",
]
