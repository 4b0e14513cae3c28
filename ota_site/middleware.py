"""Refuse oversized request bodies before anything reads them; bind the request context."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from ota_site.context import bound, context_of
from ota_site.errors import json_error


class BodySizeLimitMiddleware:
    """413 for a non-multipart body over DATA_UPLOAD_MAX_MEMORY_SIZE, judged by Content-Length.

    DRF's JSON parser reads the whole body into memory and Django's own limit only guards
    ``request.body`` and form parsing, so without this a client could post gigabytes of JSON.
    Multipart uploads are streamed to disk and limited by the firmware view instead.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and not (request.content_type or "").startswith("multipart/"):
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return json_error(400, "malformed_request", "Content-Length is not a number.")
            if length > limit:
                return json_error(
                    413, "payload_too_large", f"The request body may be at most {limit} bytes."
                )
        return self.get_response(request)


class RequestContextMiddleware:
    """Bind the client address and a request id for the audit log (``ota_site.context``).

    The id is also sent back as ``X-Request-ID`` so that a support case can name the request, and
    the audit rows of that request can be found by it.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        context = context_of(request)
        with bound(context):
            response = self.get_response(request)
        response.headers.setdefault("X-Request-ID", context.request_id)
        return response
