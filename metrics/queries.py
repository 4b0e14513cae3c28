"""Fleet analytics for the console: aggregate SQL only, cached for a few seconds.

Every figure on the dashboard is a GROUP BY or a filtered COUNT over the devices or sessions table,
never a loop over rows, so its cost is a few scans whatever the fleet size (measured at 100 000
devices in docs/console.md). The dashboard is refreshed live by every open console, so the
aggregates are cached for DASHBOARD_CACHE_SECONDS: N consoles and a burst of device reports cost
one computation per interval, and a figure is at most that old. The fleet scans read the read
replica when one is configured (ota_site.db.analytics); the short index reads below (recent
events, a device's sessions) stay on the primary, so they show a change made a moment ago.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from devices.models import Device, DeviceStatus
from ota_site import cache
from ota_site.db import analytics
from ota_site.models import Event
from rollouts.evaluation import rollout_metrics
from rollouts.models import LIVE_ROLLOUT_STATUSES, Rollout, UpdateSession

DASHBOARD_CACHE_SECONDS = 5
TOP_VERSIONS = 10
RECENT_EVENTS = 20
ACTIVE_ROLLOUTS = 10
DEVICE_SESSIONS = 20


def fleet_summary() -> dict[str, Any]:
    """Fleet size, online/offline, status breakdown and the versions in the field (cached)."""
    summary: dict[str, Any] | object = cache.get("console:fleet-summary")
    if isinstance(summary, dict):
        return summary
    since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
    devices = Device.objects.using(analytics())
    # One scan for every count: filtered aggregates rather than a query per figure.
    counts = devices.aggregate(
        total=Count("id"),
        online=Count("id", filter=Q(last_seen__gte=since)),
        never_seen=Count("id", filter=Q(last_seen__isnull=True)),
        revoked=Count("id", filter=Q(revoked_at__isnull=False)),
        **{f"status_{s}": Count("id", filter=Q(status=s)) for s in DeviceStatus.values},
    )
    versions = list(
        devices.order_by()
        .values("device_type", "current_version")
        .annotate(n=Count("id"))
        .order_by("-n", "device_type", "current_version")[:TOP_VERSIONS]
    )
    in_top = sum(row["n"] for row in versions)
    summary = {
        "total": counts["total"],
        "online": counts["online"],
        "offline": counts["total"] - counts["online"],
        "never_seen": counts["never_seen"],
        "revoked": counts["revoked"],
        "failed": counts[f"status_{DeviceStatus.FAILED}"],
        "updating": counts[f"status_{DeviceStatus.UPDATING}"],
        "statuses": [
            {"status": s, "label": label, "n": counts[f"status_{s}"]}
            for s, label in DeviceStatus.choices
        ],
        "versions": [
            {
                "device_type": row["device_type"],
                "version": row["current_version"] or "unknown",
                "raw_version": row["current_version"],
                "n": row["n"],
            }
            for row in versions
        ],
        "other_versions": counts["total"] - in_top,
        "computed_at": timezone.now().isoformat(),
    }
    cache.set("console:fleet-summary", summary, DASHBOARD_CACHE_SECONDS)
    return summary


@dataclass(frozen=True)
class RolloutProgress:
    rollout: Rollout
    metrics: dict[str, Any]

    @property
    def stages(self) -> list[dict[str, Any]]:
        """Each stage with its progress: finished sessions over the devices it reaches."""
        stages = []
        for stage in self.metrics["stages"]:
            devices = stage["devices"] or 0
            sessions = stage["sessions"]
            failed = sessions.get("failed", 0)
            success = sessions.get("success", 0)
            stages.append(
                {
                    **stage,
                    "success": success,
                    "failed": failed,
                    "open": sum(sessions.values())
                    - success
                    - failed
                    - sessions.get("cancelled", 0),
                    "success_pct": _pct(success, devices),
                    "failed_pct": _pct(failed, devices),
                    "failure_rate_pct": None
                    if stage["failure_rate"] is None
                    else round(stage["failure_rate"] * 100, 1),
                }
            )
        return stages


def _pct(part: int, whole: int) -> float:
    return round(min(100.0, part * 100 / whole), 1) if whole else 0.0


def active_rollouts() -> list[RolloutProgress]:
    """Scheduled, active and paused rollouts with their per-stage metrics (cached)."""
    rows: list[RolloutProgress] | object = cache.get("console:active-rollouts")
    if isinstance(rows, list):
        return rows
    rollouts = (
        Rollout.objects.filter(status__in=LIVE_ROLLOUT_STATUSES)
        .select_related("firmware")
        .prefetch_related("stages")
        .order_by("-created_at")[:ACTIVE_ROLLOUTS]
    )
    rows = [RolloutProgress(rollout=r, metrics=rollout_metrics(r)) for r in rollouts]
    cache.set("console:active-rollouts", rows, DASHBOARD_CACHE_SECONDS)
    return rows


def recent_events(limit: int = RECENT_EVENTS, *, device_id: Any = None) -> list[Event]:
    """The newest events (of one device): an index range read, not cached, so the list is live."""
    events = Event.objects.order_by("-id")
    if device_id is not None:
        events = events.filter(device_id=device_id)  # event_device_idx (device_id, id)
    return list(events[:limit])


def device_sessions(device_id: Any, limit: int = DEVICE_SESSIONS) -> list[UpdateSession]:
    """A device's update sessions, newest first (session_device_started_idx)."""
    return list(
        UpdateSession.objects.filter(device_id=device_id)
        .select_related("firmware", "rollout")
        .order_by("-started_at", "-id")[:limit]
    )
