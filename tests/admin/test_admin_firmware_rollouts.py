"""The admin for firmware, rollouts, sessions and the event log: changes only through
services."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from firmware.admin import FirmwareAdmin
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts.models import Rollout, SessionStatus, UpdateSession
from tests.admin.conftest import (
    Fleet,
    events,
    messages_of,
    url,
)

# --- Firmware -------------------------------------------------------------------------------------


def test_publish_action(admin_client: Client, fleet: Fleet) -> None:
    reply = admin_client.post(
        url(Firmware, "changelist"),
        {"action": "publish_selected", "_selected_action": [fleet.draft.pk, fleet.published.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    assert "Published 1 firmware." in messages_of(reply)
    fleet.draft.refresh_from_db()
    assert fleet.draft.is_published and fleet.draft.signature
    [published] = events(EventKind.FIRMWARE_PUBLISHED)[-1:]
    assert published.firmware_id == fleet.draft.id and published.actor == "user:admin"


def test_publish_action_reports_a_refusal(admin_client: Client, fleet: Fleet) -> None:
    name = fleet.draft.file.name
    assert name
    fleet.draft.file.storage.delete(name)
    fleet.draft.file.storage.save(name, SimpleUploadedFile("x", b"tampered"))
    reply = admin_client.post(
        url(Firmware, "changelist"),
        {"action": "publish_selected", "_selected_action": [fleet.draft.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    assert any("does not match" in m for m in messages_of(reply))
    fleet.draft.refresh_from_db()
    assert not fleet.draft.is_published


def test_firmware_is_view_only(admin_client: Client, fleet: Fleet) -> None:
    reply = admin_client.post(url(Firmware, "change", fleet.draft.pk), {"version": "9.9.9"})
    assert reply.status_code == 403


def test_deleting_referenced_firmware_is_refused_without_an_error(
    admin_client: Client, fleet: Fleet
) -> None:
    target = url(Firmware, "delete", fleet.published.pk)
    page = admin_client.get(target)
    assert page.status_code == 200 and page.context["protected"]
    assert admin_client.post(target, {"post": "yes"}).status_code == 200
    bulk = admin_client.post(
        url(Firmware, "changelist"),
        {"action": "delete_selected", "_selected_action": [fleet.published.pk], "post": "yes"},
    )
    assert bulk.status_code == 200
    assert Firmware.objects.filter(pk=fleet.published.pk).exists()
    assert not events(EventKind.FIRMWARE_DELETED)


def test_firmware_taken_into_use_after_the_confirmation_is_not_deleted(
    admin_client: Client, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The confirmation page saw no rollout or session; one appeared before the operator confirmed.
    monkeypatch.setattr(
        FirmwareAdmin, "get_deleted_objects", lambda self, objs, request: ([], {}, set(), [])
    )
    reply = admin_client.post(url(Firmware, "delete", fleet.published.pk), {"post": "yes"})
    assert reply.status_code == 302
    assert reply["Location"] == url(Firmware, "change", fleet.published.pk)
    page = admin_client.get(reply["Location"])
    assert any("cannot be deleted" in m for m in messages_of(page))
    assert Firmware.objects.filter(pk=fleet.published.pk).exists()
    assert fleet.published.file.storage.exists(str(fleet.published.file.name))
    assert not LogEntry.objects.exists() and not events(EventKind.FIRMWARE_DELETED)

    bulk = admin_client.post(
        url(Firmware, "changelist"),
        {"action": "delete_selected", "_selected_action": [fleet.published.pk], "post": "yes"},
        follow=True,
    )
    assert bulk.status_code == 200
    assert any("was not deleted" in m for m in messages_of(bulk))
    assert Firmware.objects.filter(pk=fleet.published.pk).exists()


def test_deleting_unused_firmware_goes_through_the_service(
    admin_client: Client, fleet: Fleet, django_capture_on_commit_callbacks: Any
) -> None:
    name = str(fleet.draft.file.name)
    with django_capture_on_commit_callbacks(execute=True):
        reply = admin_client.post(url(Firmware, "delete", fleet.draft.pk), {"post": "yes"})
    assert reply.status_code == 302
    assert not Firmware.objects.filter(pk=fleet.draft.pk).exists()
    assert not fleet.draft.file.storage.exists(name)
    [deleted] = events(EventKind.FIRMWARE_DELETED)
    assert deleted.firmware_id == fleet.draft.id and deleted.actor == "user:admin"


# --- Rollouts and sessions ------------------------------------------------------------------------


def test_rollouts_are_controlled_with_actions_not_edited(
    admin_client: Client, fleet: Fleet
) -> None:
    assert admin_client.get(url(Rollout, "add")).status_code == 403
    changelist = url(Rollout, "changelist")
    reply = admin_client.post(
        changelist,
        {"action": "start_rollout", "_selected_action": [fleet.rollout.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    fleet.rollout.refresh_from_db()
    assert fleet.rollout.status == "active"
    assert events(EventKind.ROLLOUT_STARTED)[0].actor == "user:admin"
    # A transition that is not allowed is reported, not a 500.
    reply = admin_client.post(
        changelist,
        {"action": "resume_rollout", "_selected_action": [fleet.rollout.pk]},
        follow=True,
    )
    assert any("cannot be resumed" in m for m in messages_of(reply))
    admin_client.post(
        changelist, {"action": "cancel_rollout", "_selected_action": [fleet.rollout.pk]}
    )
    fleet.rollout.refresh_from_db()
    assert fleet.rollout.status == "cancelled"


def test_cancel_sessions_action(admin_client: Client, fleet: Fleet) -> None:
    finished = UpdateSession.objects.create(
        device=fleet.devices[1], firmware=fleet.published, status=SessionStatus.SUCCESS
    )
    reply = admin_client.post(
        url(UpdateSession, "changelist"),
        {"action": "cancel_selected", "_selected_action": [fleet.session.pk, finished.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    assert "Cancelled 1 open session(s)." in messages_of(reply)
    fleet.session.refresh_from_db()
    finished.refresh_from_db()
    assert fleet.session.status == SessionStatus.CANCELLED
    assert fleet.session.error_message == "Cancelled by an operator."
    assert finished.status == SessionStatus.SUCCESS
    [cancelled] = events(EventKind.SESSION_CANCELLED)
    assert cancelled.session_id == fleet.session.id and cancelled.actor == "user:admin"


def test_sessions_are_view_only(admin_client: Client, fleet: Fleet) -> None:
    assert admin_client.post(url(UpdateSession, "change", fleet.session.pk), {}).status_code == 403
    assert admin_client.get(url(UpdateSession, "delete", fleet.session.pk)).status_code == 403


# --- The event log --------------------------------------------------------------------------------


def test_event_admin_is_view_only(admin_client: Client, fleet: Fleet) -> None:
    event = Event.objects.order_by("id").first()
    assert event is not None
    assert admin_client.get(url(Event, "add")).status_code == 403
    assert admin_client.post(url(Event, "change", event.pk), {"kind": "x"}).status_code == 403
    assert admin_client.get(url(Event, "delete", event.pk)).status_code == 403
    assert admin_client.post(url(Event, "delete", event.pk), {"post": "yes"}).status_code == 403
    reply = admin_client.post(
        url(Event, "changelist"),
        {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"},
    )
    assert reply.status_code in (200, 302)
    assert Event.objects.filter(pk=event.pk).exists()

    page = admin_client.get(url(Event, "changelist"))
    request = page.wsgi_request  # the superuser's
    event_admin = admin.site.get_model_admin(Event)
    assert not event_admin.has_add_permission(request)
    assert not event_admin.has_change_permission(request, event)
    assert not event_admin.has_delete_permission(request, event)
    assert not event_admin.get_actions(request)
