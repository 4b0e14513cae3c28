"""The evaluation that moves rollouts on their own (Celery beat, rollouts.tasks).

Every few seconds each running rollout is judged once, with set-based SQL only (counts over the
sessions table and over the fleet, never a loop over devices): sessions stuck past device_timeout
fail; a stage whose failure rate passes rollback_threshold stops the rollout (paused, or rolled
back with every updated device offered its previous firmware); a stage that soaked min_duration
with success_rate >= success_threshold advances; the last stage completes once every targeted
device has finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q
from django.utils import timezone

from devices.models import Device, DeviceStatus
from firmware.models import Firmware
from ota_site import cache
from ota_site.db import analytics
from ota_site.errors import StateConflict
from ota_site.models import EventKind
from ota_site.versions import version_key
from rollouts import targeting
from rollouts.buckets import bucket_limit
from rollouts.lifecycle import (
    advance_stage,
    cancel_open_sessions,
    check_start_conflicts,
    forget_live_specs,
    rollout_event,
)
from rollouts.models import (
    FINISHED_STATUSES,
    OPEN_STATUSES,
    Rollout,
    RolloutStage,
    RolloutStatus,
    SessionStatus,
    UpdateSession,
)

logger = logging.getLogger(__name__)

# How many rollback sessions one INSERT writes.
ROLLBACK_BATCH = 2000
# How long after a rollback the evaluation keeps offering it to devices that report late.
ROLLBACK_SWEEP = timedelta(days=1)


@dataclass(frozen=True)
class StageStats:
    success: int
    failed: int
    open: int

    @property
    def finished(self) -> int:
        return self.success + self.failed

    @property
    def success_rate(self) -> float:
        return self.success / self.finished if self.finished else 0.0

    @property
    def failure_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0


def stage_stats(rollout: Rollout, stage: int | None) -> StageStats:
    """Counts of one stage's sessions, or of the whole rollout's with ``stage=None``."""
    sessions = UpdateSession.objects.filter(rollout=rollout, is_rollback=False)
    if stage is not None:
        sessions = sessions.filter(stage=stage)
    rows = dict(
        sessions.order_by()  # no default ordering in a GROUP BY
        .values("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    return StageStats(
        success=rows.get(SessionStatus.SUCCESS, 0),
        failed=rows.get(SessionStatus.FAILED, 0),
        open=sum(rows.get(status, 0) for status in OPEN_STATUSES),
    )


def evaluate_rollout(rollout_id: Any) -> str:
    """Judge one rollout once: start it when due, time out stuck sessions, then advance, complete,
    pause or roll back. Returns what it did ("" for nothing). Idempotent; a rollout that another
    worker is evaluating right now is skipped (its row is locked)."""
    with transaction.atomic():
        rollout = (
            Rollout.objects.select_for_update(skip_locked=True)
            .select_related("firmware")
            .filter(pk=rollout_id)
            .first()
        )
        if rollout is None:
            return ""
        now = timezone.now()
        if rollout.status == RolloutStatus.SCHEDULED:
            if rollout.start_at is None or rollout.start_at > now:
                return ""
            try:
                check_start_conflicts(rollout)
            except StateConflict as exc:
                return _pause(rollout, f"Could not start at start_at: {exc.detail}")
            rollout.status = RolloutStatus.ACTIVE
            rollout.current_stage = 0
            rollout.started_at = rollout.stage_started_at = now
            rollout.save()
            rollout.stages.filter(position=0).update(start_time=now)
            rollout_event(rollout, EventKind.ROLLOUT_STARTED, None, reason="start_at reached")
            forget_live_specs()
            return "started"
        if rollout.status == RolloutStatus.ROLLED_BACK:
            # Devices that finished installing after the rollback (or whose reports arrived
            # late) are offered their previous firmware too; idempotent. Rollback sessions that
            # hang time out like any other.
            _time_out_sessions(rollout, now)
            offered, _ = _offer_rollbacks(rollout)
            return "rollbacks_offered" if offered else ""
        if rollout.status not in (RolloutStatus.ACTIVE, RolloutStatus.PAUSED):
            return ""
        firmware = rollout.firmware
        if firmware.quarantined_at is not None:
            # Its stored bytes failed verification (firmware.services.verify_storage): no device
            # can download it, which says nothing about the firmware or the devices. Nothing times
            # out and nothing is judged until it is restored and an operator resumes.
            if rollout.status == RolloutStatus.PAUSED:
                return ""
            return _pause(
                rollout,
                f"Firmware {firmware.version} is quarantined: its stored file is missing or "
                f"changed, so no device can download it. Restore the file (manage.py firmware "
                f"verify {firmware.id} --restore FILE), then resume; raise device_timeout first "
                "if its open sessions started longer ago than that.",
            )
        _time_out_sessions(rollout, now)
        if rollout.status == RolloutStatus.PAUSED:
            return ""
        return _judge(rollout, now)


def _judge(rollout: Rollout, now: datetime) -> str:
    stages = list(rollout.stages.all())
    position = rollout.current_stage or 0
    stage = stages[position]
    stats = stage_stats(rollout, position)
    if position:
        # Devices of earlier stages still finish (late reports, timeouts): their failures count
        # too, over the whole rollout.
        overall = stage_stats(rollout, None)
        if (
            overall.finished >= rollout.min_devices
            and overall.failure_rate > rollout.rollback_threshold
        ):
            reason = (
                f"{overall.failed} of {overall.finished} finished devices of the rollout failed "
                f"({overall.failure_rate:.0%}), above the rollback threshold of "
                f"{rollout.rollback_threshold:.0%}."
            )
            return _stop_for_failures(rollout, reason, now)
    required = rollout.min_devices
    if stats.finished < required:
        # A stage smaller than min_devices is judged once all of its devices have finished.
        required = min(required, stage_population(rollout, position, stages))
    if stats.finished < required:
        return ""
    if stats.finished and stats.failure_rate > rollout.rollback_threshold:
        reason = (
            f"Stage {position + 1} ({stage.name}): {stats.failed} of {stats.finished} finished "
            f"devices failed ({stats.failure_rate:.0%}), above the rollback threshold of "
            f"{rollout.rollback_threshold:.0%}."
        )
        return _stop_for_failures(rollout, reason, now)
    soaked = rollout.stage_started_at is None or now - rollout.stage_started_at >= timedelta(
        seconds=stage.min_duration
    )
    if not soaked:
        return ""
    if stats.finished and stats.success_rate < rollout.success_threshold:
        # Between the two thresholds: more results may lift the rate. Once every device of the
        # stage has finished none will, and waiting on would stall the rollout without a word.
        if stats.finished < stage_population(rollout, position, stages):
            return ""
        return _pause_short_of_success(rollout, position, stage.name, stats)
    last = position + 1 >= len(stages)
    if last:
        # The last stage completes once every targeted device has finished, and only after some
        # device took part: a rollout started before its devices enrolled waits for them.
        if remaining_devices(rollout, stage.percentage) > 0:
            return ""
        if stage_stats(rollout, None).finished == 0:
            return ""
    rate = f"{stats.success_rate:.0%}" if stats.finished else "no devices"
    advance_stage(rollout, None, f"Stage {position + 1} succeeded ({rate}).")
    return "completed" if last else "advanced"


def _pause_short_of_success(rollout: Rollout, position: int, name: str, stats: StageStats) -> str:
    reason = (
        f"Stage {position + 1} ({name}): all {stats.finished} devices finished and "
        f"{stats.success} succeeded ({stats.success_rate:.0%}), below the success threshold of "
        f"{rollout.success_threshold:.0%}. Advance it, lower the threshold and resume, or "
        "cancel the rollout."
    )
    return _pause(rollout, reason)


def _pause(rollout: Rollout, reason: str) -> str:
    """The engine pauses the rollout (an operator resumes, advances or cancels it)."""
    rollout.status = RolloutStatus.PAUSED
    rollout.status_reason = reason
    rollout.save()
    rollout_event(rollout, EventKind.ROLLOUT_PAUSED, None, reason=reason)
    forget_live_specs()
    return "paused"


def stage_population(rollout: Rollout, position: int, stages: list[RolloutStage]) -> int:
    """Devices that take part in this stage: targeted, in its slice of the buckets, and either
    in a session of it that can still finish or still able to get one (below the firmware's
    version and not below its min_version). Devices that will never be offered it do not hold the
    stage up, and neither do devices whose session of this rollout was cancelled (one that
    declined or gave up, or whose assignment changed): the rollout does not offer it again."""
    lower = bucket_limit(stages[position - 1].percentage) if position else 0
    devices = targeting.in_stage(
        targeting.targeted_devices(rollout), rollout, stages[position].percentage
    ).filter(ota_bucket__gte=lower)  # type: ignore[misc]
    sessions = UpdateSession.objects.filter(
        device=OuterRef("pk"), rollout=rollout, is_rollback=False
    )
    joined = sessions.filter(stage=position).exclude(status=SessionStatus.CANCELLED)
    cancelled = sessions.filter(status=SessionStatus.CANCELLED)
    eligible = Q(current_version_key__lt=rollout.firmware.version_key) & ~Q(Exists(cancelled))
    if rollout.firmware.min_version:
        eligible &= Q(current_version_key__gte=version_key(rollout.firmware.min_version))
    return devices.filter(Q(Exists(joined)) | eligible).count()


def remaining_devices(rollout: Rollout, percentage: int) -> int:
    """Targeted devices in the stage that still have to finish (not already on or past the
    firmware, not below its min_version, no finished session in this rollout)."""
    firmware = rollout.firmware
    finished = UpdateSession.objects.filter(
        device=OuterRef("pk"), rollout=rollout, is_rollback=False, status__in=FINISHED_STATUSES
    )
    devices = targeting.in_stage(targeting.targeted_devices(rollout), rollout, percentage).filter(
        current_version_key__lt=firmware.version_key
    )
    if firmware.min_version:
        devices = devices.filter(current_version_key__gte=version_key(firmware.min_version))
    return devices.exclude(Exists(finished)).count()


def _time_out_sessions(rollout: Rollout, now: datetime) -> int:
    """Sessions open longer than device_timeout fail: a silent device counts against the stage."""
    stale = UpdateSession.objects.filter(
        rollout=rollout,
        status__in=OPEN_STATUSES,
        started_at__lt=now - timedelta(seconds=rollout.device_timeout),
    )
    ids = list(stale.values_list("id", flat=True)[:10_000])
    if not ids:
        return 0
    message = f"Timed out: no result within {rollout.device_timeout} s."
    count = UpdateSession.objects.filter(pk__in=ids, status__in=OPEN_STATUSES).update(
        status=SessionStatus.FAILED, error_message=message, completed_at=now, updated_at=now
    )
    Device.objects.filter(sessions__pk__in=ids).update(status=DeviceStatus.FAILED, updated_at=now)
    rollout_event(rollout, EventKind.SESSIONS_TIMED_OUT, None, count=count, sessions=ids[:100])
    return count


def _stop_for_failures(rollout: Rollout, reason: str, now: datetime) -> str:
    if not rollout.auto_rollback:
        return _pause(rollout, reason)
    rollout.status = RolloutStatus.ROLLED_BACK
    rollout.status_reason = reason
    rollout.completed_at = now
    rollout.save()
    # Devices that have not started installing stop here; those mid-install finish and are
    # then offered their previous firmware as well (offer_rollback, from the status report).
    cancelled = cancel_open_sessions(
        rollout,
        "The rollout was rolled back.",
        now,
        statuses=(SessionStatus.PENDING, SessionStatus.DOWNLOADING),
    )
    offered, missing = _offer_rollbacks(rollout)
    rollout_event(
        rollout,
        EventKind.ROLLOUT_ROLLED_BACK,
        None,
        reason=reason,
        sessions_cancelled=cancelled,
        rollbacks_offered=offered,
        without_previous_firmware=missing,
    )
    forget_live_specs()
    return "rolled_back"


def _offer_rollbacks(rollout: Rollout, device_ids: Iterable[Any] | None = None) -> tuple[int, int]:
    """Open a rollback session (previous firmware, is_rollback) for every device that took part
    in this rollout and runs its firmware now, and has none yet. "Runs it now" is what the device
    says (validation, heartbeat), so a device whose session was cancelled while it was already
    installing is brought back too. Returns (offered, devices without a previous published
    firmware)."""
    done = UpdateSession.objects.filter(
        rollout=rollout,
        is_rollback=False,
        device__current_version_key=rollout.firmware.version_key,
    )
    if device_ids is not None:
        done = done.filter(device_id__in=list(device_ids))
    already = UpdateSession.objects.filter(
        rollout=rollout, is_rollback=True, device=OuterRef("device")
    )
    busy = UpdateSession.objects.filter(device=OuterRef("device"), status__in=OPEN_STATUSES)
    rows = (
        done.exclude(Exists(already))
        .exclude(Exists(busy))
        .values_list("device_id", "from_version", "device__current_version")
        .order_by("id")
    )
    previous: dict[str, Firmware | None] = {}
    offered = missing = 0
    batch: list[UpdateSession] = []
    for device_id, from_version, current in rows.iterator(chunk_size=ROLLBACK_BATCH):
        if from_version not in previous:
            previous[from_version] = (
                Firmware.objects.filter(
                    device_type=rollout.device_type,
                    version_key=version_key(from_version),
                    published_at__isnull=False,
                ).first()
                if version_key(from_version)
                else None
            )
        firmware = previous[from_version]
        if firmware is None:
            missing += 1
            continue
        batch.append(
            UpdateSession(
                device_id=device_id,
                firmware=firmware,
                rollout=rollout,
                is_rollback=True,
                from_version=current,
            )
        )
        if len(batch) >= ROLLBACK_BATCH:
            offered += _insert(batch)
            batch = []
    offered += _insert(batch)
    return offered, missing


def _insert(sessions: list[UpdateSession]) -> int:
    """Insert; return how many rows were written. ignore_conflicts: a device that opened
    another session meanwhile keeps it (and is not counted)."""
    if not sessions:
        return 0
    rollback = UpdateSession.objects.filter(rollout=sessions[0].rollout, is_rollback=True)
    before = rollback.count()
    UpdateSession.objects.bulk_create(sessions, ignore_conflicts=True)
    return rollback.count() - before


def offer_rollback_if_rolled_back(session: UpdateSession) -> None:
    """Called when a session succeeds: if its rollout was rolled back meanwhile, the device that
    just installed the firmware is offered its previous one too."""
    if session.rollout_id is None or session.is_rollback:
        return
    status = Rollout.objects.filter(pk=session.rollout_id).values_list("status", flat=True).first()
    if status == RolloutStatus.ROLLED_BACK:
        assert session.rollout is not None
        _offer_rollbacks(session.rollout, [session.device_id])


def due_rollout_ids(now: datetime | None = None) -> list[Any]:
    """Rollouts the periodic evaluation looks at: running ones, scheduled ones now due, and
    ones rolled back within the last day (stragglers still get their rollback)."""
    now = now or timezone.now()
    return list(
        Rollout.objects.filter(
            Q(status__in=[RolloutStatus.ACTIVE, RolloutStatus.PAUSED])
            | Q(status=RolloutStatus.SCHEDULED, start_at__lte=now)
            | Q(status=RolloutStatus.ROLLED_BACK, completed_at__gte=now - ROLLBACK_SWEEP)
        ).values_list("id", flat=True)
    )


def rollout_metrics(rollout: Rollout) -> dict[str, Any]:
    """Per-stage device and session counts and rates, in three queries whatever the fleet size."""
    stages = list(rollout.stages.all())
    counts: dict[tuple[int | None, bool], dict[str, int]] = {}
    for stage, is_rollback, status, n in (
        UpdateSession.objects.filter(rollout=rollout)
        .order_by()
        .values_list("stage", "is_rollback", "status")
        .annotate(n=Count("id"))
    ):
        counts.setdefault((stage, is_rollback), {})[status] = n
    # Every stage's population in one scan of the targeted devices.
    slices: dict[str, Count] = {}
    lower = 0
    for stage in stages:
        upper = bucket_limit(stage.percentage)
        slices[f"s{stage.position}"] = Count(
            "id", filter=Q(ota_bucket__gte=lower, ota_bucket__lt=upper)
        )
        lower = upper
    # Counting the fleet is the expensive part (a scan of the targeted devices, ~6 s at 1M), and
    # populations change slowly: they are cached briefly; session counts are always live.
    key = f"rollout-populations:{rollout.id}:{rollout.current_stage}"
    populations = cache.get(key)
    if populations is cache.MISSING:
        # On the read replica when there is one (ota_site.db): a count may lag by a moment.
        targeted = targeting.targeted_devices(rollout).using(analytics())
        populations = targeting.with_bucket(targeted, rollout).aggregate(
            targeted=Count("id"), **slices
        )
        cache.set(key, populations, settings.ROLLOUT_METRICS_CACHE_TIMEOUT)
    result_stages = []
    for stage in stages:
        sessions = counts.get((stage.position, False), {})
        success = sessions.get(SessionStatus.SUCCESS, 0)
        failed = sessions.get(SessionStatus.FAILED, 0)
        finished = success + failed
        current = rollout.current_stage
        if current is None or stage.position > current:
            state = "pending"
        elif stage.position < current or rollout.status == RolloutStatus.COMPLETED:
            state = "done"
        else:
            state = "current"
        result_stages.append(
            {
                "position": stage.position,
                "name": stage.name,
                "percentage": stage.percentage,
                "min_duration": stage.min_duration,
                "state": state,
                "start_time": stage.start_time,
                "completion_time": stage.completion_time,
                "devices": populations[f"s{stage.position}"],
                "sessions": {status: sessions.get(status, 0) for status in SessionStatus.values},
                "finished": finished,
                "success_rate": success / finished if finished else None,
                "failure_rate": failed / finished if finished else None,
            }
        )
    rollback: dict[str, int] = {}
    for (_, is_rollback), by_status in counts.items():
        if is_rollback:
            for status, n in by_status.items():
                rollback[status] = rollback.get(status, 0) + n
    return {
        "id": str(rollout.id),
        "status": rollout.status,
        "status_reason": rollout.status_reason,
        "current_stage": rollout.current_stage,
        "targeted_devices": populations["targeted"],
        "stages": result_stages,
        "rollback_sessions": {status: rollback.get(status, 0) for status in SessionStatus.values},
    }
