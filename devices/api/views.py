"""Device API: enrollment, tokens and heartbeat for devices; list, detail, change, delete for
operators, who also provision hawkBit DDI devices and their target tokens (devices/ddi.py)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status, viewsets
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from devices import certificates, ddi, services
from devices.api.filters import DeviceFilter
from devices.api.serializers import (
    CertificateSerializer,
    DdiDeviceCreatedSerializer,
    DdiDeviceCreateSerializer,
    DeviceGroupSerializer,
    DeviceSerializer,
    DeviceUpdateSerializer,
    EnrolledSerializer,
    EnrollSerializer,
    HeartbeatReplySerializer,
    HeartbeatSerializer,
    RegisteredSerializer,
    RegisterSerializer,
    RenewSerializer,
    RevokeSerializer,
    TargetTokenSerializer,
    TokenRequestSerializer,
    TokenSerializer,
)
from devices.models import Device, DeviceGroup
from ota_site.auth import DEVICE_OR_OPERATOR_AUTH, DeviceIdentity, DeviceJWTAuthentication
from ota_site.errors import ServiceError
from ota_site.permissions import (
    IsAdmin,
    IsDevice,
    IsDeviceOrViewer,
    IsOperator,
    Role,
    RoleByMethod,
    check_own_device,
)
from ota_site.proxies import forwarded_header


def token_reply(device: Device) -> dict[str, Any]:
    token, lifetime = services.issue_token(device)
    return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}


class RegisterView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(request=RegisterSerializer, responses={201: RegisteredSerializer})
    def post(self, request: Request) -> Response:
        serializer = RegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        device, secret = services.register_device(
            enrollment_token=data["enrollment_token"],
            hardware_id=data["hardware_id"],
            device_type=data["device_type"],
            current_version=data.get("current_version", ""),
            metadata=data.get("metadata"),
        )
        body = {"device_id": device.id, "device_secret": secret, **token_reply(device)}
        return Response(RegisteredSerializer(body).data, status=status.HTTP_201_CREATED)


class TokenView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(request=TokenRequestSerializer, responses={200: TokenSerializer})
    def post(self, request: Request) -> Response:
        serializer = TokenRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if "secret" in data:
            device = services.authenticate_device(data["device_id"], data["secret"])
        else:
            device = device_from_client_certificate(request)
            if "device_id" in data and data["device_id"] != device.id:
                raise services.AuthenticationError(
                    "The client certificate belongs to another device.",
                    code="certificate_invalid",
                )
        return Response(TokenSerializer(token_reply(device)).data)


def device_from_client_certificate(request: Request) -> Device:
    """The device whose certificate nginx verified, believed only from a trusted proxy.

    The headers of any other peer are ignored (anyone can send them), and the certificate is
    checked again by devices.certificates.authenticate_certificate. nginx
    (``ssl_verify_client optional_no_ca``) forwards a certificate that failed its verification
    with the verdict ``FAILED:<reason>``: that is always refused, with the code of the app's own
    check when it finds the problem too (``certificate_expired``, ``certificate_revoked``, ...),
    else with one read from nginx's reason.
    """
    verdict = forwarded_header(request, "HTTP_X_SSL_CLIENT_VERIFY")
    pem = forwarded_header(request, "HTTP_X_SSL_CLIENT_CERT")
    if verdict is None or verdict == "NONE" or not pem:
        raise services.AuthenticationError(
            "Send device_id and secret, or connect with a device certificate.",
            code="credentials_missing",
        )
    if verdict == "SUCCESS":
        return certificates.authenticate_certificate(pem)
    certificates.authenticate_certificate(pem)  # raises with its own, more precise code
    reason = verdict.removeprefix("FAILED:")[:100]
    # OpenSSL's reasons: "certificate has expired", "certificate is not yet valid", ...
    code = "certificate_expired" if "expired" in reason else "certificate_invalid"
    raise services.AuthenticationError(
        f"The proxy did not verify the client certificate ({reason}).", code=code
    )


class HeartbeatView(APIView):
    authentication_classes = [DeviceJWTAuthentication]
    permission_classes = [IsDevice]

    @extend_schema(request=HeartbeatSerializer, responses={200: HeartbeatReplySerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        check_own_device(request, device_id)
        serializer = HeartbeatSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        device = get_object_or_404(Device, pk=device_id)
        services.check_credentials(device, request.user.generation)  # type: ignore[union-attr]
        services.record_heartbeat(
            device,
            current_version=serializer.validated_data.get("current_version"),
            metadata=serializer.validated_data.get("metadata"),
        )
        reply = {"poll_interval": settings.DEVICE_POLL_INTERVAL, "server_time": timezone.now()}
        return Response(HeartbeatReplySerializer(reply).data)


class DeviceListView(generics.ListAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = DeviceSerializer
    filterset_class = DeviceFilter
    queryset = Device.objects.select_related("ddi")  # DeviceSerializer.ddi, without a query a row


class DeviceDetailView(generics.RetrieveUpdateDestroyAPIView):
    """GET for the device itself or a viewer; PUT and PATCH for operators; DELETE for admins."""

    authentication_classes = DEVICE_OR_OPERATOR_AUTH
    queryset = Device.objects.select_related("ddi")
    serializer_class = DeviceSerializer
    lookup_url_kwarg = "device_id"

    def get_permissions(self) -> list[Any]:
        if self.request.method in ("GET", "HEAD", "OPTIONS"):
            return [IsDeviceOrViewer()]
        return [RoleByMethod()]

    def get_object(self) -> Device:
        check_own_device(self.request, self.kwargs["device_id"])
        device: Device = super().get_object()
        if isinstance(self.request.user, DeviceIdentity):
            services.check_credentials(device, self.request.user.generation)
        return device

    @extend_schema(request=DeviceUpdateSerializer, responses={200: DeviceSerializer})
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        device = self.get_object()
        partial = kwargs.get("partial", False)
        serializer = DeviceUpdateSerializer(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        services.update_device(device, actor=request.user, **serializer.validated_data)
        return Response(DeviceSerializer(device).data)

    def perform_destroy(self, instance: Device) -> None:
        services.delete_device(instance, actor=self.request.user)


class DeviceGroupViewSet(viewsets.ModelViewSet):
    # Groups are operators' to manage, deletion included (devices stay, without a group).
    permission_classes = [RoleByMethod]
    delete_role = Role.OPERATOR
    serializer_class = DeviceGroupSerializer
    lookup_url_kwarg = "group_id"

    def get_queryset(self) -> QuerySet[DeviceGroup]:
        # Meta.ordering does not apply to aggregate queries; pages need a stable order.
        return DeviceGroup.objects.annotate(device_count=Count("devices")).order_by("name")

    def perform_create(self, serializer: Any) -> None:
        group = services.create_group(actor=self.request.user, **serializer.validated_data)
        serializer.instance = DeviceGroup.objects.annotate(device_count=Count("devices")).get(
            pk=group.pk
        )

    def perform_update(self, serializer: Any) -> None:
        services.update_group(
            serializer.instance, actor=self.request.user, **serializer.validated_data
        )

    def perform_destroy(self, instance: DeviceGroup) -> None:
        services.delete_group(instance, actor=self.request.user)


class RetryView(APIView):
    """POST /devices/{id}/retry: offer the assigned version again after a failed attempt."""

    permission_classes = [IsOperator]

    @extend_schema(request=None, responses={200: DeviceSerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        device = get_object_or_404(Device.objects.select_related("group", "ddi"), pk=device_id)
        services.retry_update(device, actor=request.user)
        return Response(DeviceSerializer(device).data)


class EnrollView(APIView):
    """POST /devices/enroll: enrollment by CSR, answered with a device certificate."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(request=EnrollSerializer, responses={201: EnrolledSerializer})
    def post(self, request: Request) -> Response:
        serializer = EnrollSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        device, certificate = certificates.enroll_with_csr(
            enrollment_token=data["enrollment_token"],
            hardware_id=data["hardware_id"],
            device_type=data["device_type"],
            csr=data["csr"],
            current_version=data.get("current_version", ""),
            metadata=data.get("metadata"),
        )
        body = {
            "device_id": device.id,
            "certificate": certificate.certificate,
            "ca_certificate": certificate.ca.certificate,
            **token_reply(device),
        }
        return Response(EnrolledSerializer(body).data, status=status.HTTP_201_CREATED)


