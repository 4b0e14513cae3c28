"""The device poll: what should this device install now?

The hot path of the whole server. Budget: one read (the device, its group and its latest session
together) plus at most one write (opening a session, or the coalesced last_seen), with published
firmware and live rollouts from the cache. Only when an assignment changed under an open session
does a poll cost more: a short transaction cancels the stale session first.

Precedence: an explicit assignment (the device's target_version, else its group's) wins over
rollouts; among live rollouts that target a device, the one started first wins.
"""

from __future__ import annotations

import json
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
from devices.models import Device
from firmware import services as firmware_services
from firmware.services import PublishedFirmware
from ota_site.compiled import CompiledRead
from ota_site.versions import InvalidVersion, Version
from rollouts import targeting
from rollouts.models import FINISHED_STATUSES, OPEN_STATUSES, RolloutStatus, UpdateSession
from rollouts.services import SessionNotFound, cancel_session

# Answers that offer nothing and change only when the database does (the device's row, its
# sessions, its group, a rollout or a firmware): the poll answer cache (ota_site.answers) may keep
# them. Not "busy" (a race that ends by itself), nor "firmware_unavailable" (an open session).
STABLE_REASONS = frozenset(
    {
        "no_assignment",
        "not_published",
        "rollout_paused",
        "waiting_for_stage",
        "up_to_date",
        "newer_installed",
        "below_min_version",
        *(f"already_{status}" for status in FINISHED_STATUSES),
    }
)


@dataclass(frozen=True)
class Offer:
    """The answer to a device's update check."""

    firmware: PublishedFirmware | None
    reason: str
    session_id: int | None = None
    session_uuid: uuid.UUID | None = None
    session_status: str | None = None
    is_rollback: bool = False
    rollout_id: uuid.UUID | None = None
    stage: int | None = None


@dataclass(frozen=True)
class _Latest:
    id: int
    public_id: uuid.UUID
    status: str
    firmware_id: uuid.UUID
    rollout_id: uuid.UUID | None
    is_rollback: bool
    started_at: datetime | None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


