"""OpenAPI description of our authentication, so /api/schema/ documents the device bearer token."""

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
