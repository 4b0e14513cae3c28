"""/tuf/metadata/: the TUF repository's metadata, exactly the bytes that were signed.

Consistent snapshots: ``N.root.json``, ``N.snapshot.json`` and ``N.targets.json`` never change once
written, so they are cacheable for a long time; ``timestamp.json`` is the newest timestamp and
changes whenever anything is published or re-signed, so it is cached briefly.

Who may read: devices (their JWT) and signed-in users of any role, unless TUF_METADATA_PUBLIC is
on. TUF does not need the metadata to be secret, but it lists every device type and version, so
by default it is not served to the world. Firmware bytes are not served here: a device downloads
them from its offer's URL (with resume) and checks them against the TUF target afterwards.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny, BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from firmware import tuf_repo
from firmware.models import TufRole
from ota_site.auth import DEVICE_OR_OPERATOR_AUTH
from ota_site.errors import json_error
from ota_site.permissions import IsDeviceOrViewer

# timestamp.json: short, so a new publish reaches devices behind caches within a minute.
TIMESTAMP_MAX_AGE = 60
VERSIONED_MAX_AGE = 365 * 86400


class MetadataReader(BasePermission):
    """Anyone when TUF_METADATA_PUBLIC, else devices and users with a role."""

    message = "TUF metadata is for devices and signed-in users."

    def has_permission(self, request: Request, view: Any) -> bool:
        if settings.TUF_METADATA_PUBLIC:
            return AllowAny().has_permission(request, view)
        return IsDeviceOrViewer().has_permission(request, view)


def _cache_control(max_age: int, *, immutable: bool) -> str:
    scope = "public" if settings.TUF_METADATA_PUBLIC else "private"
    return f"{scope}, max-age={max_age}" + (", immutable" if immutable else "")


def _metadata_response(content: bytes, *, max_age: int, immutable: bool) -> HttpResponse:
    response = HttpResponse(content, content_type="application/json")
    response["Cache-Control"] = _cache_control(max_age, immutable=immutable)
    response["Content-Length"] = str(len(content))
    return response


class _MetadataView(APIView):
    authentication_classes = DEVICE_OR_OPERATOR_AUTH
    permission_classes = [MetadataReader]


@extend_schema(
    responses={
        (200, "application/json"): OpenApiTypes.OBJECT,
        404: OpenApiResponse(description="No such role or version."),
    }
)
class VersionedMetadataView(_MetadataView):
    """GET /tuf/metadata/{N}.{root|snapshot|targets}.json"""

    def get(self, request: Request, version: str, role: str) -> HttpResponse:
        row = tuf_repo.served(role, int(version)) if len(version) <= 9 else None
        if row is None:
            return json_error(404, "not_found", f"No {version}.{role}.json in this repository.")
        return _metadata_response(bytes(row.content), max_age=VERSIONED_MAX_AGE, immutable=True)


@extend_schema(
    responses={
        (200, "application/json"): OpenApiTypes.OBJECT,
        404: OpenApiResponse(description="The repository is not initialised."),
    }
)
class TimestampView(_MetadataView):
    """GET /tuf/metadata/timestamp.json: the newest timestamp."""

    def get(self, request: Request) -> HttpResponse:
        row = tuf_repo.served(TufRole.TIMESTAMP)
        if row is None:
            return json_error(404, "not_found", "The TUF repository is not initialised.")
        return _metadata_response(bytes(row.content), max_age=TIMESTAMP_MAX_AGE, immutable=False)


def not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """Anything else under /tuf/: a JSON 404, as the rest of the device API answers."""
    return json_error(404, "not_found", "Not found.")