class CertificateView(APIView):
    """POST /devices/{id}/certificate: the device renews its certificate with a new CSR."""

    authentication_classes = [DeviceJWTAuthentication]
    permission_classes = [IsDevice]

    @extend_schema(request=RenewSerializer, responses={201: CertificateSerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        check_own_device(request, device_id)
        serializer = RenewSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        certificate = certificates.renew_certificate(
            device_id,
            request.user.generation,  # type: ignore[union-attr]
            serializer.validated_data["csr"],
        )
        return Response(CertificateSerializer(certificate).data, status=status.HTTP_201_CREATED)


class RevokeView(APIView):
    """POST /devices/{id}/revoke (admin): lock the device out for good."""

    permission_classes = [IsAdmin]

    @extend_schema(request=RevokeSerializer, responses={200: DeviceSerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        device = get_object_or_404(Device, pk=device_id)
        serializer = RevokeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        certificates.revoke_device(
            device, actor=request.user, reason=serializer.validated_data.get("reason", "")
        )
        return Response(DeviceSerializer(device).data)


# --- hawkBit DDI devices: provisioned by operators, who see each target token once --------------


class DdiDeviceCreateView(APIView):
    """POST /devices/ddi: a new DDI device (controllerId = hardware_id) with its target token."""

    permission_classes = [IsOperator]

    @extend_schema(request=DdiDeviceCreateSerializer, responses={201: DdiDeviceCreatedSerializer})
    def post(self, request: Request) -> Response:
        serializer = DdiDeviceCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        device, token = ddi.provision_device(
            controller_id=data["controller_id"],
            device_type=data["device_type"],
            current_version=data.get("current_version", ""),
            group=data.get("group"),
            metadata=data.get("metadata"),
            actor=request.user,
        )
        device = Device.objects.select_related("ddi").get(pk=device.pk)
        body = {
            "device": device,
            "target_token": token,
            "tenant": settings.DDI_TENANT,
            "controller_id": device.hardware_id,
        }
        return Response(DdiDeviceCreatedSerializer(body).data, status=status.HTTP_201_CREATED)


class TargetTokenView(APIView):
    """POST /devices/{id}/target-token issues a new one (the old one stops working); DELETE
    revokes it (the device can still authenticate with the gateway token or its certificate)."""

    permission_classes = [IsOperator]

    @extend_schema(request=None, responses={201: TargetTokenSerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        device = get_object_or_404(Device, pk=device_id)
        token = ddi.issue_target_token(device, actor=request.user)
        body = {
            "target_token": token,
            "token_prefix": token[:8],
            "controller_id": device.hardware_id,
            "tenant": settings.DDI_TENANT,
        }
        return Response(TargetTokenSerializer(body).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request, device_id: Any) -> Response:
        device = get_object_or_404(Device, pk=device_id)
        if not ddi.revoke_target_token(device, actor=request.user):
            raise ServiceError(
                "This device has no target token.", code="no_target_token", status_code=404
            )
        return Response(status=status.HTTP_204_NO_CONTENT)


class DdiAttributesView(APIView):
    """POST /devices/{id}/ddi-attributes: ask the device to send its attributes (configData) on
    its next poll; they land in its metadata."""

    permission_classes = [IsOperator]

    @extend_schema(request=None, responses={202: DeviceSerializer})
    def post(self, request: Request, device_id: Any) -> Response:
        device = get_object_or_404(Device, pk=device_id)
        ddi.request_attributes(device, actor=request.user)
        device = Device.objects.select_related("ddi").get(pk=device.pk)
        return Response(DeviceSerializer(device).data, status=status.HTTP_202_ACCEPTED)
