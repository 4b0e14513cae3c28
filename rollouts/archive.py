"""Archiving finished update sessions: old rows move to gzip JSON Lines files in storage.

``archive_sessions`` (``manage.py sessions archive`` and the daily beat task) moves sessions that
finished (success, failed, cancelled) more than N days ago to
``archive/sessions/YYYY/MM/DD/<first id>-<last id>.jsonl.gz`` and deletes them, a batch per
transaction (file first, then delete, then a ``sessions.archived`` event; ``ota_site.archive``
explains why that order makes interrupting and rerunning safe).

It never archives a session that something still reads:

- a device's newest session: the poll (``rollouts.poll``) decides from it whether an assignment
  or a rollout was tried already; without it the device would be offered the update again;
- a device's newest successful session: the hawkBit DDI ``installedBase`` link names it;
- open sessions (they are not finished);
- sessions of a live rollout (scheduled, active, paused): its metrics and judgement count them;
  nor of one rolled back within ``evaluation.ROLLBACK_SWEEP``, which still offers stragglers
  their rollback from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet
from django.utils import timezone

from ota_site.archive import archive_name, delete_rows, write_archive
from ota_site.errors import ServiceError
from ota_site.events import record_event
from ota_site.models import EventKind
from rollouts.evaluation import ROLLBACK_SWEEP
from rollouts.models import (
    FINISHED_STATUSES,
    LIVE_ROLLOUT_STATUSES,
    Rollout,
    RolloutStatus,
    SessionStatus,
    UpdateSession,
)

DEFAULT_BATCH = 5000
MAX_BATCH = 50_000

# What a line of the archive holds: the row, plus the device's hardware id and type and the
# firmware's version, so the archive reads on its own after the device or firmware is gone.
ROW_FIELDS = [f.attname for f in UpdateSession._meta.concrete_fields]
JOINED_FIELDS = {
    "device_hardware_id": F("device__hardware_id"),
    "device_type": F("device__device_type"),
    "firmware_version": F("firmware__version"),
}


@dataclass
class ArchiveResult:
    before: datetime
    dry_run: bool
    sessions: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.isoformat(),
            "dry_run": self.dry_run,
            "sessions": self.sessions,
            "by_status": self.by_status,
            "files": self.files,
            "bytes": self.bytes,
        }


def protected_rollout_ids(now: datetime) -> list[Any]:
    """Rollouts whose sessions stay: live ones, and ones still sweeping their rollback."""
    return list(
        Rollout.objects.filter(
            Q(status__in=LIVE_ROLLOUT_STATUSES)
            | Q(status=RolloutStatus.ROLLED_BACK, completed_at__gte=now - ROLLBACK_SWEEP)
        ).values_list("id", flat=True)
    )


def archivable(before: datetime, now: datetime) -> QuerySet[UpdateSession]:
    """Sessions that finished before ``before`` and that nothing reads any more (module doc)."""
    # "Newer" in the poll's order (-started_at, -id) and in the DDI's (-completed_at, -id).
    newer = UpdateSession.objects.filter(device_id=OuterRef("device_id")).filter(
        Q(started_at__gt=OuterRef("started_at"))
        | Q(started_at=OuterRef("started_at"), id__gt=OuterRef("id"))
    )
    newer_success = UpdateSession.objects.filter(
        device_id=OuterRef("device_id"), status=SessionStatus.SUCCESS
    ).filter(
        Q(completed_at__gt=OuterRef("completed_at"))
        | Q(completed_at=OuterRef("completed_at"), id__gt=OuterRef("id"))
    )
    return (
        UpdateSession.objects.filter(status__in=FINISHED_STATUSES, completed_at__lt=before)
        .exclude(rollout_id__in=protected_rollout_ids(now))
        .filter(Exists(newer))
        .filter(~Q(status=SessionStatus.SUCCESS) | Exists(newer_success))
    )


def archive_sessions(
    *,
    older_than_days: int = 90,
    batch_size: int = DEFAULT_BATCH,
    dry_run: bool = False,
    actor: str = "system",
    now: datetime | None = None,
) -> ArchiveResult:
    """Archive and delete the sessions that finished more than ``older_than_days`` days ago.

    Idempotent and safe to interrupt: each batch is one transaction; rerunning continues where
    the last committed batch ended. Two runs at once take different rows (SKIP LOCKED).
    """
    if older_than_days < 1:
        raise ServiceError("Keep at least one day of sessions.", code="retention_too_short")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ServiceError(
            f"The batch size must be between 1 and {MAX_BATCH}.", code="invalid_batch_size"
        )
    now = now or timezone.now()
    before = now - timedelta(days=older_than_days)
    result = ArchiveResult(before=before, dry_run=dry_run)
    if dry_run:
        counts = (
            archivable(before, now)
            .order_by()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        result.by_status = dict(counts)
        result.sessions = sum(result.by_status.values())
        return result
    after = 0
    while True:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                # The planner prices the batch query by the whole table and compiles it with
                # JIT, which costs more than it saves on a LIMIT that stops early.
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL jit = off")
            rows = list(
                archivable(before, now)
                .filter(id__gt=after)
                .order_by("id")
                # Rows another transaction holds (a late report) wait for the next run.
                .select_for_update(skip_locked=True, of=("self",))
                .values(*ROW_FIELDS, **JOINED_FIELDS)[:batch_size]
            )
            if not rows:
                break
            by_status: dict[str, int] = {}
            for row in rows:
                by_status[row["status"]] = by_status.get(row["status"], 0) + 1
            first, last = rows[0]["id"], rows[-1]["id"]
            name = archive_name("sessions", first, last, rows[0]["started_at"])
            size = write_archive(name, rows)
            deleted = _delete(rows)
            if deleted != len(rows):  # never delete what the file does not hold
                raise ServiceError(
                    f"Expected to delete {len(rows)} sessions, deleted {deleted}; rolled back.",
                    code="archive_mismatch",
                )
            record_event(
                EventKind.SESSIONS_ARCHIVED,
                actor=actor,
                data={
                    "file": name,
                    "bytes": size,
                    "sessions": len(rows),
                    "by_status": by_status,
                    "first_id": first,
                    "last_id": last,
                    "before": before.isoformat(),
                    "older_than_days": older_than_days,
                },
            )
        result.sessions += len(rows)
        for status, n in by_status.items():
            result.by_status[status] = result.by_status.get(status, 0) + n
        result.files.append(name)
        result.bytes += size
        after = last
    return result


def _delete(rows: list[dict[str, Any]]) -> int:
    return delete_rows(UpdateSession, [row["id"] for row in rows])
