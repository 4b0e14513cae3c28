"""One machine-readable error shape for the whole API.

Every 4xx/5xx answer of /api/ is JSON: ``{"code": "...", "detail": "...", "errors": {...}}``.
``code`` is stable and meant for programs; ``detail`` is for people; ``errors`` is present on
validation failures and maps each field to its messages.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response


class ServiceError(Exception):
    """A refusal by a service (services.py), with the API status and code it maps to.

    Services raise it so that API views, console views, admin actions and manage.py commands all
    refuse the same things with the same words.
    """

    status_code: int = status.HTTP_400_BAD_REQUEST
    code = "invalid"

    def __init__(self, detail: str, *, code: str | None = None, status_code: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code


class NotAllowed(ServiceError):
    status_code: int = status.HTTP_403_FORBIDDEN
    code = "forbidden"


class StateConflict(ServiceError):
    status_code: int = status.HTTP_409_CONFLICT
    code = "conflict"


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "payload_too_large"


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The service is temporarily unavailable; retry later."
    default_code = "unavailable"


def _code_of(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    if isinstance(codes, str):
        return codes
    return exc.default_code if isinstance(exc.default_code, str) else "error"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ServiceError):
        api_exc = exceptions.APIException(exc.detail, code=exc.code)
        api_exc.status_code = exc.status_code
        exc = api_exc
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, TooManyFieldsSent):
        exc = exceptions.ParseError("Too many form fields.", code="too_many_fields")
    elif isinstance(exc, SuspiciousOperation):
        exc = exceptions.ParseError("The request was malformed.", code="malformed_request")

    # Imported here: rest_framework.views imports the permission classes, which import this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response

    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = {"code": "invalid", "detail": "The request is not valid.", "errors": errors}
    else:
        detail = exc.detail
        response.data = {"code": _code_of(exc), "detail": str(detail)}
    return response


def json_error(status_code: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"code": code, "detail": detail}, status=status_code)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """JSON under /api/ (and for devices, wherever they ask); Django's page elsewhere."""
    if _is_machine_path(request):
        return json_error(404, "not_found", "Not found.")
    return defaults.page_not_found(request, exception or Http404())


# Seconds a client is asked to wait when the database is away (a restart, a failover).
DATABASE_RETRY_AFTER = 5


def database_unavailable(exc: BaseException | None) -> bool:
    """The database could not be reached or dropped the connection: a fault of the moment, not
    of the request. Django raises OperationalError for a refused or broken connection (and for a
    pool with no connection to give), InterfaceError for a connection already closed."""
    return isinstance(exc, OperationalError | InterfaceError)


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's handler500, called while the exception is being handled.

    A database that is away is answered with 503 and Retry-After rather than 500: the client
    should simply come back (devices do), and Django replaces the broken connection before the
    next request. The error is still logged with its traceback, never shown to the client.
    """
    if database_unavailable(sys.exception()):
        response: HttpResponse
        if _is_machine_path(request):
            response = json_error(
                503, "unavailable", "The service is temporarily unavailable; retry later."
            )
        else:
            response = HttpResponse(
                "The service is temporarily unavailable; retry in a few seconds.",
                status=503,
                content_type="text/plain; charset=utf-8",
            )
        response["Retry-After"] = str(DATABASE_RETRY_AFTER)
        return response
    if _is_machine_path(request):
        return json_error(500, "server_error", "Internal server error.")
    return defaults.server_error(request)


def _is_machine_path(request: HttpRequest) -> bool:
    return request.path.startswith("/api/") or "/controller/v1/" in request.path
