"""The console pages that combine every app: the dashboard and the device page (its session
history comes from rollouts). The health endpoints are in metrics/health.py."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404

from devices.models import Device, DeviceGroup
from metrics import queries
from ota_site.console import ConsoleView


class DashboardView(ConsoleView):
    """The fleet at a glance. Live: the page's script re-reads its ``data-live`` regions when the
    fleet stream reports something (the figures come from metrics.queries' short cache)."""

    section = "dashboard"

    def get(self, request: HttpRequest) -> HttpResponse:
        summary = queries.fleet_summary()
        charts = {
            "versions": {
                "labels": [f"{v['device_type']} {v['version']}" for v in summary["versions"]],
                "counts": [v["n"] for v in summary["versions"]],
            },
            "statuses": {
                "labels": [s["label"] for s in summary["statuses"]],
                "counts": [s["n"] for s in summary["statuses"]],
            },
            "online": {
                "labels": ["Online", "Offline"],
                "counts": [summary["online"], summary["offline"]],
            },
        }
        return self.render(
            request,
            "metrics/dashboard.html",
            {
                "summary": summary,
                "charts": charts,
                "rollouts": queries.active_rollouts(),
                "events": queries.recent_events(),
                "online_window_minutes": settings.DEVICE_ONLINE_WINDOW // 60,
            },
        )


class DeviceDetailView(ConsoleView):
    """/devices/<id>/: the record, credentials, hawkBit DDI state, sessions and events of one
    device.

    Served from metrics (the top layer) because the session history comes from rollouts, which
    devices may not import; the actions it offers post to devices.views."""

    section = "devices"

    def get(self, request: HttpRequest, device_id: Any) -> HttpResponse:
        device = get_object_or_404(Device.objects.select_related("group", "ddi"), pk=device_id)
        certificates = list(device.certificates.order_by("-created_at")[:10])
        valid_certificates = [c for c in certificates if c.state == "valid"]
        if device.revoked_at is not None:
            credentials = "revoked"
        elif device.secret_hash or valid_certificates:
            credentials = "active"
        else:
            credentials = "reset"
        return self.render(
            request,
            "devices/detail.html",
            {
                "device": device,
                "credentials": credentials,
                "ddi": getattr(device, "ddi", None),  # its hawkBit DDI state, if it has any
                "certificates": certificates,
                "valid_certificates": len(valid_certificates),
                "sessions": queries.device_sessions(device.id),
                "events": queries.recent_events(device_id=device.id),
                "groups": list(DeviceGroup.objects.only("id", "name")),
                "metadata_json": json.dumps(device.metadata, indent=2, sort_keys=True),
                "stream_path": f"/api/v1/stream/devices/{device.id}",
            },
        )
