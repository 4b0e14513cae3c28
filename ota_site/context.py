"""Who is asking, from where: the request context that the audit log reads.

``ota_site.middleware.RequestContextMiddleware`` sets it for each HTTP request; services never
take the request as an argument, so ``record_event`` reads the client address and the request id
from here. Celery tasks and manage.py commands run without one (``current()`` is None) and their
events carry no address.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ota_site.proxies import client_ip, forwarded_header

# A request id from our proxy is kept only if it looks like one (it ends up in logs and rows).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class RequestContext:
    ip: str | None
    request_id: str


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "ota_request_context", default=None
)


def current() -> RequestContext | None:
    return _current.get()


def context_of(request: Any) -> RequestContext:
    """The client address (via trusted proxies only) and a request id: the proxy's
    ``X-Request-ID`` when a trusted proxy sent a sane one, else a new one."""
    ip: str | None = client_ip(request)
    try:
        ip = str(ipaddress.ip_address(ip or ""))
    except ValueError:  # a unix socket or a test server: no address to record (inet column)
        ip = None
    offered = forwarded_header(request, "HTTP_X_REQUEST_ID") or ""
    request_id = offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex
    return RequestContext(ip=ip, request_id=request_id)


@contextmanager
def bound(context: RequestContext | None) -> Iterator[RequestContext | None]:
    """Make ``context`` current for the duration of the block (the middleware, and tests)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
