"""OpenAPI description of our authentication, so /api/schema/ documents the device bearer token
and API keys."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class DeviceJWTScheme(OpenApiAuthenticationExtension):
    target_class = "ota_site.auth.DeviceJWTAuthentication"
    name = "deviceToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A device access token from POST /api/v1/devices/token.",
        }


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "ota_site.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "'ApiKey ota_<prefix>_<secret>' (or the token alone in X-API-Key); "
            "create keys with POST /api/v1/api-keys or manage.py apikey create.",
        }
