"""Who may call what: three roles for people and API keys, and devices that see only themselves.

- **viewer** reads everything except secrets;
- **operator** also uploads and publishes firmware, creates and controls rollouts and manages
  devices and groups;
- **admin** also manages users, API keys, signing keys, the device CA and enrollment tokens, and
  deletes.

A person's role is the highest of the Django groups ``viewer``, ``operator`` and ``admin`` they
belong to (a superuser is an admin); an API key carries the role it was created with. The same
``role_of`` decides in the API, the console and the Django admin (where the groups' model
permissions, kept in step by ``ota_site.roles``, decide), so the three never disagree.

Devices authenticate with a bearer JWT (``ota_site.auth``), are represented by a
``DeviceIdentity`` and have no role: they reach only the device endpoints, and only their own
records there.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from ota_site.auth import DeviceIdentity
from ota_site.errors import NotAllowed


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Role:
        try:
            return cls[label.upper()]
        except KeyError as exc:
            raise ValueError(f"unknown role {label!r} (viewer, operator or admin)") from exc


ROLE_GROUPS = {role.label: role for role in Role}


def role_of(user: Any) -> Role | None:
    """The role of a person or an API key; None for devices, anonymous and inactive users."""
    if user is None or isinstance(user, DeviceIdentity):
        return None
    if not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return None
    explicit = getattr(user, "ota_role", None)  # API keys carry their role
    if isinstance(explicit, Role):
        return explicit
    if getattr(user, "is_superuser", False):
        return Role.ADMIN
    if hasattr(user, "_ota_role_cache"):
        cached: Role | None = user._ota_role_cache
        return cached
    role: Role | None = None
    groups = getattr(user, "groups", None)
    if groups is not None:
        names = groups.filter(name__in=list(ROLE_GROUPS)).values_list("name", flat=True)
        found = [ROLE_GROUPS[name] for name in names]
        role = max(found) if found else None
    with contextlib.suppress(AttributeError):  # a user object that refuses attributes
        user._ota_role_cache = role
    return role


def has_role(user: Any, needed: Role) -> bool:
    role = role_of(user)
    return role is not None and role >= needed


def is_device(request: Request) -> bool:
    return isinstance(request.user, DeviceIdentity)


def is_operator(request: Request) -> bool:
    return has_role(request.user, Role.OPERATOR)


class HasRole(BasePermission):
    """At least ``role``; subclasses name the role."""

    role = Role.ADMIN

    @property
    def message(self) -> str:
        return f"This needs the {self.role.label} role."

    def has_permission(self, request: Request, view: Any) -> bool:
        return has_role(request.user, self.role)


class IsViewer(HasRole):
    role = Role.VIEWER


class IsOperator(HasRole):
    role = Role.OPERATOR


class IsAdmin(HasRole):
    role = Role.ADMIN


class RoleByMethod(BasePermission):
    """The default for the management API: viewers read, operators write, admins delete.

    A view may set ``write_role`` or ``delete_role`` to ask for more (e.g. admin-only writes).
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        method = (request.method or "").lower()
        if method not in getattr(view, "http_method_names", ()) or not hasattr(view, method):
            # The view will answer 405; anyone who may read learns that, rather than a 403 for
            # a method that does not exist.
            return has_role(request.user, Role.VIEWER)
        if request.method in SAFE_METHODS:
            needed = getattr(view, "read_role", Role.VIEWER)
        elif request.method == "DELETE":
            needed = getattr(view, "delete_role", Role.ADMIN)
        else:
            needed = getattr(view, "write_role", Role.OPERATOR)
        return has_role(request.user, needed)


class IsDevice(BasePermission):
    message = "This endpoint is for devices."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_device(request)


class IsDeviceOrViewer(BasePermission):
    """Devices (for their own records, checked by the view) and anyone who may read."""

    message = "This endpoint is for devices and signed-in users."

    def has_permission(self, request: Request, view: Any) -> bool:
        if is_device(request):
            return True
        if request.method in SAFE_METHODS:
            return has_role(request.user, Role.VIEWER)
        if request.method == "DELETE":
            return has_role(request.user, Role.ADMIN)
        return has_role(request.user, Role.OPERATOR)


# The former name: devices plus people allowed by RoleByMethod.
IsDeviceOrOperator = IsDeviceOrViewer


def check_own_device(request: Request, device_id: Any) -> None:
    """A device may act only on its own records (people may act on any their role allows)."""
    if isinstance(request.user, DeviceIdentity) and str(request.user.id) != str(device_id):
        raise NotAllowed("A device can only access its own records.", code="not_your_device")
