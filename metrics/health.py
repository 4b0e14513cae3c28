"""Health endpoints for load balancers, orchestrators and monitoring (docs/observability.md).

``GET /health`` is liveness: the process answers, nothing else is asked, so a database outage
never gets healthy web processes restarted. ``GET /health/ready`` is readiness: the database,
Redis (when REDIS_URL is set), the firmware storage and a recent Celery worker heartbeat, each
with its time. Every check runs in a thread with a deadline (HEALTH_CHECK_TIMEOUT), so a
black-holed dependency makes the answer a 503, never a hang or a 500. ``?check=database,redis``
runs only the checks named. Neither endpoint needs credentials or is rate limited; neither says
more than which check failed and the exception's class (details go to the log).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.storage import storages
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from ota_site.errors import json_error
from ota_site.observability import worker_heartbeat_age

logger = logging.getLogger(__name__)


class CheckFailed(Exception):
    """A dependency answered, but not as it should; the message is safe to show."""


@never_cache
@require_safe
def health(request: HttpRequest) -> JsonResponse:
    """Liveness: 200 whenever this process can answer."""
    return JsonResponse({"status": "ok"})


# --- Readiness ---------------------------------------------------------------------------------


def check_database() -> dict[str, Any]:
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        # The check runs in a pool thread: give its connection back (to the pool, or closed).
        connections.close_all()
    return {}


_redis_clients: dict[tuple[str, float], Any] = {}


def check_redis() -> dict[str, Any]:
    """PING, on a client of its own with the check's deadline as socket timeouts (the cache's
    client would retry)."""
    import redis

    key = (settings.REDIS_URL, settings.HEALTH_CHECK_TIMEOUT)
    client = _redis_clients.get(key)
    if client is None:
        client = _redis_clients[key] = redis.Redis.from_url(
            key[0], socket_connect_timeout=key[1], socket_timeout=key[1]
        )
    if not client.ping():
        raise CheckFailed("PING was not answered with PONG")
    return {}


def check_storage() -> dict[str, Any]:
    """The firmware storage can be used: the S3 bucket exists and these credentials may read
    it (HEAD bucket), or the local folder (or, before the first upload, the folder it will be
    created in) is writable."""
    storage: Any = storages["default"]
    bucket_name = getattr(storage, "bucket_name", None)
    if bucket_name:
        storage.connection.meta.client.head_bucket(Bucket=bucket_name)
        return {"backend": "s3"}
    location = Path(storage.location)
    while not location.exists() and location.parent != location:
        location = location.parent
    if not location.is_dir() or not os.access(location, os.W_OK | os.X_OK):
        raise CheckFailed(f"{location} is not a writable folder")
    return {"backend": "local"}


def check_worker() -> dict[str, Any]:
    age = worker_heartbeat_age()
    if age is None:
        raise CheckFailed("no worker heartbeat yet")
    if age > settings.WORKER_HEARTBEAT_MAX_AGE:
        raise CheckFailed(f"last heartbeat {age:.0f} s ago")
    return {"age": round(age, 1)}


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "database": check_database,
    "redis": check_redis,
    "storage": check_storage,
    "worker": check_worker,
}
# Checks stuck past their deadline keep their thread until they end; a few threads suffice.
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # made on first use: after gunicorn forked this worker
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ota-ready")
    return _pool


def _timed(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    details = check()
    return {"ok": True, "ms": round((time.perf_counter() - start) * 1000, 2), **details}


def run_checks(names: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named checks at once, each with HEALTH_CHECK_TIMEOUT; their results by name."""
    deadline = time.monotonic() + settings.HEALTH_CHECK_TIMEOUT
    futures = {name: _executor().submit(_timed, CHECKS[name]) for name in names}
    results: dict[str, dict[str, Any]] = {}
    for name, future in futures.items():
        try:
            results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            logger.warning("ready: %s check timed out", name)
            results[name] = {"ok": False, "error": "timeout"}
        except CheckFailed as exc:
            logger.warning("ready: %s: %s", name, exc)
            results[name] = {"ok": False, "error": str(exc)}
        except Exception as exc:
            logger.warning("ready: %s check failed: %r", name, exc)
            results[name] = {"ok": False, "error": type(exc).__name__}
    return results


def configured_checks() -> list[str]:
    return [name for name in CHECKS if name != "redis" or settings.REDIS_URL]


@never_cache
@require_safe
def ready(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 when every check passes, else 503 with Retry-After; the body lists every
    check either way."""
    names = configured_checks()
    wanted = [n.strip() for n in ",".join(request.GET.getlist("check")).split(",") if n.strip()]
    if wanted:
        unknown = sorted(set(wanted) - set(CHECKS))
        if unknown:
            return json_error(
                400, "invalid_check", f"Unknown check {unknown}; known: {sorted(CHECKS)}."
            )
        names = [name for name in names if name in wanted]
    checks = run_checks(names)
    healthy = all(result["ok"] for result in checks.values())
    response = JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
    )
    if not healthy:
        response["Retry-After"] = "5"
    return response
