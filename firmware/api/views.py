"""Firmware API: upload, list, detail, publish, delete, download and the public signing keys."""

from __future__ import annotations

import hashlib
from typing import Any

import django_filters
from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpResponseBase
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from firmware import services, signing
from firmware.api.serializers import (
    FirmwareSerializer,
    FirmwareUploadSerializer,
    RetiredKeySerializer,
    SigningKeySerializer,
)
from firmware.downloads import serve_firmware
from firmware.models import Firmware, SigningKey
from ota_site.auth import DEVICE_OR_OPERATOR_AUTH
from ota_site.errors import PayloadTooLarge
from ota_site.permissions import IsAdmin, IsDeviceOrViewer, IsOperator, RoleByMethod, is_device

# Room for the multipart envelope and the other form fields around the file.
MULTIPART_OVERHEAD = 1024 * 1024


class FirmwareFilter(django_filters.FilterSet):
    device_type = django_filters.CharFilter()
    version = django_filters.CharFilter()
    published = django_filters.BooleanFilter(
        field_name="published_at", lookup_expr="isnull", exclude=True
    )

    class Meta:
        model = Firmware
        fields: list[str] = []


class FirmwareListView(generics.ListCreateAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = FirmwareSerializer
    filterset_class = FirmwareFilter
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self) -> QuerySet[Firmware]:
        return Firmware.objects.all()

    @extend_schema(request=FirmwareUploadSerializer, responses={201: FirmwareSerializer})
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        declared = request.META.get("CONTENT_LENGTH") or "0"
        try:
            declared_length = int(declared)
        except ValueError as exc:
            raise ParseError("Content-Length is not a number.") from exc
        if declared_length > settings.FIRMWARE_MAX_UPLOAD_SIZE + MULTIPART_OVERHEAD:
            raise PayloadTooLarge(
                f"Firmware may be at most {settings.FIRMWARE_MAX_UPLOAD_SIZE} bytes.",
                code="file_too_large",
            )
        data = request.data  # parses the multipart body, streaming the file to disk
        if any(getattr(h, "too_large", False) for h in request._request.upload_handlers):
            raise PayloadTooLarge(
                f"Firmware may be at most {settings.FIRMWARE_MAX_UPLOAD_SIZE} bytes.",
                code="file_too_large",
            )
        serializer = FirmwareUploadSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        values = serializer.validated_data
        upload = values["file"]
        hashes = getattr(upload, "hashes", None)
        if hashes is None:  # not streamed through HashingUploadHandler (another handler set)
            hashes = _hash_file(upload)
        firmware = services.upload_firmware(
            file=upload,
            hashes=hashes,
            version=values.get("version") or None,  # None: a .swu's own version
            device_type=values["device_type"],
            release_notes=values.get("release_notes", ""),
            min_version=values.get("min_version") or None,
            dependencies=values.get("dependencies"),
            release_counter=values.get("release_counter"),
            actor=request.user,
        )
        body = FirmwareSerializer(firmware, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)


def _hash_file(upload: Any) -> dict[str, str]:
    digests = {
        "sha256": hashlib.sha256(),
        "sha1": hashlib.sha1(usedforsecurity=False),
        "md5": hashlib.md5(usedforsecurity=False),
    }
    for chunk in upload.chunks():
        for digest in digests.values():
            digest.update(chunk)
    upload.seek(0)
    return {name: digest.hexdigest() for name, digest in digests.items()}


class FirmwareDetailView(generics.RetrieveDestroyAPIView):
    permission_classes = [RoleByMethod]  # viewers read; deleting is for admins
    serializer_class = FirmwareSerializer
    queryset = Firmware.objects.all()
    lookup_url_kwarg = "firmware_id"

    def perform_destroy(self, instance: Firmware) -> None:
        services.delete_firmware(instance, actor=self.request.user)


class PublishView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(request=None, responses={200: FirmwareSerializer})
    def post(self, request: Request, firmware_id: Any) -> Response:
        firmware = get_object_or_404(Firmware, pk=firmware_id)
        firmware = services.publish_firmware(firmware, actor=request.user)
        return Response(FirmwareSerializer(firmware, context={"request": request}).data)


class DownloadView(APIView):
    """The image bytes. Devices may download published firmware of their own type."""

    authentication_classes = DEVICE_OR_OPERATOR_AUTH
    permission_classes = [IsDeviceOrViewer]

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            (206, "application/octet-stream"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="Redirect to a signed storage URL (S3 mode)."),
            416: OpenApiResponse(description="Range not satisfiable."),
        }
    )
    def get(self, request: Request, firmware_id: Any) -> HttpResponseBase:
        firmware = get_object_or_404(Firmware, pk=firmware_id)
        if is_device(request) and (
            not firmware.is_published
            or firmware.quarantined_at is not None  # its stored bytes failed verify_storage
            or firmware.device_type != request.user.device_type  # type: ignore[union-attr]
        ):
            raise NotFound()
        return serve_firmware(request._request, firmware)

    def head(self, request: Request, firmware_id: Any) -> HttpResponseBase:
        return self.get(request, firmware_id)


class SigningKeyListView(generics.ListAPIView):
    """Public keys that firmware manifests are signed with, by key_id."""

    authentication_classes = DEVICE_OR_OPERATOR_AUTH
    permission_classes = [IsDeviceOrViewer]
    serializer_class = SigningKeySerializer
    queryset = SigningKey.objects.all()
    pagination_class = None


class SigningKeyRotateView(APIView):
    """A new current key, endorsed by the current one (admin)."""

    permission_classes = [IsAdmin]

    @extend_schema(request=None, responses={201: SigningKeySerializer})
    def post(self, request: Request) -> Response:
        key = signing.rotate(actor=request.user)
        return Response(SigningKeySerializer(key).data, status=status.HTTP_201_CREATED)


class SigningKeyRetireView(APIView):
    """Retire a previous key (admin); the current key is refused with 409 ``key_is_current``."""

    permission_classes = [IsAdmin]

    @extend_schema(request=None, responses={200: RetiredKeySerializer})
    def post(self, request: Request, key_id: str) -> Response:
        retired = signing.retire(key_id, actor=request.user)
        return Response(RetiredKeySerializer(retired).data)
