"""The admin as a power-user console: every page renders; tokens, devices and groups change only
through services."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from devices import services as device_services
from devices.models import Device, DeviceGroup, EnrollmentToken
from firmware.models import Firmware, SigningKey
from ota_site.errors import ServiceError
from ota_site.models import Event, EventKind
from rollouts.models import Rollout, UpdateSession
from tests.admin.conftest import (
    DEVICE_TYPE,
    TOKEN_RE,
    Fleet,
    events,
    make_device,
    messages_of,
    upload,
    url,
)

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
