"""OpenAPI additions: our authentication (the device bearer token, API keys), and the error
answers every operation can give, so /api/schema/ describes what clients actually receive."""

from __future__ import annotations

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


# --- Error answers --------------------------------------------------------------------------------
# Every /api/ error has one shape (ota_site.errors); the views only declare their successes, so
# this hook adds the errors each operation can answer, which keeps the schema true for clients
# and for schemathesis (tests/test_api_fuzz.py).

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every 4xx and 5xx answer of /api/: a stable code for programs, a detail for "
    "people, and, on validation failures, the messages of each field.",
    "properties": {
        "code": {"type": "string", "example": "invalid"},
        "detail": {"type": "string"},
        "errors": {
            "type": "object",
            "additionalProperties": True,
            "description": "Field name -> its messages (validation failures only).",
        },
        "retry_after": {
            "type": "integer",
            "description": "Seconds to wait (429 only; also in the Retry-After header).",
        },
    },
    "required": ["code", "detail"],
}

# status -> (when, for which operations: "all", "body" with a request body, "write" not GET).
ERRORS = {
    "400": ("The request is not valid (fields, parameters or JSON).", "all"),
    "401": ("No credentials, or credentials that are not valid (a code says which).", "all"),
    "403": ("These credentials may not do this.", "all"),
    "404": ("No such object, or not one these credentials may see.", "all"),
    "409": ("The request conflicts with the object's current state.", "write"),
    "413": ("The request body is too large.", "body"),
    "415": ("The request body is not of a media type this operation accepts.", "body"),
    "429": ("Rate limited: retry after Retry-After seconds.", "all"),
    "503": ("The database is away for a moment: retry after Retry-After seconds.", "all"),
}
# Refused by the web server (gunicorn, nginx) before the application sees the request, in their
# own format.
SERVER_ERRORS = {
    "414": "The URL (with its query) is too long for the web server.",
}


def add_error_responses(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"])."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = operation.setdefault("responses", {})
            for status, (description, scope) in ERRORS.items():
                if scope == "write" and method == "get":
                    continue
                if scope == "body" and "requestBody" not in operation:
                    continue
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": reference}},
                    },
                )
            for status, description in SERVER_ERRORS.items():
                responses.setdefault(status, {"description": description})
    return result
