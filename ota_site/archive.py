"""Archive files, and pruning the event log: the only way old events leave the database.

An archive file is gzip-compressed JSON Lines (one row per line, keys sorted) in the default
storage (``var/media/`` or the S3 bucket) at ``archive/<kind>/YYYY/MM/DD/<first>-<last>.jsonl.gz``,
named by the first and last id of its rows, so the same rows always give the same name. Callers
delete a batch in one transaction that, in this order, reads the rows, writes and closes the
file, deletes exactly those rows and records one event naming the file. Hence:

- nothing is deleted that is not in a closed file;
- every file is named by an event written with its delete, so the event log indexes the archive;
- a run that dies before its commit leaves the rows in the database and maybe the file: the next
  run selects the same rows, writes the same name and replaces it. (Only if rows with lower ids
  became eligible in between does the batch differ; then a row can be in two files: readers key
  on ``id``, docs/operations.md.)

Events are append-only (``ota_site.models``; on PostgreSQL a trigger refuses UPDATE and DELETE).
``prune_events`` is the one escape: inside its transaction it sets ``ota.prune_events_before``,
and the trigger (migration 0007) lets a DELETE through only for rows created before that time.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.files import File
from django.core.files.storage import default_storage
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models, transaction
from django.utils import timezone

from ota_site.errors import ServiceError
from ota_site.events import record_event
from ota_site.models import Event, EventKind

ARCHIVE_ROOT = "archive"
# Events younger than this are kept unless the operator insists (--force): the console, the
# audit API and resuming streams read recent history.
MIN_EVENT_RETENTION_DAYS = 30
DEFAULT_EVENT_BATCH = 10_000
EVENT_FIELDS = [f.attname for f in Event._meta.concrete_fields]


class _Encoder(DjangoJSONEncoder):
    """UUIDs and decimals as strings, and times with their microseconds (Django's encoder
    rounds them to milliseconds): an archived row keeps the values it had."""

    def default(self, o: Any) -> Any:
        if isinstance(o, datetime):
            return o.isoformat()
        return super().default(o)


def archive_name(kind: str, first_id: int, last_id: int, day: datetime) -> str:
    """Where a batch is stored: by the day of its first row and its id range."""
    day = day.astimezone(UTC) if timezone.is_aware(day) else day
    return f"{ARCHIVE_ROOT}/{kind}/{day:%Y/%m/%d}/{first_id:012d}-{last_id:012d}.jsonl.gz"


def write_archive(name: str, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as gzip JSON Lines at ``name`` (replacing a file of that name) and return
    its size in bytes. The storage's save returns only once the file is complete and closed."""
    with tempfile.TemporaryFile() as spool:
        # mtime=0: the same rows give the same bytes, so a rerun's replacement is identical.
        # Level 6 (zlib's default) rather than gzip's 9: about twice as fast, a few % larger.
        with gzip.GzipFile(fileobj=spool, mode="wb", compresslevel=6, mtime=0) as gz:
            for row in rows:
                line = json.dumps(row, cls=_Encoder, sort_keys=True, ensure_ascii=False)
                gz.write(line.encode() + b"\n")
        size = spool.tell()
        spool.seek(0)
        if default_storage.exists(name):
            # A rerun of a batch whose delete did not commit. Storages pick another name
            # rather than overwrite (S3: AWS_S3_FILE_OVERWRITE=False), so remove it first.
            default_storage.delete(name)
        saved = default_storage.save(name, File(spool, name=name.rsplit("/", 1)[-1]))
    if saved != name:  # another run wrote the same batch in between: keep neither guess
        default_storage.delete(saved)
        raise ServiceError(f"{name} was written by another run meanwhile.", code="archive_race")
    return size


def read_archive(name: str) -> Iterator[dict[str, Any]]:
    """The rows of an archive file, in order."""
    with default_storage.open(name, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
        for line in gz:
            yield json.loads(line)


def delete_rows(model: type[models.Model], ids: Sequence[int]) -> int:
    """DELETE exactly these primary keys with plain SQL (no ORM collector, no signals), in
    chunks the backend accepts; returns how many rows went."""
    table = connection.ops.quote_name(model._meta.db_table)
    assert model._meta.pk is not None and model._meta.pk.column is not None
    pk = connection.ops.quote_name(model._meta.pk.column)
    size = connection.features.max_query_params or 10_000
    deleted = 0
    with connection.cursor() as cursor:
        for start in range(0, len(ids), size):
            chunk = list(ids[start : start + size])
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(f"DELETE FROM {table} WHERE {pk} IN ({marks})", chunk)  # noqa: S608
            deleted += cursor.rowcount
    return deleted


@dataclass
class PruneResult:
    before: datetime
    dry_run: bool
    events: int = 0
    first_id: int | None = None
    last_id: int | None = None
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.isoformat(),
            "dry_run": self.dry_run,
            "events": self.events,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "files": self.files,
        }


def prune_events(
    *,
    older_than_days: int,
    force: bool = False,
    batch_size: int = DEFAULT_EVENT_BATCH,
    dry_run: bool = False,
    actor: str = "system",
    now: datetime | None = None,
) -> PruneResult:
    """Export events created more than ``older_than_days`` ago to archive/events/ and delete
    them, a batch per transaction, each batch recording an ``events.pruned`` event.

    Refuses fewer than MIN_EVENT_RETENTION_DAYS days unless ``force`` (and less than one day
    always). Safe to interrupt and rerun.
    """
    if older_than_days < 1:
        raise ServiceError("Keep at least one day of events.", code="retention_too_short")
    if older_than_days < MIN_EVENT_RETENTION_DAYS and not force:
        raise ServiceError(
            f"Events younger than {MIN_EVENT_RETENTION_DAYS} days are kept; give --force to "
            f"prune after {older_than_days} days anyway.",
            code="retention_too_short",
        )
    if batch_size < 1:
        raise ServiceError("The batch size must be at least 1.", code="invalid_batch_size")
    before = (now or timezone.now()) - timedelta(days=older_than_days)
    result = PruneResult(before=before, dry_run=dry_run)
    old = Event.objects.filter(created_at__lt=before)
    if dry_run:
        span = old.aggregate(n=models.Count("id"), lo=models.Min("id"), hi=models.Max("id"))
        result.events, result.first_id, result.last_id = span["n"], span["lo"], span["hi"]
        return result
    after = 0
    while True:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                # Transaction-local: the trigger admits deletes of rows older than this only.
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT set_config('ota.prune_events_before', %s, true)",
                        [before.isoformat()],
                    )
            rows = list(old.filter(id__gt=after).order_by("id").values(*EVENT_FIELDS)[:batch_size])
            if not rows:
                break
            first, last = rows[0]["id"], rows[-1]["id"]
            name = archive_name("events", first, last, rows[0]["created_at"])
            size = write_archive(name, rows)
            deleted = delete_rows(Event, [row["id"] for row in rows])
            if deleted != len(rows):  # never delete what the file does not hold
                raise ServiceError(
                    f"Expected to delete {len(rows)} events, deleted {deleted}; rolled back.",
                    code="archive_mismatch",
                )
            record_event(
                EventKind.EVENTS_PRUNED,
                actor=actor,
                data={
                    "file": name,
                    "bytes": size,
                    "events": len(rows),
                    "first_id": first,
                    "last_id": last,
                    "before": before.isoformat(),
                    "older_than_days": older_than_days,
                    "forced": older_than_days < MIN_EVENT_RETENTION_DAYS,
                },
            )
        result.events += len(rows)
        result.first_id = result.first_id or first
        result.last_id = last
        result.files.append(name)
        after = last
    return result
