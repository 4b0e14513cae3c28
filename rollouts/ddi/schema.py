"""The DDI as this server speaks it, as an OpenAPI 3 document: ``GET /api/ddi/schema/``.

The DDI views are plain Django views (views.py says why), so drf-spectacular cannot describe
them; this document is written by hand from what the views answer. It is what integrators read
next to docs/ddi.md, and what schemathesis fuzzes the DDI against (tests/test_api_fuzz.py), so a
reply the document does not describe fails the suite.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from ota_site.errors import json_error
from ota_site.schema import ERROR_SCHEMA
from rollouts.ddi.auth import MAX_CONTROLLER_ID
from rollouts.ddi.feedback import EXECUTIONS, FINISHED_RESULTS

HAL = "application/hal+json"
ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _retry(description: str) -> dict[str, Any]:
    answer = _error(description)
    answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return answer


# What any DDI request can be answered with besides its success (rollouts/ddi/views.py ddi_view,
# ota_site.errors, the rate limiter and the body-size middleware).
COMMON = {
    "400": _error("A malformed request (for example a Content-Length that is not a number)."),
    "401": _error("No credentials, or credentials that are not valid for this controller id."),
    "404": _error(
        "Another tenant (tenant_not_found), an unknown or invalid controller id "
        "(device_not_found), or no such action or artifact for this device."
    ),
    "405": _error("A method this resource does not take; Allow names the ones it does."),
    "429": _retry("Rate limited: retry after Retry-After seconds."),
    "503": _retry("The database is away for a moment: retry after Retry-After seconds."),
}
WITH_BODY = {
    "400": _error("The body cannot be understood (not JSON, or without its required fields)."),
    "413": _error("The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE."),
}
EMPTY_OK = {"200": {"description": "Understood. No body, as hawkBit answers."}}


def _hal(schema: str, description: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"200": {"description": description, "content": {HAL: {"schema": ref}}}}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: tuple[str, ...] = (),
    body: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"$ref": f"#/components/parameters/{name}"} for name in parameters],
        "responses": {**COMMON, **(WITH_BODY if body else {}), **responses},
    }
    if body is not None:
        ref = {"$ref": f"#/components/schemas/{body}"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
    return operation


def _path_parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _link() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"href": {"type": "string"}},
        "required": ["href"],
    }


def _components(tenant: str) -> dict[str, Any]:
    links = {"type": "object", "additionalProperties": _link()}
    hashes = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in ("sha1", "md5", "sha256")},
        "required": ["sha1", "md5", "sha256"],
    }
    artifact = {
        "type": "object",
        "properties": {
            "filename": {"type": "string"},
            "hashes": hashes,
            "size": {"type": "integer", "minimum": 0},
            "_links": links,
        },
        "required": ["filename", "hashes", "size", "_links"],
    }
    chunk = {
        "type": "object",
        "properties": {
            "part": {"type": "string"},
            "version": {"type": "string"},
            "name": {"type": "string"},
            "artifacts": {"type": "array", "items": artifact},
        },
        "required": ["part", "version", "name", "artifacts"],
    }
    status = {
        "type": "object",
        "properties": {
            "execution": {"type": "string", "enum": sorted(EXECUTIONS)},
            "result": {
                "type": "object",
                "properties": {
                    "finished": {"type": "string", "enum": sorted(FINISHED_RESULTS)},
                    "progress": {
                        "type": "object",
                        "properties": {"cnt": {"type": "integer"}, "of": {"type": "integer"}},
                    },
                },
            },
            "details": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["execution"],
    }
    return {
        "securitySchemes": {
            "targetToken": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "'TargetToken <token>': the device's own token, or "
                "'GatewayToken <token>' (DDI_GATEWAY_TOKEN) for any device. Without either, "
                "a device certificate verified by the proxy.",
            },
        },
        "parameters": {
            "tenant": _path_parameter(
                "tenant",
                f"The server's one tenant, DDI_TENANT ({tenant!r} here), in any case.",
                {"type": "string", "example": tenant},
            ),
            "controllerId": _path_parameter(
                "controllerId",
                "The device's hardware_id.",
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_CONTROLLER_ID,
                    "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                },
            ),
            "actionId": _path_parameter(
                "actionId", "The update session's number.", {"type": "integer", "minimum": 0}
            ),
            "softwareModuleId": _path_parameter(
                "softwareModuleId", "The firmware's id.", {"type": "string", "format": "uuid"}
            ),
            "filename": _path_parameter(
                "filename",
                "The artifact's file name, or that name with .MD5SUM for its checksum line.",
                {"type": "string", "minLength": 1, "maxLength": 256},
            ),
        },
        "schemas": {
            "Error": ERROR_SCHEMA,
            "Poll": {
                "type": "object",
                "properties": {
                    "config": {
                        "type": "object",
                        "properties": {
                            "polling": {
                                "type": "object",
                                "properties": {
                                    "sleep": {
                                        "type": "string",
                                        "pattern": "^[0-9]{2}:[0-5][0-9]:[0-5][0-9]$",
                                    }
                                },
                                "required": ["sleep"],
                            }
                        },
                        "required": ["polling"],
                    },
                    "_links": {
                        "type": "object",
                        "properties": {
                            name: _link()
                            for name in (
                                "deploymentBase",
                                "cancelAction",
                                "configData",
                                "installedBase",
                            )
                        },
                        "additionalProperties": False,
                    },
                },
                "required": ["config"],
            },
            "Action": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "deployment": {
                        "type": "object",
                        "properties": {
                            "download": {"type": "string", "enum": ["skip", "attempt", "forced"]},
                            "update": {"type": "string", "enum": ["skip", "attempt", "forced"]},
                            "chunks": {"type": "array", "items": chunk},
                        },
                        "required": ["download", "update", "chunks"],
                    },
                },
                "required": ["id", "deployment"],
            },
            "CancelAction": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "cancelAction": {
                        "type": "object",
                        "properties": {"stopId": {"type": "string"}},
                        "required": ["stopId"],
                    },
                },
                "required": ["id", "cancelAction"],
            },
            "Feedback": {
                "type": "object",
                "description": "Read leniently, as clients in the field send it: unknown fields "
                "are ignored, and time or timestamp are optional.",
                "properties": {
                    "id": {"type": "string"},
                    "time": {"type": "string"},
                    "timestamp": {"type": "integer"},
                    "status": status,
                },
                "required": ["status"],
            },
            "ConfigData": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["merge", "replace", "remove"]},
                    "data": {
                        "type": "object",
                        "additionalProperties": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "number"},
                                {"type": "boolean"},
                            ],
                            "nullable": True,
                        },
                    },
                },
                "required": ["data"],
            },
        },
    }


def _artifact_operations() -> dict[str, Any]:
    headers = {
        name: {"schema": {"type": "string"}}
        for name in ("ETag", "Accept-Ranges", "Content-Disposition", "X-Checksum-Sha256")
    }
    whole = {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "text/plain": {"schema": {"type": "string"}},
    }
    downloads = {
        "200": {
            "description": "The image (or its MD5SUM line, as text).",
            "headers": headers,
            "content": whole,
        },
        "206": {
            "description": "The bytes of a satisfiable Range.",
            "headers": {"Content-Range": {"schema": {"type": "string"}}, **headers},
            "content": {"application/octet-stream": whole["application/octet-stream"]},
        },
        "302": {"description": "With S3 storage: a short-lived signed URL in Location."},
        "304": {"description": "If-None-Match named the current ETag."},
        "416": _error("A Range outside the file; Content-Range gives its size."),
    }
    parameters = ("tenant", "controllerId", "softwareModuleId", "filename")
    return {
        "get": _operation(
            "Download an offered artifact, with Range and If-Range",
            downloads,
            parameters=parameters,
        ),
        "head": _operation(
            "The artifact's headers",
            {
                "200": {"description": "The image's headers.", "headers": headers},
                "304": downloads["304"],
                "416": downloads["416"],
            },
            parameters=parameters,
        ),
    }


def document(tenant: str) -> dict[str, Any]:
    base = "/{tenant}/controller/v1/{controllerId}"
    target = ("tenant", "controllerId")
    action = (*target, "actionId")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "hawkBit DDI (Direct Device Integration), as this server speaks it",
            "version": "1",
            "description": "For devices running hawkBit clients (SWUpdate's suricatta, "
            "rauc-hawkbit-updater, Zephyr). The mapping to update sessions is in docs/ddi.md.",
        },
        "security": [{"targetToken": []}],
        "paths": {
            base: {
                "get": _operation(
                    "Poll: how long to sleep, and links to what to do",
                    _hal("Poll", "The poll."),
                    parameters=target,
                )
            },
            f"{base}/deploymentBase/{{actionId}}": {
                "get": _operation(
                    "The action: one chunk with one artifact",
                    _hal("Action", "The action."),
                    parameters=action,
                )
            },
            f"{base}/deploymentBase/{{actionId}}/feedback": {
                "post": _operation(
                    "Progress and result of an action (repeats are understood too)",
                    EMPTY_OK,
                    parameters=action,
                    body="Feedback",
                )
            },
            f"{base}/installedBase/{{actionId}}": {
                "get": _operation(
                    "The action that installed", _hal("Action", "The action."), parameters=action
                )
            },
            f"{base}/cancelAction/{{actionId}}": {
                "get": _operation(
                    "A cancellation waiting for the device's confirmation",
                    _hal("CancelAction", "The cancellation."),
                    parameters=action,
                )
            },
            f"{base}/cancelAction/{{actionId}}/feedback": {
                "post": _operation(
                    "The device confirms (closed, canceled) or refuses (rejected) a cancel",
                    EMPTY_OK,
                    parameters=action,
                    body="Feedback",
                )
            },
            f"{base}/configData": {
                "put": _operation(
                    "The device's attributes, into its metadata",
                    EMPTY_OK,
                    parameters=target,
                    body="ConfigData",
                )
            },
            f"{base}/softwaremodules/{{softwareModuleId}}/artifacts/{{filename}}": (
                _artifact_operations()
            ),
        },
        "components": _components(tenant),
    }


def schema_view(request: HttpRequest) -> JsonResponse:
    if request.method not in ("GET", "HEAD"):
        refusal = json_error(405, "method_not_allowed", "Use GET here.")
        refusal["Allow"] = "GET, HEAD"
        return refusal
    return JsonResponse(document(settings.DDI_TENANT), json_dumps_params={"indent": 1})
