"""Every transition of a rollout, and the evaluation that moves rollouts on their own.

API views, console views, admin actions, manage.py commands and the Celery task all call these
functions. Each transition is a compare-and-set on the rollout row inside one transaction, writes
an event (actor and reason) and, after commit, clears the cached view of live rollouts that device
polls read; so a duplicate request or two Celery workers at once change a rollout at most once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceStatus
from firmware.models import Firmware
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import actor_of, created, diff, record_event
from ota_site.models import EventKind
from ota_site.versions import InvalidVersion, Version, version_key
from rollouts import targeting
from rollouts.models import (
    LIVE_ROLLOUT_STATUSES,
    OPEN_STATUSES,
    Rollout,
    RolloutStage,
    RolloutStatus,
    SessionStatus,
    UpdateSession,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    name: str
    percentage: int
    min_duration: int = 0


@dataclass
class Definition:
    """What an operator decides about a rollout (create and, while scheduled, change)."""

    name: str
    firmware: Firmware
    stages: list[StageSpec]
    target_groups: list[DeviceGroup] = field(default_factory=list)
    from_version_min: str = ""
    from_version_max: str = ""
    metadata_filters: dict[str, Any] = field(default_factory=dict)
    success_threshold: float = 0.95
    rollback_threshold: float = 0.05
    min_devices: int = 5
    device_timeout: int = 3600
    auto_rollback: bool = True
    start_at: datetime | None = None
    # The id to create the rollout with: stage membership hashes each device with it, so a form
    # that previewed stage counts with an id gets exactly those stages. None: a new uuid.
    id: uuid.UUID | None = None


# --- Definition rules -------------------------------------------------------------------------


def check_definition(
    definition: Definition, *, exclude: Rollout | None = None, check_start: bool = True
) -> None:
    """Refuse a definition that cannot run, with a clear reason; nothing is saved before this."""
    invalid = "invalid"
    if not definition.firmware.is_published:
        raise ServiceError("The firmware is not published.", code="firmware_not_published")
    if not definition.stages:
        raise ServiceError("A rollout needs at least one stage.", code=invalid)
    previous = 0
    for stage in definition.stages:
        if not 1 <= stage.percentage <= 100:
            raise ServiceError("Stage percentages are between 1 and 100.", code="invalid_stages")
        if stage.percentage <= previous:
            raise ServiceError(
                "Stage percentages must increase from stage to stage.", code="invalid_stages"
            )
        if stage.min_duration < 0:
            raise ServiceError("min_duration cannot be negative.", code="invalid_stages")
        previous = stage.percentage
    for name in ("success_threshold", "rollback_threshold"):
        if not 0.0 <= getattr(definition, name) <= 1.0:
            raise ServiceError(f"{name} is between 0 and 1.", code="invalid_threshold")
    if definition.min_devices < 1:
        raise ServiceError("min_devices is at least 1.", code=invalid)
    if definition.device_timeout < 60:
        raise ServiceError("device_timeout is at least 60 seconds.", code=invalid)
    if check_start and definition.start_at is not None and definition.start_at <= timezone.now():
        raise ServiceError("start_at is in the past.", code="start_in_past")
    low, high = definition.from_version_min, definition.from_version_max
    for text in (low, high):
        if text:
            try:
                Version.parse(text)
            except InvalidVersion as exc:
                raise ServiceError(str(exc), code="invalid_version") from exc
    if low and high and version_key(low) > version_key(high):
        raise ServiceError("from_version_min is above from_version_max.", code=invalid)
    _check_conflicts(definition, exclude=exclude)


def _definition_q(definition: Definition) -> Q:
    probe = Rollout(
        device_type=definition.firmware.device_type,
        from_version_min=definition.from_version_min,
        from_version_max=definition.from_version_max,
        metadata_filters=definition.metadata_filters,
    )
    return targeting.targeting_q(probe, [group.pk for group in definition.target_groups])


def _check_conflicts(definition: Definition, *, exclude: Rollout | None) -> None:
    """One live rollout per device: refuse a rollout whose devices another live rollout targets."""
    others = Rollout.objects.filter(
        status__in=LIVE_ROLLOUT_STATUSES, device_type=definition.firmware.device_type
    ).prefetch_related("target_groups")
    if exclude is not None:
        others = others.exclude(pk=exclude.pk)
    mine = _definition_q(definition)
    for other in others:
        overlap = Device.objects.filter(mine).filter(targeting.targeting_q(other))
        if overlap.exists():
            raise StateConflict(
                f"Devices targeted here are already in the {other.status} rollout "
                f"{other.name!r} ({other.id}); a device takes part in one rollout at a time.",
                code="rollout_conflict",
            )


def check_start_conflicts(rollout: Rollout) -> None:
    definition = _definition_of(rollout)
    _check_conflicts(definition, exclude=rollout)


def _definition_of(rollout: Rollout) -> Definition:
    return Definition(
        name=rollout.name,
        firmware=rollout.firmware,
        stages=[StageSpec(s.name, s.percentage, s.min_duration) for s in rollout.stages.all()],
        target_groups=list(rollout.target_groups.all()),
        from_version_min=rollout.from_version_min,
        from_version_max=rollout.from_version_max,
        metadata_filters=rollout.metadata_filters,
    )


# --- Create and change ---------------------------------------------------------------------------


def create_rollout(definition: Definition, *, actor: Any = None) -> Rollout:
    check_definition(definition)
    if definition.id is not None and Rollout.objects.filter(pk=definition.id).exists():
        raise StateConflict("This rollout has been created already.", code="rollout_exists")
    with transaction.atomic():
        rollout = Rollout.objects.create(
            id=definition.id or uuid.uuid4(),
            name=definition.name,
            firmware=definition.firmware,
            device_type=definition.firmware.device_type,
            from_version_min=definition.from_version_min,
            from_version_max=definition.from_version_max,
            metadata_filters=definition.metadata_filters,
            success_threshold=definition.success_threshold,
            rollback_threshold=definition.rollback_threshold,
            min_devices=definition.min_devices,
            device_timeout=definition.device_timeout,
            auto_rollback=definition.auto_rollback,
            start_at=definition.start_at,
            created_by=actor if isinstance(actor, User) else None,
        )
        rollout.target_groups.set(definition.target_groups)
        _write_stages(rollout, definition.stages)
        rollout_event(
            rollout,
            EventKind.ROLLOUT_CREATED,
            actor,
            changes=created(_audited(rollout)),
            firmware=definition.firmware.version,
        )
    return rollout


def _audited(rollout: Rollout) -> dict[str, Any]:
    """What the audit log records of a rollout's definition, before and after a change."""
    return {
        "name": rollout.name,
        "firmware": rollout.firmware_id,
        "from_version_min": rollout.from_version_min,
        "from_version_max": rollout.from_version_max,
        "metadata_filters": rollout.metadata_filters,
        "success_threshold": rollout.success_threshold,
        "rollback_threshold": rollout.rollback_threshold,
        "min_devices": rollout.min_devices,
        "device_timeout": rollout.device_timeout,
        "auto_rollback": rollout.auto_rollback,
        "start_at": rollout.start_at,
        "target_groups": sorted(
            str(pk) for pk in rollout.target_groups.values_list("pk", flat=True)
        ),
        "stages": [
            [stage.name, stage.percentage, stage.min_duration]
            for stage in rollout.stages.order_by("position")
        ],
    }


