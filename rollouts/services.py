"""The device update flow: what a device should run, and every change of an update session.

Called by the device API, the operator API, the admin and (later) the rollout engine alike.
"""

from __future__ import annotations

import json
import logging
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import JSONField, OuterRef, Subquery
from django.db.models.functions import JSONObject
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from devices import services as device_services
from devices.models import Device, DeviceStatus
from firmware import services as firmware_services
from firmware.services import PublishedFirmware
from ota_site.errors import ServiceError
from ota_site.events import actor_of, record_event
from ota_site.models import EventKind
from ota_site.versions import InvalidVersion, Version
from rollouts.models import (
    FINISHED_STATUSES,
    OPEN_STATUSES,
    STATUS_RANK,
    SessionStatus,
    UpdateSession,
)

logger = logging.getLogger(__name__)


class SessionNotFound(ServiceError):
    status_code: int = 404
    code = "session_not_found"


@dataclass(frozen=True)
class Offer:
    """The answer to a device's update check."""

    firmware: PublishedFirmware | None
    session_id: int | None = None
    session_uuid: uuid.UUID | None = None
    session_status: str | None = None
    is_rollback: bool = False
    reason: str = "up_to_date"


@dataclass(frozen=True)
class _Latest:
    id: int
    public_id: uuid.UUID
    status: str
    firmware_id: uuid.UUID
    started_at: datetime | None


def _latest_session_subquery() -> Subquery:
    # One correlated subquery that returns the device's newest session as a JSON object, so the
    # poll reads the device, its group and its latest session in a single query.
    latest = (
        UpdateSession.objects.filter(device=OuterRef("pk"))
        .order_by("-started_at", "-id")
        .values(
            data=JSONObject(
                id="id",
                uuid="uuid",
                status="status",
                firmware_id="firmware_id",
                started_at="started_at",
            )
        )[:1]
    )
    return Subquery(latest, output_field=JSONField())


def _aware(value: datetime | None) -> datetime | None:
    # SQLite's json_object() renders stored UTC datetimes without an offset.
    if value is not None and timezone.is_naive(value):
        return timezone.make_aware(value, UTC)
    return value


def _parse_latest(value: Any) -> _Latest | None:
    if not value:
        return None
    if isinstance(value, str):  # some backends hand JSON back as text
        value = json.loads(value)
    started = value.get("started_at")
    return _Latest(
        id=int(value["id"]),
        public_id=uuid.UUID(str(value["uuid"])),
        status=str(value["status"]),
        firmware_id=uuid.UUID(str(value["firmware_id"])),
        started_at=_aware(parse_datetime(started)) if isinstance(started, str) else None,
    )


def _lower(version: str, than: str) -> bool:
    try:
        return Version.parse(version) < Version.parse(than)
    except InvalidVersion:
        return False


def check_for_update(device_id: Any, *, generation: int | None = None) -> Offer:
    """What should this device install now? Creates the update session when one is offered.

    Budget: one read (device, group and latest session together) plus at most one write, with
    published firmware from the cache. Only when the assignment changed under an open session
    does the poll cost more: a short transaction cancels the stale session before the new one.
    """
    device = (
        Device.objects.select_related("group")
        .annotate(latest_session=_latest_session_subquery())
        .filter(pk=device_id)
        .first()
    )
    if device is None:
        raise SessionNotFound("This device no longer exists.", code="device_not_found")
    if generation is not None and generation != device.credential_generation:
        # Free here (the row is read anyway): a reset device is locked out at its next poll.
        raise device_services.AuthenticationError(
            "The device's credentials were reset; enroll again.", code="credentials_reset"
        )
    latest = _parse_latest(device.latest_session)

    desired_version = device.effective_target_version
    firmware = (
        firmware_services.published_firmware(device.device_type, desired_version)
        if desired_version
        else None
    )
    wrote = False
    if latest is not None and latest.status in OPEN_STATUSES:
        if firmware is not None and uuid.UUID(firmware["id"]) == latest.firmware_id:
            device_services.mark_seen(device.id, device.last_seen)
            return Offer(
                firmware=firmware,
                session_id=latest.id,
                session_uuid=latest.public_id,
                session_status=latest.status,
                is_rollback=_lower(firmware["version"], device.current_version),
                reason="in_progress",
            )
        # The assignment changed under an open session: that session will never finish.
        cancel_session(latest.id, reason="The assigned firmware changed.")
        latest = None
        wrote = True

    offer = _decide(device, firmware, latest)
    if offer.firmware is None or offer.reason != "new":
        if not wrote:
            device_services.mark_seen(device.id, device.last_seen)
        return offer
    return _open_session(device, offer.firmware, offer.is_rollback)


