"""Who is polling: a target token, the tenant's gateway token, or a verified client certificate.

``Authorization: TargetToken <token>`` names one device (the token is stored hashed on its
DdiTarget). ``GatewayToken <token>`` speaks for any device of the tenant (DDI_GATEWAY_TOKEN).
Without either, a client certificate verified by nginx (forwarded only by TRUSTED_PROXIES, and
checked again here) identifies the device, whose controllerId must then be its hardware_id or id.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from devices import ddi
from devices.certificates import authenticate_certificate
from devices.models import Device
from devices.services import AuthenticationError
from ota_site.errors import ServiceError
from ota_site.proxies import forwarded_header
from ota_site.validators import hardware_id_validator

MAX_CONTROLLER_ID = 128  # Device.hardware_id


class TenantUnknown(ServiceError):
    status_code: int = 404
    code = "tenant_not_found"


def check_tenant(tenant: str) -> None:
    if tenant.lower() != settings.DDI_TENANT.lower():
        raise TenantUnknown(f"This server serves the tenant {settings.DDI_TENANT!r} only.")


def authenticate(request: HttpRequest, tenant: str, controller_id: str) -> Device:
    check_tenant(tenant)
    if not controller_id or len(controller_id) > MAX_CONTROLLER_ID:
        raise ddi.DeviceUnknown("The controller id must have 1 to 128 characters.")
    try:
        hardware_id_validator(controller_id)
    except ValidationError as exc:
        # No device has such a hardware_id (the same rule as everywhere else), and none is
        # auto-created with one: a NUL would fail in PostgreSQL, ".." would break every href.
        raise ddi.DeviceUnknown(f"Not a valid controller id: {exc.messages[0]}") from exc
    scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "targettoken" and credential:
        return ddi.by_target_token(controller_id, credential)
    if scheme.lower() == "gatewaytoken" and credential:
        if not ddi.gateway_token_valid(credential):
            raise AuthenticationError("Wrong gateway token.", code="authentication_failed")
        return ddi.by_trusted_identity(controller_id)
    if scheme:
        raise AuthenticationError(
            "Use Authorization: TargetToken <token> or GatewayToken <token>.",
            code="authentication_failed",
        )
    return _by_certificate(request, controller_id)


def _by_certificate(request: HttpRequest, controller_id: str) -> Device:
    verdict = forwarded_header(request, "HTTP_X_SSL_CLIENT_VERIFY")
    pem = forwarded_header(request, "HTTP_X_SSL_CLIENT_CERT")
    if verdict != "SUCCESS" or not pem:
        raise AuthenticationError(
            "Send Authorization: TargetToken <token> or GatewayToken <token>, or connect with a "
            "device certificate.",
            code="credentials_missing",
        )
    device = authenticate_certificate(pem)
    if controller_id not in (device.hardware_id, str(device.id)):
        raise AuthenticationError(
            "The client certificate belongs to another device.", code="certificate_invalid"
        )
    return ddi.by_trusted_identity(device.hardware_id)