def _write_stages(rollout: Rollout, stages: Iterable[StageSpec]) -> None:
    rollout.stages.all().delete()
    RolloutStage.objects.bulk_create(
        RolloutStage(
            rollout=rollout,
            position=position,
            name=stage.name or f"{stage.percentage}%",
            percentage=stage.percentage,
            min_duration=stage.min_duration,
        )
        for position, stage in enumerate(stages)
    )


# What may change while a rollout runs; targeting and stages only while it is scheduled.
RUNNING_CHANGES = {
    "name",
    "success_threshold",
    "rollback_threshold",
    "min_devices",
    "device_timeout",
    "auto_rollback",
}


def update_rollout(rollout: Rollout, changes: dict[str, Any], *, actor: Any = None) -> Rollout:
    """Change a rollout. A scheduled one may change entirely; a running one only its name,
    thresholds, min_devices, device_timeout and auto_rollback; a finished one not at all."""
    with transaction.atomic():
        locked = Rollout.objects.select_for_update().get(pk=rollout.pk)
        if locked.status in (RolloutStatus.ACTIVE, RolloutStatus.PAUSED):
            fixed = set(changes) - RUNNING_CHANGES
            if fixed:
                raise StateConflict(
                    f"A running rollout cannot change {', '.join(sorted(fixed))}; cancel it and "
                    "create another.",
                    code="rollout_running",
                )
        elif locked.status != RolloutStatus.SCHEDULED:
            raise StateConflict(f"The rollout is {locked.status}.", code="rollout_finished")
        before = _audited(locked)
        definition = _definition_of(locked)
        definition.success_threshold = locked.success_threshold
        definition.rollback_threshold = locked.rollback_threshold
        definition.min_devices = locked.min_devices
        definition.device_timeout = locked.device_timeout
        definition.auto_rollback = locked.auto_rollback
        definition.start_at = locked.start_at
        for key, value in changes.items():
            setattr(definition, key, value)
        if locked.status == RolloutStatus.SCHEDULED:
            # A start_at that has just passed is the engine's to act on, not a reason to refuse
            # an unrelated change; a new start_at must lie ahead.
            check_definition(definition, exclude=locked, check_start="start_at" in changes)
        else:
            check_definition_limits(definition)
        for key in RUNNING_CHANGES | {
            "from_version_min",
            "from_version_max",
            "metadata_filters",
            "start_at",
            "firmware",
        }:
            if key in changes:
                setattr(locked, key, changes[key])
        if "firmware" in changes:
            locked.device_type = definition.firmware.device_type
        locked.save()
        if "target_groups" in changes:
            locked.target_groups.set(definition.target_groups)
        if "stages" in changes:
            _write_stages(locked, definition.stages)
        rollout_event(
            locked,
            EventKind.ROLLOUT_UPDATED,
            actor,
            changes=diff(before, _audited(locked)),
            changed=sorted(changes),
        )
        forget_live_specs()
    return locked


