"""manage.py fleet status: the fleet, open sessions, live rollouts and firmware at a glance.

Aggregate SQL only, read fresh (not the console's cache): two scans of the devices table, a
GROUP BY over the few open sessions (status index), one over the rollouts, and per live rollout
``rollouts.evaluation.rollout_metrics`` (whose device populations are cached for
ROLLOUT_METRICS_CACHE_TIMEOUT seconds, as for the console).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Count, Q
from django.utils import timezone

from devices.models import Device, DeviceStatus
from firmware.models import Firmware
from rollouts.evaluation import rollout_metrics
from rollouts.models import LIVE_ROLLOUT_STATUSES, OPEN_STATUSES, Rollout, UpdateSession


def fleet_status(top: int) -> dict[str, Any]:
    """Every figure of `manage.py fleet status`, as JSON-ready data."""
    now = timezone.now()
    since = now - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
    devices = Device.objects.aggregate(
        total=Count("id"),
        online=Count("id", filter=Q(last_seen__gte=since)),
        never_seen=Count("id", filter=Q(last_seen__isnull=True)),
        revoked=Count("id", filter=Q(revoked_at__isnull=False)),
        **{f"status_{s}": Count("id", filter=Q(status=s)) for s in DeviceStatus.values},
    )
    # Distinct (type, version) pairs are few: fetch them all, then sum per type and keep the top.
    versions = list(
        Device.objects.order_by()
        .values_list("device_type", "current_version")
        .annotate(n=Count("id"))
        .order_by("-n", "device_type", "current_version")
    )
    by_type: dict[str, int] = {}
    for device_type, _, n in versions:
        by_type[device_type] = by_type.get(device_type, 0) + n
    shown = versions[:top]
    open_sessions = dict(
        UpdateSession.objects.filter(status__in=OPEN_STATUSES)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    rollouts_by_status = dict(
        Rollout.objects.order_by().values_list("status").annotate(n=Count("id"))
    )
    live = (
        Rollout.objects.filter(status__in=LIVE_ROLLOUT_STATUSES)
        .select_related("firmware")
        .prefetch_related("stages")
        .order_by("created_at")
    )
    firmware = Firmware.objects.aggregate(
        total=Count("id"),
        published=Count("id", filter=Q(published_at__isnull=False)),
        quarantined=Count("id", filter=Q(quarantined_at__isnull=False)),
    )
    return {
        "at": now.isoformat(),
        "devices": {
            "total": devices["total"],
            "online": devices["online"],
            "offline": devices["total"] - devices["online"],
            "online_window_seconds": settings.DEVICE_ONLINE_WINDOW,
            "never_seen": devices["never_seen"],
            "revoked": devices["revoked"],
            "by_status": {s: devices[f"status_{s}"] for s in DeviceStatus.values},
            "by_type": dict(sorted(by_type.items(), key=lambda item: (-item[1], item[0]))),
            "top_versions": [
                {"device_type": t, "version": v or None, "devices": n} for t, v, n in shown
            ],
            "other_versions": devices["total"] - sum(n for _, _, n in shown),
        },
        "open_sessions": {s: open_sessions.get(s, 0) for s in OPEN_STATUSES},
        "rollouts": {
            "by_status": rollouts_by_status,
            "live": [_live_rollout(rollout) for rollout in live],
        },
        "firmware": {**firmware, "drafts": firmware["total"] - firmware["published"]},
    }


def _live_rollout(rollout: Rollout) -> dict[str, Any]:
    metrics = rollout_metrics(rollout)
    current = next((s for s in metrics["stages"] if s["state"] == "current"), None)
    return {
        "id": str(rollout.id),
        "name": rollout.name,
        "status": rollout.status,
        "status_reason": rollout.status_reason,
        "firmware": f"{rollout.device_type}:{rollout.firmware.version}",
        "targeted_devices": metrics["targeted_devices"],
        "current_stage": None
        if current is None
        else {
            "position": current["position"],
            "name": current["name"],
            "percentage": current["percentage"],
            "devices": current["devices"],
            "finished": current["finished"],
            "success_rate": current["success_rate"],
            "failure_rate": current["failure_rate"],
        },
        "stages": len(metrics["stages"]),
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


class Command(BaseCommand):
    help = (
        "`status`: devices (total, online, by status, by type, top versions), open update "
        "sessions by status, live rollouts with their current stage and rates, and firmware "
        "counts."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        status = sub.add_parser("status", help="The fleet at a glance.")
        status.add_argument(
            "--top", type=int, default=10, help="How many versions to list (default 10)."
        )
        status.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not 1 <= options["top"] <= 1000:
            raise CommandError("--top must be between 1 and 1000.")
        data = fleet_status(options["top"])
        if options["json"]:
            self.stdout.write(json.dumps(data, cls=DjangoJSONEncoder))
            return
        d = data["devices"]
        statuses = ", ".join(f"{s} {n}" for s, n in d["by_status"].items())
        self.stdout.write(
            f"Devices: {d['total']} ({d['online']} online within {d['online_window_seconds']} s, "
            f"{d['never_seen']} never seen, {d['revoked']} revoked); {statuses}"
        )
        for device_type, n in d["by_type"].items():
            self.stdout.write(f"  {device_type}: {n}")
        self.stdout.write("Versions:")
        for row in d["top_versions"]:
            version = row["version"] or "unknown"
            self.stdout.write(f"  {row['devices']:>9}  {row['device_type']} {version}")
        if d["other_versions"]:
            self.stdout.write(f"  {d['other_versions']:>9}  other versions")
        self.stdout.write(
            "Open sessions: " + ", ".join(f"{s} {n}" for s, n in data["open_sessions"].items())
        )
        r = data["rollouts"]
        counts = ", ".join(f"{s} {n}" for s, n in sorted(r["by_status"].items())) or "none"
        self.stdout.write(f"Rollouts: {counts}")
        for item in r["live"]:
            stage = item["current_stage"]
            where = (
                "not started"
                if stage is None
                else f"stage {stage['position'] + 1}/{item['stages']} ({stage['percentage']}%): "
                f"{stage['finished']} of {stage['devices']} finished, success "
                f"{_rate(stage['success_rate'])}, failure {_rate(stage['failure_rate'])}"
            )
            reason = f" ({item['status_reason']})" if item["status_reason"] else ""
            self.stdout.write(
                f"  {item['id']}  {item['status']:<9} {item['firmware']}  {item['name']}: "
                f"{where}{reason}"
            )
        f = data["firmware"]
        self.stdout.write(
            f"Firmware: {f['total']} ({f['published']} published, {f['drafts']} drafts, "
            f"{f['quarantined']} quarantined)"
        )
