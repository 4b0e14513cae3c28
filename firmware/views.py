"""Console pages for firmware: the list (with how many devices run each version), the upload page,
a firmware's page, publish (operator) and delete (admin).

Thin views: every change goes through firmware.services, which refuses with a ServiceError that
becomes a message on the page. The upload page itself posts to the API (POST /api/v1/firmware,
session + CSRF), so streaming, hashing and size limits exist once, in the API view.

The firmware app sits below rollouts and must not import it: the firmware page reads the sessions
and rollouts that use a firmware through Firmware's reverse relations (``firmware.sessions``,
``firmware.rollouts``), read-only.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from devices.models import Device
from firmware import services
from firmware.models import Firmware
from ota_site.console import console_page, need
from ota_site.errors import ServiceError
from ota_site.permissions import Role

PAGE_SIZE = 50


def running_counts(device_types: set[str]) -> dict[tuple[str, str], int]:
    """Devices per (device type, version key) for these types, in one GROUP BY that the
    (device_type, current_version_key) index answers without reading device rows."""
    if not device_types:
        return {}
    rows = (
        Device.objects.filter(device_type__in=device_types)
        .order_by()
        .values_list("device_type", "current_version_key")
        .annotate(n=Count("id"))
    )
    return {(device_type, key): n for device_type, key, n in rows}


@require_GET
@console_page
def firmware_list(request: HttpRequest) -> HttpResponse:
    firmware = Firmware.objects.all()
    device_type = request.GET.get("device_type", "").strip()
    if device_type:
        firmware = firmware.filter(device_type=device_type)
    page = Paginator(firmware, PAGE_SIZE).get_page(request.GET.get("page"))
    items = list(page.object_list)
    counts = running_counts({item.device_type for item in items})
    rows = [(item, counts.get((item.device_type, item.version_key), 0)) for item in items]
    device_types = (
        Firmware.objects.order_by("device_type").values_list("device_type", flat=True).distinct()
    )
    return render(
        request,
        "firmware/list.html",
        {
            "section": "firmware",
            "page": page,
            "rows": rows,
            "device_type": device_type,
            "device_types": list(device_types),
        },
    )


@require_GET
@console_page
def upload(request: HttpRequest) -> HttpResponse:
    need(request, Role.OPERATOR)
    device_types = (
        Firmware.objects.order_by("device_type").values_list("device_type", flat=True).distinct()
    )
    return render(
        request,
        "firmware/upload.html",
        {
            "section": "firmware",
            "endpoint": reverse("firmware-list"),
            "max_size": settings.FIRMWARE_MAX_UPLOAD_SIZE,
            "device_types": list(device_types),
        },
    )


@require_GET
@console_page
def firmware_detail(request: HttpRequest, firmware_id: Any) -> HttpResponse:
    firmware = get_object_or_404(Firmware.objects.select_related("signing_key"), pk=firmware_id)
    manifest = ""
    if firmware.manifest:
        try:
            manifest = json.dumps(json.loads(firmware.manifest), indent=2, sort_keys=True)
        except ValueError:  # shown as stored: the signature covers these exact bytes
            manifest = firmware.manifest
    devices_by_status = dict(
        Device.objects.filter(
            device_type=firmware.device_type, current_version_key=firmware.version_key
        )
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    sessions_by_status = dict(
        firmware.sessions.order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    rollouts = firmware.rollouts.order_by("-created_at")[:20]
    return render(
        request,
        "firmware/detail.html",
        {
            "section": "firmware",
            "firmware": firmware,
            "manifest": manifest,
            "release_notes": str(firmware.metadata.get("release_notes") or ""),
            "dependencies": [str(d) for d in firmware.metadata.get("dependencies") or []],
            "devices_by_status": sorted(devices_by_status.items()),
            "devices_total": sum(devices_by_status.values()),
            "sessions_by_status": sorted(sessions_by_status.items()),
            "sessions_total": sum(sessions_by_status.values()),
            "rollouts": list(rollouts),
        },
    )


@require_POST
@console_page
def publish(request: HttpRequest, firmware_id: Any) -> HttpResponse:
    need(request, Role.OPERATOR)
    firmware = get_object_or_404(Firmware, pk=firmware_id)
    try:
        firmware = services.publish_firmware(firmware, actor=request.user)
    except ServiceError as exc:
        messages.error(request, f"Not published: {exc.detail}")
    else:
        messages.success(
            request, f"Published {firmware} (signed with key {firmware.signing_key_id})."
        )
    return redirect("firmware:detail", firmware_id=firmware.pk)


@require_POST
@console_page
def delete(request: HttpRequest, firmware_id: Any) -> HttpResponse:
    need(request, Role.ADMIN)
    firmware = get_object_or_404(Firmware, pk=firmware_id)
    label = str(firmware)
    try:
        services.delete_firmware(firmware, actor=request.user)
    except ServiceError as exc:
        messages.error(request, f"Not deleted: {exc.detail}")
        return redirect("firmware:detail", firmware_id=firmware_id)
    messages.success(request, f"Deleted {label}.")
    return redirect("firmware:list")