def check_definition_limits(definition: Definition) -> None:
    for name in ("success_threshold", "rollback_threshold"):
        if not 0.0 <= getattr(definition, name) <= 1.0:
            raise ServiceError(f"{name} is between 0 and 1.", code="invalid_threshold")
    if definition.min_devices < 1 or definition.device_timeout < 60:
        raise ServiceError("min_devices >= 1 and device_timeout >= 60 s.", code="invalid")


# --- Transitions -------------------------------------------------------------------------------


def _transition(
    rollout: Rollout,
    *,
    allowed: Iterable[str],
    action: str,
) -> Rollout:
    """Lock the row and check its status: the compare-and-set every transition starts with."""
    locked = (
        Rollout.objects.select_for_update(of=("self",))
        .select_related("firmware")
        .get(pk=rollout.pk)
    )
    if locked.status not in allowed:
        raise StateConflict(
            f"The rollout is {locked.status}; it cannot be {action}.",
            code=f"cannot_{_VERBS[action]}",
        )
    return locked


_VERBS = {
    "started": "start",
    "paused": "pause",
    "resumed": "resume",
    "cancelled": "cancel",
    "advanced": "advance",
}


def start_rollout(rollout: Rollout, *, actor: Any = None) -> Rollout:
    with transaction.atomic():
        locked = _transition(rollout, allowed=[RolloutStatus.SCHEDULED], action="started")
        check_start_conflicts(locked)
        now = timezone.now()
        locked.status = RolloutStatus.ACTIVE
        locked.current_stage = 0
        locked.started_at = locked.stage_started_at = now
        locked.status_reason = ""
        locked.save()
        locked.stages.filter(position=0).update(start_time=now)
        rollout_event(locked, EventKind.ROLLOUT_STARTED, actor)
        forget_live_specs()
    return locked


def pause_rollout(rollout: Rollout, *, actor: Any = None, reason: str = "") -> Rollout:
    with transaction.atomic():
        locked = _transition(rollout, allowed=[RolloutStatus.ACTIVE], action="paused")
        locked.status = RolloutStatus.PAUSED
        locked.status_reason = reason or f"Paused by {actor_of(actor)}."
        locked.save()
        rollout_event(locked, EventKind.ROLLOUT_PAUSED, actor, reason=locked.status_reason)
        forget_live_specs()
    return locked


