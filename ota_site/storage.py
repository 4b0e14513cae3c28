"""The S3 storage of firmware files, with signed URLs for the endpoint devices reach.

The app may reach the store under a name devices cannot resolve (``http://minio:9000`` inside
docker compose). A signed URL cannot simply be rewritten to another host, because SigV4 signs the
Host header; so when ``AWS_S3_PUBLIC_ENDPOINT_URL`` is set, download URLs are signed by a second
client configured for that endpoint (same credentials, region and bucket; signing is computed
locally and contacts nothing). django-storages' ``AWS_S3_CUSTOM_DOMAIN`` does not fit: it gives
unsigned URLs unless CloudFront signs them, and the firmware bucket is private.
"""

from __future__ import annotations

import threading
from typing import Any

from storages.backends.s3 import S3Storage
from storages.utils import clean_name, setting


class FirmwareS3Storage(S3Storage):
    """S3Storage whose ``url()`` signs for ``public_endpoint_url`` when it is set."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._public_clients = threading.local()

    def get_default_settings(self) -> dict[str, Any]:
        defaults: dict[str, Any] = super().get_default_settings()
        defaults["public_endpoint_url"] = setting("AWS_S3_PUBLIC_ENDPOINT_URL")
        return defaults

    def _public_client(self) -> Any:
        client = getattr(self._public_clients, "client", None)
        if client is None:
            # A client per thread, as django-storages keeps its own connections.
            client = self._create_session().client(
                "s3",
                region_name=self.region_name,
                use_ssl=self.use_ssl,
                endpoint_url=self.public_endpoint_url,
                config=self.client_config,
                verify=self.verify,
            )
            self._public_clients.client = client
        return client

    def url(
        self,
        name: str,
        parameters: dict[str, Any] | None = None,
        expire: int | None = None,
        http_method: str | None = None,
    ) -> str:
        if not self.public_endpoint_url or self.custom_domain or not self.querystring_auth:
            url: str = super().url(name, parameters, expire, http_method)
            return url
        params = {
            **(parameters or {}),
            "Bucket": self.bucket_name,
            "Key": self._normalize_name(clean_name(name)),
        }
        signed: str = self._public_client().generate_presigned_url(
            "get_object",
            Params=params,
            ExpiresIn=self.querystring_expire if expire is None else expire,
            HttpMethod=http_method,
        )
        return signed
