"""``s3://bucket/key``: Amazon S3 and S3-compatible stores (MinIO, R2, Ceph) through obstore's ``S3Store``.

Credentials and endpoint come from AWS's standard environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (an ``http://`` endpoint such as a local MinIO just
works), ``AWS_PROFILE`` (through boto3's credential chain, when boto3 is installed).

Imports: the standard library, ``dali_arb.errors``, ``.base``; obstore (and boto3 for a profile) when a store is made.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from ...errors import StorageError
from .base import Backend, no_cross_origin_redirects, truthy


class S3(Backend):
    """Amazon S3 and S3-compatible stores."""

    scheme = "s3"
    label = "S3"
    container = "bucket"
    settings = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE", "AWS_SKIP_SIGNATURE", "AWS_EC2_METADATA_DISABLED")  # fmt: skip
    help = (
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_REGION, AWS_ENDPOINT_URL for MinIO/R2, "
        "AWS_PROFILE with boto3, AWS_SKIP_SIGNATURE=true for a public bucket"
    )
    provider_hosts = ("amazonaws.com", "169.254.169.254", "169.254.170.2")

    def endpoint(self) -> str:
        """``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else ``""`` (AWS itself)."""
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        from obstore.store import S3Store

        endpoint = self.endpoint()
        no_cross_origin_redirects(options, urlsplit(endpoint).hostname if endpoint else None, self.provider_hosts)
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
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    source=f"s3://{bucket}",
                    kind="credentials",
                ) from None
            kwargs["credential_provider"] = Boto3CredentialProvider()
        elif not static and not truthy("AWS_SKIP_SIGNATURE") and truthy("AWS_EC2_METADATA_DISABLED"):
            raise StorageError(
                f"no AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE; AWS_SKIP_SIGNATURE=true for a public bucket)",
                source=f"s3://{bucket}",
                kind="credentials",
            )
        return S3Store(bucket, client_options=options, retry_config=retry, **kwargs)
