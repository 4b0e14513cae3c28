"""What the code records for Prometheus, the per-request metrics and access log, and the worker
heartbeat (docs/observability.md).

The lowest layer, so every app may record: ``count_update_check`` wraps the device polls of
rollouts (our API and hawkBit DDI), ``RequestMetricsMiddleware`` times every request, and the
Celery hooks count task outcomes. ``metrics/prometheus.py`` serves all of it on ``/metrics``
together with the figures it reads from the database at scrape time.

Every process of one machine writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode), so whichever gunicorn worker answers a scrape reports the
sum over all of them. The library requires that folder to be emptied between two runs of the
server; ``_clear_stale_files`` does it when a process starts and finds only files of processes
that are gone, so no gunicorn hook or start script is needed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.urls import Resolver404, resolve

from ota_site import cache
from ota_site.context import current


def _clear_stale_files(folder: Path) -> None:
    """Empty ``folder`` when every process that wrote to it is gone (a new run of the server).

    Files are named ``<kind>_<pid>.db``. While any writer lives, the files of dead ones stay: a
    recycled worker's counts must keep adding up, or the totals would go down. A lock makes the
    look-and-delete atomic between processes starting together.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = list(folder.glob("*.db"))
        pids = {int(m.group(1)) for f in files if (m := re.search(r"_(\d+)\.db$", f.name))}
        if files and not any(_alive(pid) for pid in pids - {os.getpid()}):
            for path in files:
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


MULTIPROC_DIR = Path(settings.PROMETHEUS_MULTIPROC_DIR)
_clear_stale_files(MULTIPROC_DIR)

from prometheus_client import Counter, Histogram, values  # noqa: E402

# prometheus_client picks in-process or file-backed values when it is first imported, from the
# environment (which the settings set). Should anything have imported it before the settings
# loaded, switch now: every metric below must live in the files.
if not getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue()

# --- Metrics recorded by the code --------------------------------------------------------------
# Buckets around the SLO (p95 < 500 ms): 0.5 must be a bucket edge for the alert to be exact.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_DURATION = Histogram(
    "ota_http_request_duration_seconds",
    "Time to answer an HTTP request, by URL pattern (route name), method and status class.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
UPDATE_CHECKS = Counter(
    "ota_update_checks",
    "Device update checks by protocol (api, ddi) and result (offered, none, error).",
    ["protocol", "result"],
)
ANSWER_CACHE = Counter(
    "ota_poll_answer_cache",
    "The poll answer cache (ota_site.answers): answers served from it (hit), answers stored in "
    "it (stored), and answers not stored because something changed since the lookup (refused).",
    ["result"],
)
CELERY_TASKS = Counter(
    "ota_celery_tasks",
    "Celery task outcomes by task name and state (success, failure, retry).",
    ["task", "state"],
)

# --- Update checks -----------------------------------------------------------------------------


class _Offer(Protocol):
    @property
    def firmware(self) -> Any: ...


P = ParamSpec("P")
OfferT = TypeVar("OfferT", bound=_Offer)


def count_update_check(
    protocol: str, check: Callable[P, OfferT], *args: P.args, **kwargs: P.kwargs
) -> OfferT:
    """Run ``check(*args, **kwargs)`` (``rollouts.poll.check_for_update``) and count its result:
    ``offered`` when it offers firmware, ``none`` when not, ``error`` when it raised (a refusal
    such as a reset credential, or a fault)."""
    try:
        offer = check(*args, **kwargs)
    except Exception:
        UPDATE_CHECKS.labels(protocol, "error").inc()
        raise
    UPDATE_CHECKS.labels(protocol, "none" if offer.firmware is None else "offered").inc()
    return offer


# --- Requests ----------------------------------------------------------------------------------
# A client may send any method name; only these become label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")
# Probes and scrapes come every few seconds; their lines would drown the log unless they fail.
QUIET_ROUTES = frozenset({"health", "health-ready", "prometheus-metrics"})
access_logger = logging.getLogger("ota.access")


def route_of(request: HttpRequest) -> str:
    """The URL pattern's name (``device-updates``, ``ddi:poll``; for an unnamed pattern, its
    view's dotted path): never the raw path, so the label's values stay few whatever clients ask
    for."""
    cached = getattr(request, "ota_route", None)
    if cached is not None:  # an answer from the poll answer cache (ota_site.answers)
        return str(cached)
    match = getattr(request, "resolver_match", None)
    if match is None:
        # Answered before URL resolution (a rate limit, an oversized body, a static file): resolve
        # now, which only these requests pay for.
        if request.path_info.startswith(settings.STATIC_URL):
            return "static"
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "unmatched"
    return match.view_name or match.route or "unmatched"