def _latest_session_subquery() -> Subquery:
    # The device's newest session as one JSON value, so a single query reads device and session.
    latest = (
        UpdateSession.objects.filter(device=OuterRef("pk"))
        .order_by("-started_at", "-id")
        .values(
            data=JSONObject(
                id="id",
                uuid="uuid",
                status="status",
                firmware_id="firmware_id",
                rollout_id="rollout_id",
                is_rollback="is_rollback",
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
    rollout = value.get("rollout_id")
    return _Latest(
        id=int(value["id"]),
        public_id=uuid.UUID(str(value["uuid"])),
        status=str(value["status"]),
        firmware_id=uuid.UUID(str(value["firmware_id"])),
        rollout_id=uuid.UUID(str(rollout)) if rollout else None,
        is_rollback=bool(value.get("is_rollback")),
        started_at=_aware(parse_datetime(started)) if isinstance(started, str) else None,
    )


def _compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 as version a is lower, equal or higher than b; None if either is no version."""
    try:
        first, second = Version.parse(a), Version.parse(b)
    except InvalidVersion:
        return None
    return (first > second) - (first < second)


# A device id no device has: the placeholder compiled into the read's SQL.
_PLACEHOLDER_ID = uuid.UUID("00000000-0000-4000-8000-0000000000ff")

# The poll's one read (device, group and newest session), compiled once per connection
# (ota_site.compiled): building this queryset on every poll cost about 1 ms of Python, several
# times the query itself. The row is read on every poll, so an operator's change (assignment,
# revocation, credentials reset) is seen at once.
_device_read: CompiledRead[Device] = CompiledRead(
    lambda device_id: (
        Device.objects.select_related("group")
        .annotate(latest_session=_latest_session_subquery())
        .filter(pk=device_id)
        .order_by()
    ),
    (Device._meta.pk, _PLACEHOLDER_ID),
)


def read_device(device_id: Any) -> tuple[Device, Any] | None:
    """The device with its group, and its newest session as JSON (see _parse_latest); or None."""
    for device in _device_read(device_id):
        return device, device.latest_session  # type: ignore[attr-defined]
    return None


def check_for_update(
    device_id: Any, *, generation: int | None = None, confirm_cancels: bool = False
) -> Offer:
    """What should this device install now? Opens the update session when one is offered.

    ``confirm_cancels`` (hawkBit DDI devices): when an assignment changed under an open session,
    the session is cancelled and nothing new is offered yet (reason ``cancelling``, with the
    cancelled session's id), so that the device is told to stop before it is told what comes
    next. Our own agent takes the new offer in the same answer."""
    found = read_device(device_id)
    if found is None:
        raise SessionNotFound("This device no longer exists.", code="device_not_found")
    device, latest_session = found
    if generation is not None:
        # Free here (the row is read anyway): a reset or revoked device is locked out at its
        # next poll.
        device_services.check_credentials(device, generation)
    latest = _parse_latest(latest_session)
    assigned_version = device.effective_target_version
    assigned = (
        firmware_services.published_firmware(device.device_type, assigned_version)
        if assigned_version
        else None
    )

    wrote = False
    if latest is not None and latest.is_open:
        keep = (
            assigned is not None and uuid.UUID(assigned["id"]) == latest.firmware_id
            if assigned_version
            else latest.rollout_id is not None
        )
        if keep:
            return _continue(device, latest)
        # An assignment replaced or removed under an open session: that session will never end.
        cancel_session(latest.id, reason="The assigned firmware changed.")
        if confirm_cancels:
            return Offer(firmware=None, reason="cancelling", session_id=latest.id)
        latest, wrote = None, True

    if assigned_version:
        offer = _decide_assigned(device, assigned, latest)
    else:
        offer = _decide_rollouts(device, latest)
    if offer.firmware is None:
        if not wrote:
            device_services.mark_seen(device.id, device.last_seen)
        return offer
    return _open_session(device, offer)


def _continue(device: Device, latest: _Latest) -> Offer:
    firmware = firmware_services.published_firmware_by_id(latest.firmware_id)
    device_services.mark_seen(device.id, device.last_seen)
    if firmware is None:  # cannot happen: published firmware with sessions is never deleted
        return Offer(firmware=None, reason="firmware_unavailable")
    return Offer(
        firmware=firmware,
        reason="in_progress",
        session_id=latest.id,
        session_uuid=latest.public_id,
        session_status=latest.status,
        is_rollback=latest.is_rollback,
        rollout_id=latest.rollout_id,
    )


def _decide_assigned(
    device: Device, firmware: PublishedFirmware | None, latest: _Latest | None
) -> Offer:
    if firmware is None:
        return Offer(firmware=None, reason="not_published")
    refusal = _ineligible(device, firmware, allow_downgrade=True)
    if refusal:
        return Offer(firmware=None, reason=refusal)
    if latest is not None and latest.firmware_id == uuid.UUID(firmware["id"]):
        # This firmware was tried already (and finished). Offer it again only if an operator
        # assigned it again after that attempt: a failed update must not loop by itself.
        assigned_at = _assigned_at(device)
        if assigned_at is None or latest.started_at is None or assigned_at <= latest.started_at:
            return Offer(firmware=None, reason=f"already_{latest.status}")
    lower = _compare(firmware["version"], device.current_version) == -1
    return Offer(firmware=firmware, reason="new", is_rollback=lower)


def _decide_rollouts(device: Device, latest: _Latest | None) -> Offer:
    # The first live rollout (oldest start) that targets the device decides for it, whether or
    # not its stage has reached the device yet and even while it is paused: a device takes part
    # in one rollout at a time.
    for spec in targeting.live_specs():
        if not targeting.spec_matches(spec, device):
            continue
        if spec["status"] != RolloutStatus.ACTIVE:
            return Offer(firmware=None, reason="rollout_paused")
        if not targeting.spec_includes(spec, device.id):
            return Offer(firmware=None, reason="waiting_for_stage")
        if latest is not None and latest.rollout_id == uuid.UUID(spec["id"]):
            return Offer(firmware=None, reason=f"already_{latest.status}")
        # A rollout never downgrades: only the engine's rollback sessions do, on purpose.
        refusal = _ineligible(device, spec["firmware"], allow_downgrade=False)
        if refusal:
            return Offer(firmware=None, reason=refusal)
        # Offer the firmware as firmware.services describes it now, not as the live rollouts
        # cached it: its entry is dropped at once when the firmware is quarantined or re-signed,
        # where the live rollouts would wait for ROLLOUT_CACHE_TIMEOUT. (Warm: live_specs fills
        # it.) A firmware withdrawn meanwhile is skipped as the next refresh of the live
        # rollouts will skip its rollout.
        firmware = firmware_services.published_firmware_by_id(spec["firmware"]["id"])
        if firmware is None:
            continue
        return Offer(
            firmware=firmware,
            reason="new",
            rollout_id=uuid.UUID(spec["id"]),
            stage=spec["stage"],
        )
    return Offer(firmware=None, reason="no_assignment")


def _ineligible(device: Device, firmware: PublishedFirmware, *, allow_downgrade: bool) -> str:
    if not device.current_version:
        return ""
    comparison = _compare(firmware["version"], device.current_version)
    if comparison == 0:
        return "up_to_date"
    if comparison == -1 and not allow_downgrade:
        return "newer_installed"
    minimum = firmware["min_version"]
    if minimum and _compare(device.current_version, minimum) == -1:
        return "below_min_version"
    return ""


def _assigned_at(device: Device) -> datetime | None:
    if device.target_version:
        return device.target_set_at
    return device.group.target_set_at if device.group is not None else None


def _open_session(device: Device, offer: Offer) -> Offer:
    """Open the session with a single INSERT, which keeps the poll within its two queries.

    The offer writes no event row: the session row records it, and the device's first status
    report (within seconds) writes the first event of the session.
    """
    assert offer.firmware is not None
    # A lone INSERT is atomic by itself; a savepoint is needed only inside an outer transaction,
    # where a failed INSERT would otherwise break it.
    guard = transaction.atomic() if connection.in_atomic_block else nullcontext()
    try:
        with guard:
            session = UpdateSession.objects.create(
                device_id=device.id,
                firmware_id=offer.firmware["id"],
                rollout_id=offer.rollout_id,
                stage=offer.stage,
                from_version=device.current_version,
                is_rollback=offer.is_rollback,
            )
    except IntegrityError:
        # Another poll of the same device opened one a moment ago (one open session per device).
        existing = UpdateSession.objects.filter(
            device_id=device.id, status__in=OPEN_STATUSES
        ).first()
        if existing is None or str(existing.firmware_id) != offer.firmware["id"]:
            return Offer(firmware=None, reason="busy")
        session = existing
    return Offer(
        firmware=offer.firmware,
        reason="new",
        session_id=session.id,
        session_uuid=session.uuid,
        session_status=session.status,
        is_rollback=session.is_rollback,
        rollout_id=session.rollout_id,
        stage=session.stage,
    )
