"""The DDI endpoints under ``/{tenant}/controller/v1/{controllerId}``.

Plain Django views rather than DRF: the replies must be exactly what hawkBit clients expect (a
feedback is answered with exactly 200, a HEAD has no body, bodies are parsed leniently), and no
cookie or session is involved, so CSRF does not apply. Every refusal is JSON:
``{"code": ..., "detail": ...}`` with a 4xx status.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from devices import ddi
from devices import services as device_services
from devices.models import Device
from firmware.downloads import serve_firmware
from firmware.models import Firmware
from ota_site.errors import ServiceError, json_error
from ota_site.observability import count_update_check
from rollouts import poll
from rollouts import services as session_services
from rollouts.ddi import feedback as ddi_feedback
from rollouts.ddi.auth import authenticate
from rollouts.models import FINISHED_STATUSES, SessionStatus, UpdateSession

View = Callable[..., HttpResponseBase]


def ddi_view(*methods: str) -> Callable[[View], View]:
    """Authenticate the device, allow only ``methods``, and turn refusals into JSON 4xx."""

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(
            request: HttpRequest, tenant: str, controller_id: str, **kwargs: Any
        ) -> HttpResponseBase:
            if request.method not in methods:
                refusal = json_error(405, "method_not_allowed", f"Use {' or '.join(methods)} here.")
                refusal["Allow"] = ", ".join(methods)
                return refusal
            try:
                device = authenticate(request, tenant, controller_id)
                return view(request, device, **kwargs)
            except ServiceError as exc:
                refusal = json_error(exc.status_code, exc.code, exc.detail)
                if exc.status_code == 401:
                    refusal["WWW-Authenticate"] = 'TargetToken realm="ddi"'
                return refusal

        return wrapper

    return decorate


def _base(request: HttpRequest, device: Device) -> str:
    path = reverse("ddi:poll", args=[settings.DDI_TENANT, device.hardware_id])
    return request.build_absolute_uri(path)


def _sleep() -> str:
    seconds = max(settings.DEVICE_POLL_INTERVAL, 1)
    hours, rest = divmod(min(seconds, 24 * 3600 - 1), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _ok(body: dict[str, Any] | None = None) -> HttpResponse:
    if body is None:
        return HttpResponse(status=200)
    return JsonResponse(body, status=200, content_type="application/hal+json;charset=UTF-8")


def _session(device: Device, action_id: int) -> UpdateSession:
    session = (
        UpdateSession.objects.select_related("firmware")
        .filter(pk=action_id, device_id=device.id)
        .first()
    )
    if session is None:
        raise ServiceError(
            f"Device {device.hardware_id} has no action {action_id}.",
            code="action_not_found",
            status_code=404,
        )
    return session


# --- Poll ---------------------------------------------------------------------------------------


@ddi_view("GET")
def poll_view(request: HttpRequest, device: Device) -> HttpResponseBase:
    """The controller's base resource: how long to sleep, and links to what it should do."""
    base = _base(request, device)
    links: dict[str, dict[str, str]] = {}
    latest = (
        UpdateSession.objects.filter(device_id=device.id)
        .order_by("-started_at", "-id")
        .values("id", "status", "cancel_acknowledged_at")
        .first()
    )
    if (
        latest is not None
        and latest["status"] == SessionStatus.CANCELLED
        and latest["cancel_acknowledged_at"] is None
    ):
        # A cancel waits for the device's confirmation before anything new is offered.
        device_services.mark_seen(device.id, device.last_seen)
        links["cancelAction"] = {"href": f"{base}/cancelAction/{latest['id']}"}
    else:
        offer = count_update_check("ddi", poll.check_for_update, device.id, confirm_cancels=True)
        if offer.reason == "cancelling":
            # An assignment changed under the open action: the device stops it first (as with
            # hawkBit), and the next poll after its confirmation offers what is assigned now.
            links["cancelAction"] = {"href": f"{base}/cancelAction/{offer.session_id}"}
        elif offer.firmware is not None and offer.session_id is not None:
            links["deploymentBase"] = {
                "href": f"{base}/deploymentBase/{offer.session_id}?c={offer.session_id:x}"
            }
        installed = _last_installed(device)
        if installed is not None:
            links["installedBase"] = {"href": f"{base}/installedBase/{installed}"}
    target = getattr(device, "ddi", None)
    if target is not None and target.attributes_requested:
        links["configData"] = {"href": f"{base}/configData"}
    body: dict[str, Any] = {"config": {"polling": {"sleep": _sleep()}}}
    if links:
        body["_links"] = links
    return _ok(body)


def _last_installed(device: Device) -> int | None:
    return (
        UpdateSession.objects.filter(device_id=device.id, status=SessionStatus.SUCCESS)
        .order_by("-completed_at", "-id")
        .values_list("id", flat=True)
        .first()
    )


# --- Actions ------------------------------------------------------------------------------------


def _action(request: HttpRequest, device: Device, session: UpdateSession) -> dict[str, Any]:
    firmware: Firmware = session.firmware
    base = _base(request, device)
    artifact_url = f"{base}/softwaremodules/{firmware.id}/artifacts/{firmware.filename}"
    links = {
        "download": {"href": artifact_url},
        "download-http": {"href": artifact_url},
        "md5sum": {"href": f"{artifact_url}.MD5SUM"},
        "md5sum-http": {"href": f"{artifact_url}.MD5SUM"},
    }
    return {
        "id": str(session.id),
        "deployment": {
            "download": "forced",
            "update": "forced",
            "chunks": [
                {
                    "part": settings.DDI_CHUNK_PARTS.get(
                        firmware.device_type, settings.DDI_CHUNK_PART
                    ),
                    "version": firmware.version,
                    "name": firmware.device_type,
                    "artifacts": [
                        {
                            "filename": firmware.filename,
                            "hashes": {
                                "sha1": firmware.sha1.lower(),
                                "md5": firmware.md5.lower(),
                                "sha256": firmware.checksum.lower(),
                            },
                            "size": firmware.file_size,
                            "_links": links,
                        }
                    ],
                }
            ],
        },
    }


