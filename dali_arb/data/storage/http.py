"""``https://host/path`` and ``http://host/path``: any web server with byte ranges (HTTP 206), through obstore's
``HTTPStore``. HTTP cannot list a folder: give shard or metadata URLs. No credentials.

Imports: the standard library and ``.base``; obstore when a store is made.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .base import Backend, no_cross_origin_redirects


class HTTP(Backend):
    """A web server (``http://``, or ``https://`` for :class:`HTTPS`), read with ranged GETs."""

    scheme = "http"
    label = "HTTP"
    container = "host"
    can_list = False
    help = "no credentials; the server must answer Range requests (206); give shard or metadata URLs, not folders"

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        from obstore.store import HTTPStore

        origin = f"{self.scheme}://{bucket}"
        no_cross_origin_redirects(options, urlsplit(origin).hostname, self.provider_hosts)
        options["allow_http"] = self.scheme == "http"
        return HTTPStore.from_url(origin, client_options=options, retry_config=retry)


class HTTPS(HTTP):
    """A web server over TLS."""

    scheme = "https"