def resume_rollout(rollout: Rollout, *, actor: Any = None) -> Rollout:
    with transaction.atomic():
        locked = _transition(rollout, allowed=[RolloutStatus.PAUSED], action="resumed")
        if locked.current_stage is None:
            # Paused before it ever started (a conflict at start_at): resuming is starting.
            check_start_conflicts(locked)
            now = timezone.now()
            locked.current_stage = 0
            locked.started_at = locked.stage_started_at = now
            locked.stages.filter(position=0).update(start_time=now)
        locked.status = RolloutStatus.ACTIVE
        locked.status_reason = ""
        locked.save()
        rollout_event(locked, EventKind.ROLLOUT_RESUMED, actor)
        forget_live_specs()
    return locked


def cancel_rollout(rollout: Rollout, *, actor: Any = None, reason: str = "") -> Rollout:
    """Stop a rollout for good; its open sessions are cancelled (devices keep what they run)."""
    with transaction.atomic():
        locked = _transition(rollout, allowed=LIVE_ROLLOUT_STATUSES, action="cancelled")
        now = timezone.now()
        locked.status = RolloutStatus.CANCELLED
        locked.status_reason = reason or f"Cancelled by {actor_of(actor)}."
        locked.completed_at = now
        locked.save()
        cancelled = cancel_open_sessions(locked, "The rollout was cancelled.", now)
        rollout_event(
            locked,
            EventKind.ROLLOUT_CANCELLED,
            actor,
            reason=locked.status_reason,
            sessions_cancelled=cancelled,
        )
        forget_live_specs()
    return locked


def advance_rollout(rollout: Rollout, *, actor: Any = None, reason: str = "") -> Rollout:
    """Move to the next stage now (or complete after the last), whatever the thresholds say."""
    with transaction.atomic():
        locked = _transition(
            rollout, allowed=[RolloutStatus.ACTIVE, RolloutStatus.PAUSED], action="advanced"
        )
        advance_stage(locked, actor, reason or f"Advanced by {actor_of(actor)}.")
    return locked


def advance_stage(rollout: Rollout, actor: Any, reason: str) -> None:
    now = timezone.now()
    stages = list(rollout.stages.all())
    current = rollout.current_stage or 0
    RolloutStage.objects.filter(rollout=rollout, position=current).update(completion_time=now)
    if current + 1 >= len(stages):
        rollout.status = RolloutStatus.COMPLETED
        rollout.completed_at = now
        rollout.status_reason = reason
        rollout.save()
        rollout_event(rollout, EventKind.ROLLOUT_COMPLETED, actor, reason=reason)
    else:
        rollout.current_stage = current + 1
        rollout.stage_started_at = now
        rollout.save()
        RolloutStage.objects.filter(rollout=rollout, position=current + 1).update(start_time=now)
        rollout_event(
            rollout,
            EventKind.ROLLOUT_ADVANCED,
            actor,
            reason=reason,
            stage=current + 1,
            percentage=stages[current + 1].percentage,
        )
    forget_live_specs()


def cancel_open_sessions(
    rollout: Rollout,
    reason: str,
    now: datetime,
    statuses: Iterable[str] = OPEN_STATUSES,
) -> int:
    sessions = UpdateSession.objects.filter(
        rollout=rollout, status__in=list(statuses), is_rollback=False
    )
    device_ids = list(sessions.values_list("device_id", flat=True))
    count = sessions.update(
        status=SessionStatus.CANCELLED, error_message=reason, completed_at=now, updated_at=now
    )
    Device.objects.filter(pk__in=device_ids, status=DeviceStatus.UPDATING).update(
        status=DeviceStatus.IDLE, updated_at=now
    )
    return count


# --- Helpers ------------------------------------------------------------------------------------


def forget_live_specs() -> None:
    # Now and after commit: a poll between the two must not re-cache the old state.
    targeting.forget_live_specs()
    transaction.on_commit(targeting.forget_live_specs)


def rollout_event(
    rollout: Rollout,
    kind: EventKind,
    actor: Any,
    *,
    changes: dict[str, Any] | None = None,
    **data: Any,
) -> None:
    """The event of a rollout transition (actor, reason and details), streamed after commit."""
    record_event(
        kind,
        actor=actor_of(actor),
        rollout_id=rollout.id,
        firmware_id=rollout.firmware_id,
        data={"status": rollout.status, "stage": rollout.current_stage, **data},
        changes=changes,
    )
