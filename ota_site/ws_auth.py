"""Who is on the other end of a WebSocket: the console session, an API key, or nobody we accept.

Browsers cannot set headers on a WebSocket, so the console authenticates with its session cookie
(Channels' ``AuthMiddlewareStack``). Other clients send ``Authorization: ApiKey <token>`` (or
``X-API-Key``), checked by the same ``ota_site.apikeys.authenticate`` as the HTTP API. A bearer
token is decoded so that a device is recognised as a device, and refused as one (4403) rather
than as a stranger (4401). An explicit credential that fails is never replaced by the session.

The result is ``scope["user"]`` (the session user, an ``ApiKeyUser``, a ``DeviceIdentity`` or an
anonymous user) and, when a credential was refused, ``scope["auth_error"]`` with its code. The
consumers decide (metrics.consumers): the role check needs the database, and a refusal is sent as
a close code, which only an accepted socket can carry.

Browsers send an ``Origin`` header with every WebSocket, and a session cookie rides along with
any page's request: a page on another site must not read our streams with our user's cookie
(cross-site WebSocket hijacking). ``StreamOriginValidator`` refuses such handshakes (HTTP 403)
unless the origin's host is one of ``ALLOWED_HOSTS`` (any port: the demo's pages and streams are
on two ports) or an origin in ``CSRF_TRUSTED_ORIGINS``. Clients that send no Origin are not
browsers and must bring an API key, which no browser would add to a cross-site request.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from rest_framework.exceptions import AuthenticationFailed

from ota_site import apikeys
from ota_site.auth import decode_device_token

ASGIApp = Any


def header(scope: dict[str, Any], name: bytes) -> str:
    """The first value of a request header ('' if absent or not Latin-1 text)."""
    for key, value in scope.get("headers", []):
        if key == name:
            try:
                return bytes(value).decode("latin1")
            except (UnicodeDecodeError, TypeError):
                return ""
    return ""


def _client_ip(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _api_key_user(token: str, ip: str | None) -> Any:
    return apikeys.authenticate(token, ip=ip)


class HeaderAuthMiddleware(BaseMiddleware):
    """``Authorization`` / ``X-API-Key`` credentials, which take precedence over the session."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        authorization = header(scope, b"authorization").strip()
        key = header(scope, b"x-api-key").strip()
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if authorization or key:
            scope = dict(scope)
            user: Any = AnonymousUser()
            error = ""
            if scheme.lower() == "apikey" or (not authorization and key):
                try:
                    user = await database_sync_to_async(_api_key_user)(
                        credential if authorization else key, _client_ip(scope)
                    )
                except apikeys.ApiKeyError as exc:
                    error = exc.code
            elif scheme.lower() == "bearer":
                try:
                    user = decode_device_token(credential)
                except AuthenticationFailed as exc:
                    codes = exc.get_codes()
                    error = codes if isinstance(codes, str) else "token_invalid"
            else:
                error = "unsupported_authorization"
            scope["user"] = user
            if error:
                scope["auth_error"] = error
        return await super().__call__(scope, receive, send)


class StreamOriginValidator(OriginValidator):
    """A browser's Origin must name one of our hosts; a missing Origin means "not a browser"."""

    def __init__(self, application: ASGIApp) -> None:
        super().__init__(application, [])

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)

    def validate_origin(self, parsed_origin: Any) -> bool:
        hosts = list(settings.ALLOWED_HOSTS)
        if parsed_origin.hostname and any(
            self.match_allowed_origin(parsed_origin, host) for host in hosts if host != "*"
        ):
            return True
        if "*" in hosts:
            return True
        origin = f"{parsed_origin.scheme}://{parsed_origin.netloc}".lower()
        trusted = [urlparse(o) for o in settings.CSRF_TRUSTED_ORIGINS]
        return any(f"{t.scheme}://{t.netloc}".lower() == origin for t in trusted)


def stream_stack(inner: ASGIApp) -> ASGIApp:
    """Origin check, then session, then header credentials, then ``inner`` (the URL router)."""
    return StreamOriginValidator(AuthMiddlewareStack(HeaderAuthMiddleware(inner)))
