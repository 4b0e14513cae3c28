"""Who may call what.

Devices authenticate with a bearer JWT (``ota_site.auth``) and are represented by a
``DeviceIdentity``; people authenticate with Django sessions (or HTTP basic auth for scripts).
Until roles land (security issue), every staff user is an operator and other users are refused.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from ota_site.auth import DeviceIdentity
from ota_site.errors import NotAllowed


def is_device(request: Request) -> bool:
    return isinstance(request.user, DeviceIdentity)


def is_operator(request: Request) -> bool:
    user = request.user
    return (
        user is not None
        and not isinstance(user, DeviceIdentity)
        and bool(user.is_authenticated and user.is_active and user.is_staff)
    )


class IsOperator(BasePermission):
    message = "This endpoint is for operators."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_operator(request)


class IsDevice(BasePermission):
    message = "This endpoint is for devices."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_device(request)


class IsDeviceOrOperator(BasePermission):
    message = "This endpoint is for devices and operators."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_device(request) or is_operator(request)


def check_own_device(request: Request, device_id: Any) -> None:
    """A device may act only on its own records (operators may act on any)."""
    if isinstance(request.user, DeviceIdentity) and str(request.user.id) != str(device_id):
        raise NotAllowed("A device can only access its own records.", code="not_your_device")