def _decide(device: Device, firmware: PublishedFirmware | None, latest: _Latest | None) -> Offer:
    if firmware is None:
        return Offer(
            firmware=None,
            reason="no_assignment" if not device.effective_target_version else "not_published",
        )
    if device.current_version:
        try:
            if Version.parse(device.current_version) == Version.parse(firmware["version"]):
                return Offer(firmware=None, reason="up_to_date")
        except InvalidVersion:
            pass
    min_version = firmware["min_version"]
    if min_version and device.current_version and _lower(device.current_version, min_version):
        return Offer(firmware=None, reason="below_min_version")
    if latest is not None and latest.firmware_id == uuid.UUID(firmware["id"]):
        # This firmware was tried already (and finished). Offer it again only if an operator
        # assigned it again after that attempt: a failed update must not loop by itself.
        assigned_at = _assigned_at(device)
        if assigned_at is None or latest.started_at is None or assigned_at <= latest.started_at:
            return Offer(firmware=None, reason=f"already_{latest.status}")
    return Offer(
        firmware=firmware,
        is_rollback=_lower(firmware["version"], device.current_version),
        reason="new",
    )


def _assigned_at(device: Device) -> datetime | None:
    if device.target_version:
        return device.target_set_at
    return device.group.target_set_at if device.group is not None else None


def _open_session(device: Device, firmware: PublishedFirmware, is_rollback: bool) -> Offer:
    """Open the session with a single INSERT, which keeps the poll within its two queries.

    The offer writes no event row: the session row records it, and the device's first status
    report (within seconds) writes the first event of the session.
    """
    # A lone INSERT is atomic by itself; a savepoint is needed only inside an outer transaction,
    # where a failed INSERT would otherwise break it.
    guard = transaction.atomic() if connection.in_atomic_block else nullcontext()
    try:
        with guard:
            session = UpdateSession.objects.create(
                device_id=device.id,
                firmware_id=firmware["id"],
                from_version=device.current_version,
                is_rollback=is_rollback,
            )
    except IntegrityError:
        # Another poll of the same device opened one a moment ago (one open session per device).
        existing = UpdateSession.objects.filter(
            device_id=device.id, status__in=OPEN_STATUSES
        ).first()
        if existing is None or str(existing.firmware_id) != firmware["id"]:
            return Offer(firmware=None, reason="busy")
        session = existing
    return Offer(
        firmware=firmware,
        session_id=session.id,
        session_uuid=session.uuid,
        session_status=session.status,
        is_rollback=is_rollback,
        reason="new",
    )


# --- Session changes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    session: UpdateSession
    applied: bool


def _locked_session(device_id: Any, session_uuid: Any) -> UpdateSession:
    session = (
        UpdateSession.objects.select_for_update()
        .select_related("firmware")
        .filter(uuid=session_uuid, device_id=device_id)
        .first()
    )
    if session is None:
        raise SessionNotFound("No such update session for this device.")
    return session


def report_status(
    device_id: Any,
    session_uuid: Any,
    *,
    status: str,
    progress: int | None = None,
    error_message: str | None = None,
) -> ReportResult:
    """Apply a device's status report. Idempotent, and a session never moves backwards.

    A report that repeats the current state, arrives late (a lower step than the session is
    at), or concerns a finished session changes nothing and returns ``applied=False``.
    """
    with transaction.atomic():
        session = _locked_session(device_id, session_uuid)
        current = STATUS_RANK[SessionStatus(session.status)]
        wanted = STATUS_RANK[SessionStatus(status)]
        if session.status in FINISHED_STATUSES or wanted < current:
            return ReportResult(session, applied=False)
        if wanted == current:
            if progress is None or progress <= session.progress:
                return ReportResult(session, applied=False)
            before = session.progress
            session.progress = progress
            session.save(update_fields=["progress", "updated_at"])
            if progress // 10 > before // 10:
                _session_event(session, EventKind.SESSION_PROGRESS)
            return ReportResult(session, applied=True)
        if status in (SessionStatus.SUCCESS, SessionStatus.FAILED):
            _finish(session, status, error_message)
        else:
            session.status = status
            if progress is not None:
                session.progress = progress
            elif status != SessionStatus.DOWNLOADING:
                session.progress = max(session.progress, 0)
            session.save(update_fields=["status", "progress", "updated_at"])
            device_services.set_status(device_id, DeviceStatus.UPDATING)
            _session_event(session, EventKind.SESSION_PROGRESS)
        return ReportResult(session, applied=True)


