"""``GET /metrics``: Prometheus text format (docs/observability.md lists every metric).

Two sources. What the code records as it runs (request latency, update checks, Celery task
outcomes; ``ota_site.observability``) is read from every process's files in
PROMETHEUS_MULTIPROC_DIR. What the database knows (sessions and rollouts by status, the fleet by
version) is computed at scrape time by ``DatabaseCollector``: a few GROUP BY queries whose
results are kept in the cache for METRICS_CACHE_TIMEOUT seconds, so scrapes of every web process
at any fleet size cost one computation per interval. They read the read replica when one is
configured (``ota_site.db.analytics``).

Access: with METRICS_TOKEN set, only ``Authorization: Bearer <token>`` gets in; in any case the
reverse proxy should keep /metrics to the monitoring network (ota_site/deploy/nginx.conf).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, OuterRef, Subquery
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from devices.models import Device
from ota_site import cache
from ota_site.db import analytics
from ota_site.errors import json_error
from ota_site.models import Event, EventKind
from ota_site.observability import MULTIPROC_DIR, worker_heartbeat_age
from rollouts.models import Rollout, RolloutStatus, SessionStatus, UpdateSession

logger = logging.getLogger(__name__)

CACHE_KEY = "metrics:database"
# The fleet-by-version gauge keeps the largest (device type, version) groups; the rest are
# summed per device type as version="other", so versions that devices invent stay few series.
MAX_VERSION_SERIES = 100


def database_snapshot() -> dict[str, Any]:
    """The database's figures: one GROUP BY per table (sessions, rollouts, devices), one count of
    online devices, and who paused each paused rollout. Cached METRICS_CACHE_TIMEOUT seconds."""
    snapshot = cache.get(CACHE_KEY)
    if isinstance(snapshot, dict):
        return snapshot
    db = analytics()  # the read replica when one is configured
    sessions = dict(
        UpdateSession.objects.using(db)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    rollouts = dict(
        Rollout.objects.using(db)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    # Who paused each paused rollout, from its latest rollout.paused event: "system" is the
    # engine (a stage past its failure threshold without auto_rollback, or a start_at conflict);
    # anyone else is an operator (a user or an API key).
    last_pause = (
        Event.objects.filter(rollout_id=OuterRef("pk"), kind=EventKind.ROLLOUT_PAUSED)
        .order_by("-id")
        .values("actor")[:1]
    )
    pausers = (
        Rollout.objects.using(db)
        .filter(status=RolloutStatus.PAUSED)
        .annotate(pauser=Subquery(last_pause))
    )
    paused = {"engine": 0, "operator": 0}
    for pauser in pausers.values_list("pauser", flat=True):
        paused["engine" if pauser == "system" else "operator"] += 1
    versions = list(
        Device.objects.using(db)
        .order_by()
        .values_list("device_type", "current_version")
        .annotate(n=Count("id"))
        .order_by("-n", "device_type", "current_version")
    )
    since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
    snapshot = {
        "sessions": sessions,
        "rollouts": rollouts,
        "paused": paused,
        "versions": _capped(versions),
        "online": Device.objects.using(db).filter(last_seen__gte=since).count(),
    }
    cache.set(CACHE_KEY, snapshot, settings.METRICS_CACHE_TIMEOUT)
    return snapshot


def _capped(rows: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    kept = [(kind, version or "unknown", n) for kind, version, n in rows[:MAX_VERSION_SERIES]]
    other: dict[str, int] = {}
    for kind, _, n in rows[MAX_VERSION_SERIES:]:
        other[kind] = other.get(kind, 0) + n
    return kept + [(kind, "other", n) for kind, n in sorted(other.items())]


class DatabaseCollector(Collector):
    """Gauges from the database and the worker heartbeat, computed when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ota_database_metrics_up",
            "1 when the database figures below could be read, 0 when the database failed.",
        )
        try:
            snapshot = database_snapshot()
        except Exception:
            logger.warning("metrics: database figures unavailable", exc_info=True)
            snapshot = None
        up.add_metric([], 0 if snapshot is None else 1)
        yield up
        yield self._heartbeat()
        if snapshot is None:
            return
        sessions = GaugeMetricFamily(
            "ota_update_sessions", "Update sessions in the database by status.", labels=["status"]
        )
        for status in SessionStatus.values:
            sessions.add_metric([status], snapshot["sessions"].get(status, 0))
        yield sessions
        rollouts = GaugeMetricFamily("ota_rollouts", "Rollouts by status.", labels=["status"])
        for status in RolloutStatus.values:
            rollouts.add_metric([status], snapshot["rollouts"].get(status, 0))
        yield rollouts
        paused = GaugeMetricFamily(
            "ota_rollouts_paused",
            "Paused rollouts by who paused them: engine (its thresholds or a start conflict) or "
            "operator.",
            labels=["by"],
        )
        for by, n in sorted(snapshot["paused"].items()):
            paused.add_metric([by], n)
        yield paused
        fleet = GaugeMetricFamily(
            "ota_fleet_devices",
            "Devices by device type and the version they run (largest groups; the rest are "
            'version="other").',
            labels=["device_type", "version"],
        )
        for kind, version, n in snapshot["versions"]:
            fleet.add_metric([kind, version], n)
        yield fleet
        online = GaugeMetricFamily(
            "ota_fleet_devices_online", "Devices seen within DEVICE_ONLINE_WINDOW seconds."
        )
        online.add_metric([], snapshot["online"])
        yield online

    @staticmethod
    def _heartbeat() -> Metric:
        age = worker_heartbeat_age()
        gauge = GaugeMetricFamily(
            "ota_worker_heartbeat_age_seconds",
            "Seconds since a Celery worker last wrote its heartbeat (+Inf: never).",
        )
        gauge.add_metric([], float("inf") if age is None else age)
        return gauge


_registry: CollectorRegistry | None = None


def registry() -> CollectorRegistry:
    """Every process's recorded samples plus the database gauges (made once per process)."""
    global _registry
    if _registry is None:
        fresh = CollectorRegistry()
        MultiProcessCollector(fresh, path=str(MULTIPROC_DIR))
        fresh.register(DatabaseCollector())
        _registry = fresh
    return _registry


def _authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        offered.strip().encode(), token.encode()
    )


@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        refusal = json_error(401, "not_authenticated", "/metrics needs the METRICS_TOKEN.")
        refusal["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refusal
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