@ddi_view("GET")
def deployment_base(request: HttpRequest, device: Device, action_id: int) -> HttpResponseBase:
    session = _session(device, action_id)
    return _ok(_action(request, device, session))


@ddi_view("GET")
def installed_base(request: HttpRequest, device: Device, action_id: int) -> HttpResponseBase:
    session = _session(device, action_id)
    if session.status != SessionStatus.SUCCESS:
        raise ServiceError(
            f"Action {action_id} did not install.", code="action_not_installed", status_code=404
        )
    return _ok(_action(request, device, session))


@ddi_view("POST")
def deployment_feedback(request: HttpRequest, device: Device, action_id: int) -> HttpResponseBase:
    """Progress and results of an action. Answered with exactly 200 whenever it is understood,
    including repeats and reports about an action that has already ended."""
    report = ddi_feedback.parse(request.body)
    session = _session(device, action_id)
    step = ddi_feedback.step_for(report, session.status)
    if session.status in FINISHED_STATUSES:
        if (
            step.kind == "finish"
            and step.status == SessionStatus.SUCCESS
            and session.status == SessionStatus.CANCELLED
        ):
            # Cancelled while it installed: the session stays cancelled, but the device runs it.
            session_services.note_installed_anyway(session)
        return _ok()
    if step.kind == "finish":
        assert step.status is not None
        session_services.report_status(
            device.id, session.uuid, status=step.status, error_message=step.reason or None
        )
    elif step.kind == "cancel":
        session_services.cancel_session(session.id, reason=step.reason, by_device=True)
    elif step.kind == "report":
        assert step.status is not None
        session_services.report_status(
            device.id, session.uuid, status=step.status, progress=step.progress
        )
    return _ok()


# --- Cancellation -------------------------------------------------------------------------------


def _cancelled(device: Device, action_id: int) -> UpdateSession:
    session = _session(device, action_id)
    if session.status != SessionStatus.CANCELLED:
        raise ServiceError(
            f"Action {action_id} is not being cancelled.", code="no_cancel", status_code=404
        )
    return session


@ddi_view("GET")
def cancel_action(request: HttpRequest, device: Device, action_id: int) -> HttpResponseBase:
    session = _cancelled(device, action_id)
    return _ok({"id": str(session.id), "cancelAction": {"stopId": str(session.id)}})


@ddi_view("POST")
def cancel_feedback(request: HttpRequest, device: Device, action_id: int) -> HttpResponseBase:
    """The device's answer to a cancel. closed/canceled: it stopped; rejected or a failure: it
    could not stop any more (it goes on installing, and its later result notes the version it
    runs). Either way the cancel is settled and the next poll may offer something new; proceeding
    and the like only say it is still working on it."""
    report = ddi_feedback.parse(request.body)
    session = _cancelled(device, action_id)
    if report.execution in ("closed", "canceled", "rejected"):
        refused = report.execution == "rejected" or report.finished == "failure"
        session_services.acknowledge_cancel(session, refused=refused, detail=report.detail_text)
    return _ok()


# --- Attributes ---------------------------------------------------------------------------------


@ddi_view("PUT")
def config_data(request: HttpRequest, device: Device) -> HttpResponseBase:
    try:
        body = json.loads(request.body.decode("utf-8", errors="replace"), strict=False)
    except (ValueError, RecursionError) as exc:
        raise ServiceError(f"The body is not JSON: {exc}.", code="invalid_config_data") from exc
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ServiceError('The body needs a "data" object.', code="invalid_config_data")
    bad = [key for key, value in data.items() if not _attribute_ok(key, value)]
    if bad:
        raise ServiceError(
            f"Attribute values must be strings, numbers, booleans or null: {bad[:5]}.",
            code="invalid_config_data",
        )
    mode = body.get("mode", "merge")
    if not isinstance(mode, str):
        raise ServiceError("mode must be merge, replace or remove.", code="invalid_config_data")
    ddi.update_attributes(device, data, mode.lower())
    return _ok()


def _attribute_ok(key: str, value: Any) -> bool:
    # PostgreSQL's jsonb holds neither NaN/Infinity (Python's json reads them) nor NUL characters.
    if len(key) > 128 or "\x00" in key:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value
    return isinstance(value, int | bool | None)


# --- Artifacts ----------------------------------------------------------------------------------


def _offered_firmware(device: Device, firmware_id: Any, filename: str) -> Firmware:
    """Firmware this device was offered (it has a session for it), with that file name."""
    firmware = (
        Firmware.objects.filter(
            pk=firmware_id,
            filename=filename,
            published_at__isnull=False,
            quarantined_at__isnull=True,
            sessions__device_id=device.id,
        )
        .distinct()
        .first()
    )
    if firmware is None:
        raise ServiceError("No such artifact for this device.", code="not_found", status_code=404)
    return firmware


@ddi_view("GET", "HEAD")
def artifact(
    request: HttpRequest, device: Device, firmware_id: Any, filename: str
) -> HttpResponseBase:
    if filename.endswith(".MD5SUM"):
        firmware = _offered_firmware(device, firmware_id, filename.removesuffix(".MD5SUM"))
        text = f"{firmware.md5.lower()}  {firmware.filename}\n"
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        if request.method == "HEAD":
            response.content = b""
            response["Content-Length"] = str(len(text.encode()))
        return response
    firmware = _offered_firmware(device, firmware_id, filename)
    return serve_firmware(request, firmware)
