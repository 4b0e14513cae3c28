"""The device update flow over HTTP: check, status reports, validation; sessions for operators."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import django_filters
from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpResponse, JsonResponse
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from firmware import services as firmware_services
from ota_site import answers
from ota_site.auth import DeviceJWTAuthentication
from ota_site.observability import count_update_check
from ota_site.permissions import IsDevice, RoleByMethod, check_own_device
from rollouts import poll, services
from rollouts.api.serializers import (
    ReportReplySerializer,
    SessionSerializer,
    StatusReportSerializer,
    UpdateCheckSerializer,
    ValidationSerializer,
)
from rollouts.models import SessionStatus, UpdateSession


class JSONOnly(DefaultContentNegotiation):
    """Devices get JSON whatever they accept: no Accept header to parse on their hot path. The
    request body is still judged by its Content-Type (415 for anything but JSON)."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class DeviceView(APIView):
    authentication_classes = [DeviceJWTAuthentication]
    permission_classes = [IsDevice]
    content_negotiation_class = JSONOnly
    renderer_classes = [JSONRenderer]
    throttle_classes: list[Any] = []  # rate limits: ota_site.ratelimit, before any view

    def device_id(self, request: Request, device_id: Any = None) -> Any:
        if device_id is None:
            return request.user.id
        check_own_device(request, device_id)
        return device_id


class UpdateCheckView(DeviceView):
    """GET /devices/{id}/updates and GET /updates/check (the device from its token)."""

    @extend_schema(responses={200: UpdateCheckSerializer})
    def get(self, request: Request, device_id: Any = None) -> HttpResponse:
        offer = count_update_check(
            "api",
            poll.check_for_update,
            self.device_id(request, device_id),
            generation=request.user.generation,  # type: ignore[union-attr]
        )
        body: dict[str, Any] = {
            "update_available": offer.firmware is not None,
            "reason": offer.reason,
            "poll_interval": settings.DEVICE_POLL_INTERVAL,
        }
        firmware = offer.firmware
        if firmware is not None:
            url = reverse("firmware-download", kwargs={"firmware_id": firmware["id"]})
            body.update(
                session_id=str(offer.session_uuid),
                action_id=offer.session_id,
                session_status=offer.session_status,
                firmware_id=firmware["id"],
                version=firmware["version"],
                device_type=firmware["device_type"],
                url=request.build_absolute_uri(url),
                size=firmware["size"],
                sha256=firmware["sha256"],
                signature=firmware["signature"],
                key_id=firmware["key_id"],
                manifest=firmware["manifest"],
                min_version=firmware["min_version"],
                is_rollback=offer.is_rollback,
                # Entries cached before these fields existed lack them (counter 0; no TUF path,
                # which a TUF client refuses until the entry expires).
                release_counter=firmware.get("release_counter", 0),
                tuf_target=firmware.get("tuf_target") or None,
                # Lets a device that knows only an older key verify the signer (cached).
                **firmware_services.offer_keys(firmware["key_id"]),
            )
        # Django's JsonResponse rather than DRF's Response and renderer: the poll is the hot path
        # (about 10% of its cost; docs/performance.md). Errors still take DRF's handler.
        response = JsonResponse(body)
        if offer.reason in poll.STABLE_REASONS:
            # The device's next polls may get this answer from the answer cache until the
            # database changes anything it depends on (ota_site.answers).
            answers.mark(response)
        return response


class StatusView(DeviceView):
    """POST /devices/{id}/status and POST /status: the device reports a step of its update."""

    @extend_schema(request=StatusReportSerializer, responses={200: ReportReplySerializer})
    def post(self, request: Request, device_id: Any = None) -> Response:
        device = self.device_id(request, device_id)
        serializer = StatusReportSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        result = services.report_status(
            device,
            data["session_id"],
            status=data["status"],
            progress=data.get("progress"),
            error_message=data.get("error_message"),
            # Checked by the report's own read (a reset or revoked device is refused).
            generation=request.user.generation,  # type: ignore[union-attr]
        )
        return Response(
            {"applied": result.applied, "session": SessionSerializer(result.session).data}
        )


class ValidationView(DeviceView):
    """POST /validation: after the reboot, the device confirms the update or reports a rollback."""

    @extend_schema(request=ValidationSerializer, responses={200: ReportReplySerializer})
    def post(self, request: Request, device_id: Any = None) -> Response:
        device = self.device_id(request, device_id)
        serializer = ValidationSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        result = services.validate_session(
            device,
            data["session_id"],
            success=data["success"],
            running_version=data.get("version"),
            error_message=data.get("error_message"),
            generation=request.user.generation,  # type: ignore[union-attr]
        )
        return Response(
            {"applied": result.applied, "session": SessionSerializer(result.session).data}
        )


class SessionFilter(django_filters.FilterSet):
    device = django_filters.UUIDFilter(field_name="device_id")
    firmware = django_filters.UUIDFilter(field_name="firmware_id")
    rollout = django_filters.UUIDFilter(field_name="rollout_id")
    status = django_filters.ChoiceFilter(choices=SessionStatus.choices)

    class Meta:
        model = UpdateSession
        fields: list[str] = []


class SessionListView(generics.ListAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = SessionSerializer
    filterset_class = SessionFilter

    def get_queryset(self) -> QuerySet[UpdateSession]:
        return UpdateSession.objects.select_related("firmware")


class SessionDetailView(generics.RetrieveAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = SessionSerializer
    lookup_field = "uuid"
    lookup_url_kwarg = "session_id"

    def get_queryset(self) -> QuerySet[UpdateSession]:
        return UpdateSession.objects.select_related("firmware")
