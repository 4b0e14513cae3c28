"""Archiving old update sessions and pruning old events (rollouts.archive, ota_site.archive).

Time is moved by patching ``django.utils.timezone.now`` while rows are written (``at``), so
sessions and events are really created in the past by the same code paths as in production.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.conf import settings as django_settings
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from devices import services as device_services
from devices.models import Device
from firmware.models import Firmware
from ota_site import archive as ota_archive
from ota_site.events import record_event
from ota_site.models import Event, EventKind
from rollouts import archive, poll, services, tasks
from rollouts.models import Rollout, RolloutStatus, SessionStatus, UpdateSession
from tests.factories import DeviceFactory

NOW = timezone.now()


@contextmanager
def at(moment: datetime) -> Iterator[None]:
    """Everything that reads the clock sees ``moment``."""
    with mock.patch("django.utils.timezone.now", return_value=moment):
        yield


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def finished(
    device: Device,
    firmware: Firmware,
    status: str,
    age_days: float,
    rollout: Rollout | None = None,
) -> UpdateSession:
    """A session that started and ended ``age_days`` ago."""
    with at(days_ago(age_days)):
        return UpdateSession.objects.create(
            device=device,
            firmware=firmware,
            rollout=rollout,
            status=status,
            progress=100,
            completed_at=timezone.now(),
        )


def rollout_in(status: str, firmware: Firmware, **fields: Any) -> Rollout:
    return Rollout.objects.create(
        name=f"{status} rollout", firmware=firmware, device_type=firmware.device_type,
        status=status, **fields,
    )  # fmt: skip


def run(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def archived_ids(files: list[str]) -> list[int]:
    return [row["id"] for name in files for row in ota_archive.read_archive(name)]


def stored_files(root: str = "archive/sessions") -> list[str]:
    """Every file under ``root`` in the default storage."""
    if not default_storage.exists(root):
        return []
    folders, files = default_storage.listdir(root)
    found = [f"{root}/{name}" for name in files]
    for folder in folders:
        found += stored_files(f"{root}/{folder}")
    return sorted(found)


# --- Sessions: what is archived, what stays -------------------------------------------------------


@pytest.fixture
def history(v1: Firmware, v2: Firmware) -> dict[str, UpdateSession]:
    """Sessions that must go (``go_*``) and sessions that must stay (``keep_*``)."""
    a, b, c, d, e = (DeviceFactory.create() for _ in range(5))
    s: dict[str, UpdateSession] = {}
    # Device a: two old sessions under a newer one; only the newest stays.
    s["go_success"] = finished(a, v1, SessionStatus.SUCCESS, 200)
    s["go_failed"] = finished(a, v2, SessionStatus.FAILED, 150)
    s["keep_newest"] = finished(a, v2, SessionStatus.SUCCESS, 120)
    # Device b: the old failure is the newest: the poll needs it.
    s["keep_only"] = finished(b, v2, SessionStatus.FAILED, 300)
    # Device c: its last success (DDI installedBase) stays under a newer cancelled session.
    s["keep_last_success"] = finished(c, v2, SessionStatus.SUCCESS, 250)
    s["go_cancelled"] = finished(c, v1, SessionStatus.CANCELLED, 240)
    s["keep_newest_c"] = finished(c, v1, SessionStatus.FAILED, 5)
    # Device d: too young, and an open session (never archived even when it is not the newest).
    s["keep_young"] = finished(d, v1, SessionStatus.SUCCESS, 60)
    with at(days_ago(400)):
        s["keep_open"] = UpdateSession.objects.create(device=d, firmware=v2)
    s["keep_newest_d"] = finished(d, v1, SessionStatus.SUCCESS, 30)
    # Device e: rollouts. A live one and one rolled back yesterday keep theirs; a completed
    # and a long-rolled-back one do not.
    live = rollout_in(RolloutStatus.PAUSED, v2)
    swept = rollout_in(RolloutStatus.ROLLED_BACK, v2, completed_at=NOW - timedelta(hours=3))
    done = rollout_in(RolloutStatus.COMPLETED, v2, completed_at=days_ago(100))
    gone = rollout_in(RolloutStatus.ROLLED_BACK, v2, completed_at=days_ago(100))
    s["keep_live"] = finished(e, v2, SessionStatus.SUCCESS, 200, rollout=live)
    s["keep_sweeping"] = finished(e, v2, SessionStatus.FAILED, 199, rollout=swept)
    s["go_completed"] = finished(e, v2, SessionStatus.SUCCESS, 198, rollout=done)
    s["go_rolled_back"] = finished(e, v2, SessionStatus.FAILED, 197, rollout=gone)
    s["keep_newest_e"] = finished(e, v2, SessionStatus.SUCCESS, 1)
    return s


def test_archive_moves_exactly_the_sessions_nothing_reads(
    history: dict[str, UpdateSession],
) -> None:
    go = sorted(s.id for name, s in history.items() if name.startswith("go_"))
    keep = {s.id for name, s in history.items() if name.startswith("keep_")}

    result = run("sessions", "archive", "--older-than-days", "90")

    assert result["sessions"] == len(go) and not result["dry_run"]
    assert result["by_status"] == {"success": 2, "failed": 2, "cancelled": 1}
    assert sorted(archived_ids(result["files"])) == go
    assert set(UpdateSession.objects.values_list("id", flat=True)) == keep
    # A line is the whole row plus what identifies it once the device or firmware is gone.
    [name] = result["files"]
    first = next(ota_archive.read_archive(name))
    source = history["go_success"]
    assert first["uuid"] == str(source.uuid) and first["status"] == "success"
    assert first["started_at"] == source.started_at.isoformat()  # to the microsecond
    assert first["device_hardware_id"] == source.device.hardware_id
    assert first["firmware_version"] == "1.0.0" and first["device_type"] == "board-a"
    day = source.started_at.strftime("%Y/%m/%d")
    assert name == f"archive/sessions/{day}/{go[0]:012d}-{go[-1]:012d}.jsonl.gz"
    # One event per file, naming it.
    [event] = Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED)
    assert event.data["file"] == name and event.data["sessions"] == len(go)
    assert event.actor == "manage.py sessions"


def test_dry_run_counts_and_changes_nothing(history: dict[str, UpdateSession]) -> None:
    result = run("sessions", "archive", "--dry-run")
    assert result["dry_run"] and result["sessions"] == 5 and result["files"] == []
    assert UpdateSession.objects.count() == len(history)
    assert not default_storage.exists("archive")
    assert not Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED).exists()


def test_batches_and_a_rerun_archive_each_session_once(history: dict[str, UpdateSession]) -> None:
    first = run("sessions", "archive", "--batch-size", "2")
    assert len(first["files"]) == 3 and first["sessions"] == 5
    ids = archived_ids(first["files"])
    assert len(ids) == len(set(ids)) == 5
    again = run("sessions", "archive", "--batch-size", "2")
    assert again["sessions"] == 0 and again["files"] == []
    assert Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED).count() == 3


def test_an_interrupted_batch_is_redone_into_the_same_file(
    history: dict[str, UpdateSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_delete = archive._delete
    calls = []

    def fail_second_delete(rows: list[dict[str, Any]]) -> int:
        calls.append(len(rows))
        if len(calls) == 2:
            raise DatabaseError("connection lost")
        return real_delete(rows)

    monkeypatch.setattr(archive, "_delete", fail_second_delete)
    with pytest.raises(DatabaseError):
        archive.archive_sessions(batch_size=2)
    # The first batch committed; the second wrote its file, then its delete rolled back.
    assert UpdateSession.objects.count() == len(history) - 2
    [done] = Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED)
    [orphan] = [name for name in stored_files() if name != done.data["file"]]
    monkeypatch.setattr(archive, "_delete", real_delete)

    rerun = archive.archive_sessions(batch_size=2)

    assert rerun.sessions == 3 and rerun.files[0] == orphan  # the same rows, the same name
    files = [e.data["file"] for e in Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED)]
    assert sorted(files) == stored_files()
    ids = archived_ids(files)
    assert len(ids) == len(set(ids)) == 5  # replaced, not duplicated
    assert not UpdateSession.objects.filter(id__in=ids).exists()


def test_the_poll_does_not_offer_again_after_archiving(v1: Firmware, v2: Firmware) -> None:
    """The newest session is what stops a failed assigned update from looping."""
    device = DeviceFactory.create()
    for age in (300, 200):
        with at(days_ago(age)):
            if age == 300:
                device_services.update_device(device, target_version="1.1.0")
            else:
                device_services.retry_update(device)
            offer = poll.check_for_update(device.id)
            assert offer.reason == "new"
            services.report_status(
                device.id, offer.session_uuid, status="failed", error_message="no space"
            )
        device.refresh_from_db()
    assert poll.check_for_update(device.id).reason == "already_failed"

    result = archive.archive_sessions(older_than_days=90)

    assert result.sessions == 1 and UpdateSession.objects.filter(device=device).count() == 1
    assert poll.check_for_update(device.id).reason == "already_failed"
    assert UpdateSession.objects.filter(device=device).count() == 1


def test_refusals(db: Any) -> None:
    with pytest.raises(CommandError, match="at least one day"):
        call_command("sessions", "archive", "--older-than-days", "0")
    with pytest.raises(CommandError, match="batch size"):
        call_command("sessions", "archive", "--batch-size", "0")
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("sessions", "compress")


def test_text_output(history: dict[str, UpdateSession]) -> None:
    out = StringIO()
    call_command("sessions", "archive", "--dry-run", stdout=out)
    assert out.getvalue().startswith("Would archive 5 sessions finished before")
    out = StringIO()
    call_command("sessions", "archive", stdout=out)
    lines = out.getvalue().splitlines()
    assert "Archived 5 sessions" in lines[0] and "cancelled 1, failed 2, success 2" in lines[0]
    assert lines[1].strip().startswith("archive/sessions/")


def test_the_daily_task(history: dict[str, UpdateSession], settings: Any) -> None:
    entry = django_settings.CELERY_BEAT_SCHEDULE["archive-old-sessions"]
    assert entry["task"] == "rollouts.tasks.archive_old_sessions" and entry["schedule"] == 86400
    settings.SESSION_ARCHIVE_DAYS = 0  # off
    tasks.archive_old_sessions()
    assert UpdateSession.objects.count() == len(history)
    settings.SESSION_ARCHIVE_DAYS = 250  # what is that old is still read
    tasks.archive_old_sessions()
    assert UpdateSession.objects.count() == len(history)
    settings.SESSION_ARCHIVE_DAYS = 170
    tasks.archive_old_sessions()
    [event] = Event.objects.filter(kind=EventKind.SESSIONS_ARCHIVED)
    assert event.actor == "celery:archive_old_sessions" and event.data["older_than_days"] == 170
    assert {row["id"] for row in ota_archive.read_archive(event.data["file"])} == {
        history[name].id
        for name in ("go_success", "go_cancelled", "go_completed", "go_rolled_back")
    }


# --- Events --------------------------------------------------------------------------------------


def old_events(n: int, age_days: float) -> list[Event]:
    with at(days_ago(age_days)):
        return [record_event(EventKind.GROUP_CHANGED, data={"n": i}) for i in range(n)]


def test_prune_exports_then_deletes_and_records_it(db: Any) -> None:
    old = old_events(3, 100)
    recent = old_events(2, 10)

    result = run("events", "prune", "--older-than-days", "30", "--batch-size", "2")

    assert result["events"] == 3 and len(result["files"]) == 2
    assert (result["first_id"], result["last_id"]) == (old[0].id, old[-1].id)
    rows = [row for name in result["files"] for row in ota_archive.read_archive(name)]
    assert [row["id"] for row in rows] == [e.id for e in old]
    assert rows[0]["kind"] == "group.changed" and rows[0]["data"] == {"n": 0}
    assert set(
        Event.objects.exclude(kind=EventKind.EVENTS_PRUNED).values_list("id", flat=True)
    ) == {e.id for e in recent}
    pruned = list(Event.objects.filter(kind=EventKind.EVENTS_PRUNED))
    assert [p.data["file"] for p in pruned] == result["files"]
    assert [p.data["events"] for p in pruned] == [2, 1] and pruned[0].actor == "manage.py events"
    # Raw bytes: gzip of one JSON object per line.
    with default_storage.open(result["files"][0], "rb") as raw:
        assert len(gzip.decompress(raw.read()).splitlines()) == 2
    # Nothing left to do.
    assert run("events", "prune", "--older-than-days", "30")["events"] == 0


def test_prune_keeps_a_minimum_unless_forced(db: Any) -> None:
    old_events(2, 10)
    with pytest.raises(CommandError, match="--force"):
        call_command("events", "prune", "--older-than-days", "7")
    with pytest.raises(CommandError, match="at least one day"):
        call_command("events", "prune", "--older-than-days", "0", "--force")
    with pytest.raises(CommandError, match="required"):
        call_command("events", "prune")
    assert run("events", "prune", "--older-than-days", "7", "--dry-run", "--force")["events"] == 2
    assert Event.objects.count() == 2
    forced = run("events", "prune", "--older-than-days", "7", "--force")
    assert forced["events"] == 2
    [note] = Event.objects.filter(kind=EventKind.EVENTS_PRUNED)
    assert note.data["forced"] is True and note.data["older_than_days"] == 7


def test_the_orm_still_refuses_deletes(db: Any) -> None:
    [event] = old_events(1, 100)
    with pytest.raises(TypeError, match="events prune"):
        Event.objects.filter(pk=event.pk).delete()


def in_transaction(*statements: tuple[str, list[Any]]) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        for sql, params in statements:
            cursor.execute(sql, params)


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL (the audit trigger)"
)
@pytest.mark.django_db(transaction=True)  # real transactions: set_config(..., true) ends with one
def test_postgresql_admits_only_the_prune() -> None:
    [old] = old_events(1, 100)
    [recent] = old_events(1, 1)
    prune_before = (
        "SELECT set_config('ota.prune_events_before', %s, true)",
        [days_ago(30).isoformat()],
    )

    def delete(event: Event) -> tuple[str, list[Any]]:
        return ("DELETE FROM ota_site_event WHERE id = %s", [event.pk])

    def refused() -> Any:
        return pytest.raises(DatabaseError, match="append-only")

    # A plain DELETE, migration 0003's old switch, and a prune reaching past its own cutoff.
    with refused():
        in_transaction(delete(old))
    with refused():
        in_transaction(("SET LOCAL ota.archive_events = 'on'", []), delete(old))
    with refused():
        in_transaction(prune_before, delete(recent))
    # The prune's own delete passes; its setting ends with its transaction.
    in_transaction(prune_before, delete(old))
    with refused():
        in_transaction(delete(recent))
    with refused():
        in_transaction(prune_before, ("UPDATE ota_site_event SET actor = 'x'", []))
    assert list(Event.objects.values_list("id", "actor")) == [(recent.id, recent.actor)]
