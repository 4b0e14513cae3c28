"""The admin as a power-user console: every page renders, and every change goes through services."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from devices import services as device_services
from devices.models import Device, DeviceGroup, EnrollmentToken
from firmware import services as firmware_services
from firmware.admin import FirmwareAdmin
from firmware.models import Firmware, SigningKey
from ota_site.errors import ServiceError
from ota_site.models import Event, EventKind
from rollouts.models import Rollout, RolloutStage, SessionStatus, UpdateSession

DEVICE_TYPE = "admin-board"
TOKEN_RE = re.compile(r"ota_enroll_[0-9a-f]{12}_[A-Za-z0-9_-]+")


@pytest.fixture(autouse=True)
def _private_storage(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media")},
        },
        # The manifest storage needs collectstatic, which tests do not run.
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    settings.FIRMWARE_SIGNING_KEY_PATH = tmp_path / "key.pem"


def upload(version: str, content: bytes | None = None) -> Firmware:
    data = content or hashlib.sha256(version.encode()).digest() * 512
    return firmware_services.upload_firmware(
        file=SimpleUploadedFile("image.bin", data),
        hashes={
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha1": hashlib.sha1(data).hexdigest(),
            "md5": hashlib.md5(data).hexdigest(),
        },
        version=version,
        device_type=DEVICE_TYPE,
    )


def make_device(hardware_id: str, group: DeviceGroup | None = None) -> Device:
    device = Device(
        hardware_id=hardware_id,
        device_type=DEVICE_TYPE,
        group=group,
        secret_hash=device_services.hash_secret("unused"),
        last_seen=timezone.now(),
    )
    device.set_current_version("1.0.0")
    device.save()
    return device


@dataclass
class Fleet:
    group: DeviceGroup
    devices: list[Device]
    token: EnrollmentToken
    published: Firmware
    draft: Firmware
    rollout: Rollout
    session: UpdateSession


@pytest.fixture
def fleet(db: Any) -> Fleet:
    group = device_services.create_group(name="lab")
    devices = [make_device(f"dev-{i}", group) for i in range(3)]
    token, _ = device_services.create_enrollment_token(name="factory", device_type=DEVICE_TYPE)
    published = firmware_services.publish_firmware(upload("1.1.0"))
    draft = upload("1.2.0")
    rollout = Rollout.objects.create(
        name="to 1.1.0", firmware=published, device_type=published.device_type
    )
    rollout.target_groups.add(group)
    RolloutStage.objects.create(rollout=rollout, position=1, name="canary", percentage=5)
    session = UpdateSession.objects.create(
        device=devices[0], firmware=published, rollout=rollout, from_version="1.0.0"
    )
    device_services.update_device(devices[1], target_version="1.1.0")
    return Fleet(group, devices, token, published, draft, rollout, session)


def url(model: type[Any], view: str, *args: Any) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def events(kind: EventKind) -> list[Event]:
    return list(Event.objects.filter(kind=kind).order_by("id"))


# --- Every page renders ---------------------------------------------------------------------------


def _object_of(fleet: Fleet, model: type[Any]) -> Any:
    return {
        Device: fleet.devices[0],
        DeviceGroup: fleet.group,
        EnrollmentToken: fleet.token,
        Firmware: fleet.published,
        SigningKey: SigningKey.objects.first(),
        Rollout: fleet.rollout,
        UpdateSession: fleet.session,
        Event: Event.objects.order_by("-id").first(),
    }[model]


ALL_MODELS = [
    Device,
    DeviceGroup,
    EnrollmentToken,
    Firmware,
    SigningKey,
    Rollout,
    UpdateSession,
    Event,
]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_changelist_and_change_page_render(admin_client: Client, fleet: Fleet, model: Any) -> None:
    assert admin_client.get(url(model, "changelist")).status_code == 200
    obj = _object_of(fleet, model)
    page = admin_client.get(url(model, "change", obj.pk))
    assert page.status_code == 200
    assert str(obj) in page.content.decode()
    if model is Device:
        assert "All events of this device" in page.content.decode()


@pytest.mark.parametrize(
    ("model", "status"),
    [
        (DeviceGroup, 200),
        (EnrollmentToken, 200),
        (Rollout, 403),
        (Device, 403),
        (Firmware, 403),
        (SigningKey, 403),
        (UpdateSession, 403),
        (Event, 403),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_add_pages(admin_client: Client, db: Any, model: Any, status: int) -> None:
    assert admin_client.get(url(model, "add")).status_code == status


@pytest.mark.parametrize(
    ("model", "query"),
    [
        (Device, {"q": "dev-1"}),
        (Device, {"q": "not-a-uuid-0000"}),
        (Device, {"online": "yes"}),
        (Device, {"online": "no", "status": "idle"}),
        (EnrollmentToken, {"state": "active"}),
        (EnrollmentToken, {"state": "exhausted"}),
        (Firmware, {"published": "no", "q": "1.2"}),
        (UpdateSession, {"q": "dev-0"}),
        (UpdateSession, {"q": "99999999999999999999999"}),
        (UpdateSession, {"firmware__device_type": DEVICE_TYPE, "is_rollback__exact": "0"}),
        (Event, {"q": "user:"}),
        (Event, {"q": "12"}),
        (Event, {"kind": "device.updated"}),
    ],
)
def test_searches_and_filters_render(
    admin_client: Client, fleet: Fleet, model: Any, query: dict[str, str]
) -> None:
    assert admin_client.get(url(model, "changelist"), query).status_code == 200


def test_searching_by_id_finds_the_object(admin_client: Client, fleet: Fleet) -> None:
    device = fleet.devices[2]
    page = admin_client.get(url(Device, "changelist"), {"q": str(device.id)})
    assert device.hardware_id in page.content.decode()
    assert fleet.devices[1].hardware_id not in page.content.decode()
    page = admin_client.get(url(Event, "changelist"), {"q": str(fleet.devices[1].id)})
    assert list(page.context["cl"].result_list) == list(
        Event.objects.filter(device_id=fleet.devices[1].id).order_by("-id")
    )
    page = admin_client.get(url(UpdateSession, "changelist"), {"q": str(fleet.session.id)})
    assert list(page.context["cl"].result_list) == [fleet.session]


@pytest.mark.parametrize("model", [Device, UpdateSession, EnrollmentToken, Firmware, Rollout])
def test_changelists_cost_the_same_queries_for_more_rows(
    admin_client: Client, fleet: Fleet, model: Any
) -> None:
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(url(model, "changelist")).status_code == 200
        return len(queries)

    before = count()
    for i in range(6):
        device = make_device(f"more-{i}", fleet.group)
        UpdateSession.objects.create(device=device, firmware=fleet.published, rollout=fleet.rollout)
        device_services.create_enrollment_token(name=f"more-{i}", group=fleet.group)
        upload(f"3.{i}.0")
        Rollout.objects.create(
            name=f"more-{i}", firmware=fleet.published, device_type="admin-board"
        )
    assert count() == before


def test_firmware_changelist_points_to_the_upload_api(admin_client: Client, db: Any) -> None:
    page = admin_client.get(url(Firmware, "changelist"))
    assert "POST /api/v1/firmware" in page.content.decode()


# --- Enrollment tokens ----------------------------------------------------------------------------


def token_form(**fields: Any) -> dict[str, Any]:
    return {
        "name": "line 2",
        "device_type": DEVICE_TYPE,
        "group": "",
        "expires_at_0": "",
        "expires_at_1": "",
        "max_uses": "",
        **fields,
    }


def test_adding_a_token_shows_the_plaintext_once_and_stores_its_hash(
    admin_client: Client, fleet: Fleet
) -> None:
    reply = admin_client.post(
        url(EnrollmentToken, "add"), token_form(group=fleet.group.pk, max_uses="5"), follow=True
    )
    assert reply.status_code == 200
    shown = [m for m in messages_of(reply) if "ota_enroll_" in m]
    assert len(shown) == 1
    assert "<code>ota_enroll_" in reply.content.decode()  # marked safe, not escaped
    match = TOKEN_RE.search(shown[0])
    assert match is not None
    plaintext = match.group(0)

    token = EnrollmentToken.objects.get(name="line 2")
    prefix, secret = plaintext.removeprefix("ota_enroll_").split("_", 1)
    assert token.prefix == prefix
    assert token.token_hash == device_services.hash_secret(secret)
    assert (token.max_uses, token.group, token.device_type) == (5, fleet.group, DEVICE_TYPE)
    assert token.created_by is not None and token.created_by.username == "admin"
    [created] = events(EventKind.ENROLLMENT_TOKEN_CREATED)[-1:]
    assert created.actor == "user:admin" and created.data["prefix"] == prefix
    assert LogEntry.objects.filter(object_id=str(token.pk)).exists()

    # Never again: not in the list, not on the token's page.
    for page in (url(EnrollmentToken, "changelist"), url(EnrollmentToken, "change", token.pk)):
        assert secret not in admin_client.get(page).content.decode()

    device, _ = device_services.register_device(
        enrollment_token=plaintext, hardware_id="new-1", device_type=DEVICE_TYPE
    )
    assert device.group == fleet.group


def test_a_token_form_with_a_past_expiry_is_refused_on_the_page(
    admin_client: Client, db: Any
) -> None:
    reply = admin_client.post(
        url(EnrollmentToken, "add"),
        token_form(expires_at_0="2001-01-01", expires_at_1="00:00:00"),
    )
    assert reply.status_code == 200
    assert "expires_at" in reply.context["adminform"].form.errors
    assert not EnrollmentToken.objects.exists()


def test_a_service_refusal_becomes_an_error_message(
    admin_client: Client, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**kwargs: Any) -> Any:
        raise ServiceError("Refused for the test.")

    monkeypatch.setattr(device_services, "create_enrollment_token", refuse)
    reply = admin_client.post(url(EnrollmentToken, "add"), token_form(), follow=True)
    assert reply.status_code == 200
    assert "Refused for the test." in messages_of(reply)
    assert not EnrollmentToken.objects.exists()
    assert not LogEntry.objects.exists()


def test_tokens_are_view_only(admin_client: Client, fleet: Fleet) -> None:
    reply = admin_client.post(url(EnrollmentToken, "change", fleet.token.pk), token_form())
    assert reply.status_code == 403


def test_revoke_action(admin_client: Client, fleet: Fleet) -> None:
    other, _ = device_services.create_enrollment_token(name="other")
    reply = admin_client.post(
        url(EnrollmentToken, "changelist"),
        {"action": "revoke_tokens", "_selected_action": [fleet.token.pk, other.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    assert "Revoked 2 token(s)." in messages_of(reply)
    assert {t.state for t in EnrollmentToken.objects.all()} == {"revoked"}
    revoked = events(EventKind.ENROLLMENT_TOKEN_REVOKED)
    assert len(revoked) == 2 and {e.actor for e in revoked} == {"user:admin"}


# --- Devices --------------------------------------------------------------------------------------


def test_reset_credentials_action(admin_client: Client, fleet: Fleet) -> None:
    device = fleet.devices[0]
    reply = admin_client.post(
        url(Device, "changelist"),
        {"action": "reset_credentials", "_selected_action": [device.pk]},
        follow=True,
    )
    assert reply.status_code == 200
    device.refresh_from_db()
    assert device.secret_hash == "" and device.credential_generation == 2
    [reset] = events(EventKind.DEVICE_CREDENTIALS_RESET)
    assert reset.device_id == device.id and reset.actor == "user:admin"
    assert fleet.devices[1].secret_hash  # untouched


def device_form(device: Device, **fields: Any) -> dict[str, Any]:
    return {
        "group": device.group_id or "",
        "target_version": device.target_version or "",
        "metadata": json.dumps(device.metadata),
        # The browser sends it back: JSONField's callable default makes the form compare with it.
        "initial-metadata": json.dumps(device.metadata),
        **fields,
    }


def test_editing_a_device_goes_through_the_service(admin_client: Client, fleet: Fleet) -> None:
    device = fleet.devices[2]
    before = Event.objects.count()
    reply = admin_client.post(
        url(Device, "change", device.pk), device_form(device, target_version="1.2.0")
    )
    assert reply.status_code == 302
    device.refresh_from_db()
    assert device.target_version == "1.2.0" and device.target_set_at is not None
    updated = Event.objects.latest("id")
    assert Event.objects.count() == before + 1
    assert updated.kind == EventKind.DEVICE_UPDATED
    assert updated.device_id == device.id and updated.actor == "user:admin"
    # Only the changed field is passed on (and recorded).
    assert updated.data == {"target_version": "1.2.0"}


def test_saving_a_device_unchanged_writes_nothing(admin_client: Client, fleet: Fleet) -> None:
    device = fleet.devices[1]
    assigned_at = device.target_set_at
    before = Event.objects.count()
    reply = admin_client.post(url(Device, "change", device.pk), device_form(device))
    assert reply.status_code == 302
    device.refresh_from_db()
    assert Event.objects.count() == before and device.target_set_at == assigned_at


@pytest.mark.parametrize(
    ("fields", "error_on"),
    [
        ({"target_version": "not a version"}, "target_version"),
        ({"metadata": json.dumps({"bad key!": 1})}, "metadata"),
        ({"metadata": "[1, 2]"}, "metadata"),
    ],
)
def test_device_edit_is_validated(
    admin_client: Client, fleet: Fleet, fields: dict[str, str], error_on: str
) -> None:
    device = fleet.devices[2]
    before = Event.objects.count()
    reply = admin_client.post(url(Device, "change", device.pk), device_form(device, **fields))
    assert reply.status_code == 200
    assert error_on in reply.context["adminform"].form.errors
    assert Event.objects.count() == before


def test_deleting_a_device_with_sessions_goes_through_the_service(
    admin_client: Client, fleet: Fleet
) -> None:
    device = fleet.devices[0]  # has a session, which no one may delete on its own
    confirm = admin_client.get(url(Device, "delete", device.pk))
    assert confirm.status_code == 200 and not confirm.context["perms_lacking"]
    reply = admin_client.post(url(Device, "delete", device.pk), {"post": "yes"})
    assert reply.status_code == 302
    assert not Device.objects.filter(pk=device.pk).exists()
    assert not UpdateSession.objects.filter(device_id=device.pk).exists()
    [deleted] = events(EventKind.DEVICE_DELETED)
    assert deleted.device_id == device.id and deleted.actor == "user:admin"


def test_bulk_delete_of_devices_goes_through_the_service(
    admin_client: Client, fleet: Fleet
) -> None:
    ids = [d.pk for d in fleet.devices]
    reply = admin_client.post(
        url(Device, "changelist"),
        {"action": "delete_selected", "_selected_action": ids, "post": "yes"},
    )
    assert reply.status_code == 302
    assert not Device.objects.exists()
    assert len(events(EventKind.DEVICE_DELETED)) == 3


# --- Device groups --------------------------------------------------------------------------------


def test_group_add_change_delete_go_through_services(admin_client: Client, db: Any) -> None:
    reply = admin_client.post(
        url(DeviceGroup, "add"), {"name": "field", "description": "", "target_version": "2.0"}
    )
    assert reply.status_code == 302
    group = DeviceGroup.objects.get(name="field")
    assert group.target_version == "2.0" and group.target_set_at is not None
    created = events(EventKind.GROUP_CHANGED)[-1]
    assert created.data["created"] == "field" and created.actor == "user:admin"

    reply = admin_client.post(
        url(DeviceGroup, "change", group.pk),
        {"name": "field", "description": "out there", "target_version": ""},
    )
    assert reply.status_code == 302
    group.refresh_from_db()
    assert (group.description, group.target_version, group.target_set_at) == (
        "out there",
        None,
        None,
    )
    assert events(EventKind.GROUP_CHANGED)[-1].data["target_version"] is None

    reply = admin_client.post(
        url(DeviceGroup, "change", group.pk),
        {"name": "field", "description": "", "target_version": "x y"},
    )
    assert reply.status_code == 200
    assert "target_version" in reply.context["adminform"].form.errors

    reply = admin_client.post(url(DeviceGroup, "delete", group.pk), {"post": "yes"})
    assert reply.status_code == 302
    assert not DeviceGroup.objects.exists()
    assert events(EventKind.GROUP_CHANGED)[-1].data["deleted"] == "field"


def test_deleting_a_group_that_tokens_enroll_into_is_refused_without_an_error(
    admin_client: Client, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_services.create_enrollment_token(name="into lab", group=fleet.group)
    target = url(DeviceGroup, "delete", fleet.group.pk)
    page = admin_client.get(target)
    assert page.status_code == 200 and page.context["protected"]
    assert admin_client.post(target, {"post": "yes"}).status_code == 200
    assert DeviceGroup.objects.filter(pk=fleet.group.pk).exists()

    # A token that appeared after the confirmation page: the service refuses, the page says so.
    monkeypatch.setattr(
        type(admin.site.get_model_admin(DeviceGroup)),
        "get_deleted_objects",
        lambda self, objs, request: ([], {}, set(), []),
    )
    reply = admin_client.post(target, {"post": "yes"}, follow=True)
    assert reply.status_code == 200
    assert any("delete them first" in m for m in messages_of(reply))
    bulk = admin_client.post(
        url(DeviceGroup, "changelist"),
        {"action": "delete_selected", "_selected_action": [fleet.group.pk], "post": "yes"},
        follow=True,
    )
    assert any("was not deleted" in m for m in messages_of(bulk))
    assert DeviceGroup.objects.filter(pk=fleet.group.pk).exists()


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
