"""The server's URLs plus ``/bench/noop`` (tests/bench/bench_http.py)."""

from django.http import HttpRequest, HttpResponse
from django.urls import path

from ota_site.urls import handler404, handler500
from ota_site.urls import urlpatterns as server_urls

__all__ = ["handler404", "handler500", "urlpatterns"]


def noop(request: HttpRequest) -> HttpResponse:
    """Nothing but Django's request cycle and our middleware."""
    return HttpResponse(b'{"ok": true}', content_type="application/json")


urlpatterns = [path("bench/noop", noop), *server_urls]
