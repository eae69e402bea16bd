"""``gs://bucket/key``: Google Cloud Storage through obstore's ``GCSStore``; credentials from
``GOOGLE_APPLICATION_CREDENTIALS`` or ``GOOGLE_SERVICE_ACCOUNT`` (a service account's JSON key; its ``gcs_base_url``,
if any, is the endpoint), or the machine's metadata service.

An emulator (fake-gcs-server, gcp-storage-emulator) is named by ``STORAGE_EMULATOR_HOST`` (``http://127.0.0.1:4443``
or ``127.0.0.1:4443``), as for Google's own clients: requests go there, unsigned, over plain HTTP if so.

Imports: the standard library and ``.base``; obstore when a store is made.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

from .base import Backend, no_cross_origin_redirects

#: What Google's clients read to talk to an emulator instead of storage.googleapis.com.
EMULATOR = "STORAGE_EMULATOR_HOST"
#: Where obstore finds a service account's JSON key (a path, or the JSON itself for ``_KEY``).
_KEY_PATHS = ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_APPLICATION_CREDENTIALS")


def _base_url_of_key() -> str:
    """The ``gcs_base_url`` of the service account key obstore will read, else ``""`` (also where it cannot be read:
    obstore then says why)."""
    text = os.environ.get("GOOGLE_SERVICE_ACCOUNT_KEY", "")
    if not text:
        path = next((os.environ[n] for n in _KEY_PATHS if os.environ.get(n)), "")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            return ""
    try:
        key = json.loads(text)
    except ValueError:
        return ""
    url = key.get("gcs_base_url", "") if isinstance(key, dict) else ""
    return url.rstrip("/") if isinstance(url, str) else ""


class GCS(Backend):
    """Google Cloud Storage (or an emulator: ``STORAGE_EMULATOR_HOST``)."""

    scheme = "gs"
    label = "Google Cloud Storage"
    container = "bucket"
    settings = (EMULATOR, "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH",
                "GOOGLE_SERVICE_ACCOUNT_KEY")  # fmt: skip
    help = (
        "GOOGLE_APPLICATION_CREDENTIALS (a service account's JSON key), or the machine's own service account; "
        "STORAGE_EMULATOR_HOST for an emulator"
    )
    provider_hosts = ("googleapis.com", "metadata.google.internal", "169.254.169.254")

    def endpoint(self) -> str:
        """``STORAGE_EMULATOR_HOST`` (with ``http://`` where it names no scheme), else the service account key's
        ``gcs_base_url``, else ``""`` (Google itself)."""
        host = os.environ.get(EMULATOR, "").strip().rstrip("/")
        if host:
            return host if "://" in host else f"http://{host}"
        return _base_url_of_key()

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        from obstore.store import GCSStore

        endpoint = self.endpoint()
        no_cross_origin_redirects(
            options, urlsplit(endpoint).hostname if endpoint else "storage.googleapis.com", self.provider_hosts
        )
        options["allow_http"] = endpoint.startswith("http://")
        config: dict[str, Any] = {}
        if os.environ.get(EMULATOR, "").strip():  # an emulator checks no signature: a key that signs nothing
            config["service_account_key"] = json.dumps(
                {
                    "gcs_base_url": endpoint,
                    "disable_oauth": True,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": "",
                }
            )
        return GCSStore(bucket, config=config or None, client_options=options, retry_config=retry)
