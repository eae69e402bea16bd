"""``gs://bucket/key``: Google Cloud Storage through obstore's ``GCSStore``; credentials from
``GOOGLE_APPLICATION_CREDENTIALS`` (or the machine's metadata service).

Imports: the standard library and ``.base``; obstore when a store is made.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, no_cross_origin_redirects


class GCS(Backend):
    """Google Cloud Storage."""

    scheme = "gs"
    label = "Google Cloud Storage"
    container = "bucket"
    settings = ("GOOGLE_APPLICATION_CREDENTIALS",)
    help = "GOOGLE_APPLICATION_CREDENTIALS (a service account's JSON key), or the machine's own service account"
    provider_hosts = ("googleapis.com", "metadata.google.internal", "169.254.169.254")

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        from obstore.store import GCSStore

        no_cross_origin_redirects(options, "storage.googleapis.com", self.provider_hosts)
        return GCSStore(bucket, client_options=options, retry_config=retry)
