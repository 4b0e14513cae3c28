"""How API callers authenticate: devices with short-lived JWTs, automation with API keys.

A device trades its secret (``POST /api/v1/devices/token``) for a token that names the device, its
type and its credential generation; every later call presents it as ``Authorization: Bearer``.
Tokens live ``DEVICE_JWT_LIFETIME`` seconds (15 minutes by default), which bounds how long a
revoked device keeps access. HS256 tokens are checked without a database hit.

CI pipelines send an API key (``ota_site.apikeys``) as ``Authorization: ApiKey <token>`` or
``X-API-Key: <token>``; people use the session (console, admin) or HTTP Basic.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from django.conf import settings
from rest_framework import exceptions
from rest_framework.authentication import (
    BaseAuthentication,
    BasicAuthentication,
    SessionAuthentication,
    get_authorization_header,
)
from rest_framework.request import Request

ISSUER = "ota-server"
AUDIENCE = "ota-device"
ALGORITHM = "HS256"


@dataclass(frozen=True)
class DeviceIdentity:
    """The authenticated device, as DRF's ``request.user``. Built from the token alone."""

    id: uuid.UUID
    device_type: str
    generation: int

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False

    @property
    def pk(self) -> uuid.UUID:
        return self.id

    def __str__(self) -> str:
        return f"device:{self.id}"


def issue_device_token(device_id: uuid.UUID, device_type: str, generation: int) -> tuple[str, int]:
    """Return (token, lifetime in seconds)."""
    now = int(time.time())
    lifetime = settings.DEVICE_JWT_LIFETIME
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(device_id),
        "typ": device_type,
        "gen": generation,
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode(claims, settings.DEVICE_JWT_SECRET, algorithm=ALGORITHM), lifetime


def decode_device_token(token: str) -> DeviceIdentity:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.DEVICE_JWT_SECRET,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
        return DeviceIdentity(
            id=uuid.UUID(str(claims["sub"])),
            device_type=str(claims.get("typ", "")),
            generation=int(claims.get("gen", 0)),
        )
    except jwt.ExpiredSignatureError as exc:
        raise exceptions.AuthenticationFailed(
            "The access token has expired.", code="token_expired"
        ) from exc
    except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
        raise exceptions.AuthenticationFailed(
            "The access token is not valid.", code="token_invalid"
        ) from exc


class DeviceJWTAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[DeviceIdentity, str] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "The Authorization header must be 'Bearer <token>'.", code="token_invalid"
            )
        try:
            token = parts[1].decode("ascii")
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed(
                "The access token is not valid.", code="token_invalid"
            ) from exc
        # The rate limiter (ota_site.ratelimit) may have decoded this very token already.
        decoded = getattr(request._request, "ota_device_token", None)
        if decoded is not None and decoded[0] == token:
            return decoded[1], token
        return decode_device_token(token), token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="devices"'


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: ApiKey <token>`` or ``X-API-Key: <token>``; the key's role decides.

    A key that is unknown, expired or revoked is refused with 401 and a code
    (``api_key_invalid``, ``api_key_expired``, ``api_key_revoked``) rather than being ignored, so a
    pipeline learns why. Keys need no CSRF token: no browser sends them on its own.
    """

    keyword = b"apikey"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = get_authorization_header(request).split()
        if parts and parts[0].lower() == self.keyword:
            if len(parts) != 2:
                raise exceptions.AuthenticationFailed(
                    "The Authorization header must be 'ApiKey <token>'.", code="api_key_invalid"
                )
            raw: bytes | str = parts[1]
        else:
            raw = request.META.get("HTTP_X_API_KEY", "")
            if not raw:
                return None
        try:
            token = raw.decode("ascii") if isinstance(raw, bytes) else raw.encode("ascii").decode()
        except (UnicodeDecodeError, UnicodeEncodeError) as exc:
            raise exceptions.AuthenticationFailed(
                "The API key is not valid.", code="api_key_invalid"
            ) from exc

        # Imported here: apikeys needs the models, and this module is loaded with the settings.
        from ota_site import apikeys, context

        bound = context.current()
        ip = bound.ip if bound is not None else context.context_of(request).ip
        try:
            user = apikeys.authenticate(token.strip(), ip=ip)
        except apikeys.ApiKeyError as exc:
            raise exceptions.AuthenticationFailed(exc.detail, code=exc.code) from exc
        return user, token

    def authenticate_header(self, request: Request) -> str:
        return 'ApiKey realm="api"'


# Endpoints that both devices and people call (a device's own record, downloads, public keys).
DEVICE_OR_OPERATOR_AUTH: list[type[BaseAuthentication]] = [
    DeviceJWTAuthentication,
    ApiKeyAuthentication,
    SessionAuthentication,
    BasicAuthentication,
]