def validate_session(
    device_id: Any,
    session_uuid: Any,
    *,
    success: bool,
    running_version: str | None = None,
    error_message: str | None = None,
) -> ReportResult:
    """After the reboot: the device proves it runs the new firmware and is healthy, or reports the
    rollback. A device that reports success while still running another version has booted back
    into its old slot, which is a failure."""
    with transaction.atomic():
        session = _locked_session(device_id, session_uuid)
        if session.status in FINISHED_STATUSES:
            return ReportResult(session, applied=False)
        expected = session.firmware.version
        if success and running_version and not _same_version(running_version, expected):
            success = False
            error_message = (
                f"The device runs {running_version} after the update, not {expected}: "
                "it booted back into its previous slot."
            )
        status = SessionStatus.SUCCESS if success else SessionStatus.FAILED
        _finish(session, status, error_message, running_version=running_version)
        return ReportResult(session, applied=True)


def cancel_session(session_id: int, *, reason: str, actor: Any = None) -> bool:
    with transaction.atomic():
        session = UpdateSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None or session.status in FINISHED_STATUSES:
            return False
        now = timezone.now()
        session.status = SessionStatus.CANCELLED
        session.error_message = reason
        session.completed_at = now
        session.duration = max(int((now - session.started_at).total_seconds()), 0)
        session.save(
            update_fields=["status", "error_message", "completed_at", "duration", "updated_at"]
        )
        device_services.set_status(session.device_id, DeviceStatus.IDLE)
        _session_event(
            session, EventKind.SESSION_CANCELLED, actor=actor_of(actor), extra={"reason": reason}
        )
    return True


def _same_version(a: str, b: str) -> bool:
    try:
        return Version.parse(a) == Version.parse(b)
    except InvalidVersion:
        return a == b


def _finish(
    session: UpdateSession,
    status: str,
    error_message: str | None,
    *,
    running_version: str | None = None,
) -> None:
    now = timezone.now()
    session.status = status
    session.completed_at = now
    session.duration = max(int((now - session.started_at).total_seconds()), 0)
    if status == SessionStatus.SUCCESS:
        session.progress = 100
        session.error_message = None
    else:
        session.error_message = (error_message or "The device reported a failure.")[:4000]
    session.save(
        update_fields=[
            "status",
            "progress",
            "error_message",
            "completed_at",
            "duration",
            "updated_at",
        ]
    )
    device = Device.objects.select_for_update().get(pk=session.device_id)
    fields = ["status", "updated_at"]
    if status == SessionStatus.SUCCESS:
        device.status = DeviceStatus.SUCCESS
        device.set_current_version(session.firmware.version)
        fields += ["current_version", "current_version_key"]
    else:
        device.status = DeviceStatus.FAILED
        if running_version and running_version != device.current_version:
            device.set_current_version(running_version)
            fields += ["current_version", "current_version_key"]
    device.save(update_fields=fields)
    _session_event(
        session,
        EventKind.SESSION_FINISHED,
        extra={"error_message": session.error_message, "duration": session.duration},
    )


def _session_event(
    session: UpdateSession,
    kind: EventKind,
    *,
    actor: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    record_event(
        kind,
        actor=actor or f"device:{session.device_id}",
        device_id=session.device_id,
        firmware_id=session.firmware_id,
        rollout_id=session.rollout_id,
        session_id=session.id,
        data={"status": session.status, "progress": session.progress, **(extra or {})},
    )