class RequestMetricsMiddleware:
    """Times each request into ``ota_http_request_duration_seconds`` and writes one access-log
    line (``ota.access``) with the request id, which gunicorn's own access log cannot carry.

    Sits right after ``RequestContextMiddleware``, so the request id is bound and everything after
    it (rate limits, body limits, the view) is inside the measured time. The label children are
    looked up once per combination and kept, which keeps the cost to a few microseconds.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.access_log = settings.ACCESS_LOG
        self._children: dict[tuple[str, str, str], Any] = {}

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        start = time.perf_counter()
        response = self.get_response(request)
        elapsed = time.perf_counter() - start
        route = route_of(request)
        method = request.method if request.method in METHODS else "other"
        status = response.status_code
        key = (route, method, STATUS_CLASSES[min(status // 100, 5)])
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = REQUEST_DURATION.labels(*key)
        child.observe(elapsed)
        if (
            self.access_log
            and (route not in QUIET_ROUTES or status >= 500)
            and access_logger.isEnabledFor(logging.INFO)
        ):
            self._log(request, route, status, elapsed)
        return response

    @staticmethod
    def _log(request: HttpRequest, route: str, status: int, elapsed: float) -> None:
        context = current()
        duration_ms = round(elapsed * 1000, 2)
        access_logger.info(
            "%s %s %s %.2fms",
            request.method,
            request.path,
            status,
            duration_ms,
            extra={
                "method": request.method,
                "path": request.path,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "client_ip": context.ip if context else None,
            },
        )


# --- Worker heartbeat --------------------------------------------------------------------------
HEARTBEAT_KEY = "worker-heartbeat"


def record_worker_heartbeat() -> None:
    """A worker is alive and taking tasks: the beat task ``ota_site.tasks.worker_heartbeat`` and
    each worker's start write the time to the cache (Redis, or the embedded file cache)."""
    cache.set(HEARTBEAT_KEY, time.time(), 24 * 3600)


def worker_heartbeat_age() -> float | None:
    """Seconds since a worker last wrote its heartbeat; None when none ever did (or the cache
    cannot be read)."""
    stamp = cache.get(HEARTBEAT_KEY)
    if not isinstance(stamp, int | float):
        return None
    return max(0.0, time.time() - float(stamp))


# --- Celery ------------------------------------------------------------------------------------


def serve_worker_metrics(addr: str, port: int) -> None:
    """Serve this machine's metric files over HTTP from the worker (a thread in its main process):
    for a worker that does not share PROMETHEUS_MULTIPROC_DIR with a web process."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)


def connect_celery(app: Any) -> None:
    """Count task outcomes and write the first heartbeat in the worker; with
    ``WORKER_METRICS_PORT`` serve the worker's metrics; with ``LOG_FORMAT=json`` keep Celery from
    replacing the JSON log configuration with its own."""
    from celery import signals

    def outcome(state: str) -> Callable[..., None]:
        def receiver(sender: Any = None, **kwargs: Any) -> None:
            CELERY_TASKS.labels(getattr(sender, "name", None) or "unknown", state).inc()

        return receiver

    for signal, state in (
        (signals.task_success, "success"),
        (signals.task_failure, "failure"),
        (signals.task_retry, "retry"),
    ):
        signal.connect(outcome(state), weak=False, dispatch_uid=f"ota.tasks.{state}")

    def worker_ready(**kwargs: Any) -> None:
        record_worker_heartbeat()
        if settings.WORKER_METRICS_PORT:
            serve_worker_metrics(settings.WORKER_METRICS_ADDR, settings.WORKER_METRICS_PORT)

    signals.worker_ready.connect(worker_ready, weak=False, dispatch_uid="ota.worker_ready")
    if settings.LOG_FORMAT == "json":

        def setup_logging(**kwargs: Any) -> None:
            # Connecting this signal is how Celery is told not to configure logging: Django's
            # LOGGING (ota_site.logging) already did.
            pass

        signals.setup_logging.connect(setup_logging, weak=False, dispatch_uid="ota.logging")
