"""Every change of an update session: device reports, validation, cancellation.

Called by the device API, the operator API, the admin and the rollout engine alike. What a device
should install is decided by rollouts.poll; rollout transitions live in rollouts.lifecycle.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from devices import services as device_services
from devices.models import Device, DeviceStatus
from ota_site.compiled import CompiledRead
from ota_site.errors import ServiceError
from ota_site.events import actor_of, record_event
from ota_site.models import EventKind
from ota_site.versions import InvalidVersion, Version
from rollouts.models import (
    FINISHED_STATUSES,
    STATUS_RANK,
    SessionStatus,
    UpdateSession,
)

logger = logging.getLogger(__name__)


class SessionNotFound(ServiceError):
    status_code: int = 404
    code = "session_not_found"


# --- Session changes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    session: UpdateSession
    applied: bool


# A session uuid and a device id no row has: the placeholders compiled into the locked reads.
_NO_SESSION = uuid.UUID("00000000-0000-4000-8000-00000000005e")
_NO_DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000de")


def _locked_query(session_uuid: Any, device_id: Any) -> QuerySet[UpdateSession]:
    # Lock the session row only: FOR UPDATE on the join would also lock the firmware row, which
    # every concurrent report of that firmware shares (and deadlocks on).
    return (
        UpdateSession.objects.select_for_update(of=("self",))
        .select_related("firmware")
        .filter(uuid=session_uuid, device_id=device_id)
        .order_by()
    )


_SLOTS = ((UpdateSession._meta.get_field("uuid"), _NO_SESSION), (Device._meta.pk, _NO_DEVICE))
# Compiled once per connection (ota_site.compiled): a device's report is the second-hottest path.
_locked_read: CompiledRead[UpdateSession] = CompiledRead(_locked_query, *_SLOTS)
# The same, with the device's credentials joined in, for a report checked against its token.
_locked_read_checked: CompiledRead[UpdateSession] = CompiledRead(
    lambda session_uuid, device_id: _locked_query(session_uuid, device_id).annotate(
        device_generation=F("device__credential_generation"),
        device_revoked_at=F("device__revoked_at"),
    ),
    *_SLOTS,
)


def _locked_session(
    device_id: Any, session_uuid: Any, generation: int | None = None
) -> UpdateSession:
    """The device's session, locked (in the caller's transaction). With ``generation`` (the
    device token's), the device's credentials are checked by the same query, which joins them
    in: a device report costs one read, not two."""
    read = _locked_read if generation is None else _locked_read_checked
    found = read(session_uuid, device_id)
    session = found[0] if found else None
    if generation is not None:
        if session is None:  # no session: a refused device still hears why (401, not 404)
            device_services.check_credentials_current(device_id, generation)
        else:
            device_services.check_credential_values(
                session.device_revoked_at,  # type: ignore[attr-defined]
                session.device_generation,  # type: ignore[attr-defined]
                generation,
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
    generation: int | None = None,
) -> ReportResult:
    """Apply a device's status report. Idempotent, and a session never moves backwards.

    A report that repeats the current state, arrives late (a lower step than the session is
    at), or concerns a finished session changes nothing and returns ``applied=False``.
    ``generation``: the reporting device token's, refused if the credentials were reset.
    """
    with transaction.atomic():
        session = _locked_session(device_id, session_uuid, generation)
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
    generation: int | None = None,
) -> ReportResult:
    """After the reboot: the device proves it runs the new firmware and is healthy, or reports the
    rollback. A device that reports success while still running another version has booted back
    into its old slot, which is a failure. ``generation`` as for report_status."""
    with transaction.atomic():
        session = _locked_session(device_id, session_uuid, generation)
        if session.status in FINISHED_STATUSES:
            # The session stays as it ended, but which version the device runs is a fact: a
            # device that kept installing after its session was cancelled does run it.
            if running_version:
                _note_running_version(device_id, running_version)
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


def cancel_session(
    session_id: int, *, reason: str, actor: Any = None, by_device: bool = False
) -> bool:
    """Cancel an open session. ``by_device``: the device itself gave up or declined it (a DDI
    device's "canceled" or "rejected"), so there is no cancellation for it to confirm."""
    with transaction.atomic():
        session = UpdateSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None or session.status in FINISHED_STATUSES:
            return False
        now = timezone.now()
        session.status = SessionStatus.CANCELLED
        session.error_message = reason
        session.completed_at = now
        session.duration = max(int((now - session.started_at).total_seconds()), 0)
        fields = ["status", "error_message", "completed_at", "duration", "updated_at"]
        if by_device:
            session.cancel_acknowledged_at = now
            fields.append("cancel_acknowledged_at")
        session.save(update_fields=fields)
        device_services.set_status(session.device_id, DeviceStatus.IDLE)
        _session_event(
            session, EventKind.SESSION_CANCELLED, actor=actor_of(actor), extra={"reason": reason}
        )
    return True


def acknowledge_cancel(session: UpdateSession, *, refused: bool = False, detail: str = "") -> bool:
    """A DDI device confirmed a cancelled session (or said it could not stop it any more)."""
    with transaction.atomic():
        updated = UpdateSession.objects.filter(
            pk=session.pk, status=SessionStatus.CANCELLED, cancel_acknowledged_at__isnull=True
        ).update(cancel_acknowledged_at=timezone.now())
        if updated:
            _session_event(
                session,
                EventKind.SESSION_CANCEL_ACKNOWLEDGED,
                extra={"refused": refused, "detail": detail[:1000]},
            )
    return bool(updated)


def note_installed_anyway(session: UpdateSession) -> None:
    """A device finished installing a session that had ended (cancelled while it installed):
    the session stays as it ended, but the device does run that firmware now."""
    _note_running_version(session.device_id, session.firmware.version)


def _note_running_version(device_id: Any, version: str) -> None:
    device = Device.objects.filter(pk=device_id).first()
    if device is not None and device.current_version != version:
        device.set_current_version(version)
        device.save(update_fields=["current_version", "current_version_key", "updated_at"])


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
    if status == SessionStatus.SUCCESS:
        from rollouts.evaluation import offer_rollback_if_rolled_back

        # A device that finished installing after its rollout was rolled back goes back too.
        offer_rollback_if_rolled_back(session)
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
