"""What every console page needs to know about the person looking at it."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest

from ota_site.permissions import Role, role_of


def console(request: HttpRequest) -> dict[str, Any]:
    """``role`` (viewer/operator/admin or None) and ``can_operate`` / ``can_admin``, so templates
    show each control only to the roles the API would let through."""
    role = role_of(getattr(request, "user", None))
    return {
        # Where the pages open their WebSocket streams: "" is this origin (nginx sends
        # /api/v1/stream/ to daphne); the embedded demo serves them on a second port.
        "stream_base": settings.CONSOLE_STREAM_URL,
        "role": role.label if role is not None else None,
        "can_operate": role is not None and role >= Role.OPERATOR,
        "can_admin": role is not None and role >= Role.ADMIN,
    }
