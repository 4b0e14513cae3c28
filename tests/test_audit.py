"""The audit log: who (actor and kind), from where (address, request id), what, before and after;
append-only in the ORM and in PostgreSQL; browsable in admin and filterable through the API."""

from __future__ import annotations

import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import (
    DataError,
    IntegrityError,
    InternalError,
    ProgrammingError,
    connection,
    transaction,
)
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from devices import services as device_services
from ota_site import apikeys
from ota_site.models import ActorKind, Event, EventKind
from ota_site.permissions import Role
from tests.conftest import DeviceActor


@pytest.fixture(autouse=True)
def _no_rate_limits(settings: Any) -> None:
    settings.RATE_LIMIT_IP = "off"
    settings.RATE_LIMIT_DEVICE = "off"


@pytest.fixture
def admin_api(admin_user: Any) -> APIClient:
    client = APIClient()
    client.force_login(admin_user)
    return client


def test_a_person_change_records_who_where_and_before_after(
    operator_api: APIClient, operator: Any, device_a: DeviceActor
) -> None:
    reply = operator_api.patch(
        f"/api/v1/devices/{device_a.id}",
        {"target_version": "2.0.0"},
        format="json",
        REMOTE_ADDR="198.51.100.7",
    )
    assert reply.status_code == 200, reply.content
    event = Event.objects.filter(kind=EventKind.DEVICE_UPDATED).latest("id")
    assert event.actor == f"user:{operator.username}" and event.actor_kind == ActorKind.USER
    assert event.ip == "198.51.100.7"
    assert event.request_id and event.request_id == reply["X-Request-ID"]
    assert event.changes == {"target_version": [None, "2.0.0"]}


def test_forwarded_addresses_count_only_from_trusted_proxies(
    settings: Any, operator_api: APIClient, device_a: DeviceActor
) -> None:
    def change(version: str, **meta: Any) -> Event:
        reply = operator_api.patch(
            f"/api/v1/devices/{device_a.id}", {"target_version": version}, format="json", **meta
        )
        assert reply.status_code == 200
        return Event.objects.filter(kind=EventKind.DEVICE_UPDATED).latest("id")

    forged = {"HTTP_X_FORWARDED_FOR": "203.0.113.9", "HTTP_X_REQUEST_ID": "forged-id"}
    event = change("2.0.0", REMOTE_ADDR="192.0.2.1", **forged)
    assert event.ip == "192.0.2.1" and event.request_id != "forged-id"
    settings.TRUSTED_PROXIES = ["192.0.2.0/24"]
    event = change("2.0.1", REMOTE_ADDR="192.0.2.1", **forged)
    assert event.ip == "203.0.113.9" and event.request_id == "forged-id"
    # A request id that is not one is replaced, never stored as sent.
    event = change("2.0.2", REMOTE_ADDR="192.0.2.1", HTTP_X_REQUEST_ID="x" * 65 + "\n")
    assert len(event.request_id) == 32


def test_an_api_key_is_named_by_its_prefix(db: Any) -> None:
    key, token = apikeys.create_api_key(name="ci", role=Role.OPERATOR)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"ApiKey {token}")
    assert client.post("/api/v1/groups", {"name": "lab"}, format="json").status_code == 201
    event = Event.objects.filter(kind=EventKind.GROUP_CHANGED).latest("id")
    assert event.actor == f"key:{key.prefix}" and event.actor_kind == ActorKind.API_KEY
    assert event.changes["name"] == [None, "lab"]


def test_group_and_rollout_updates_record_before_and_after(
    operator_api: APIClient, published: Any
) -> None:
    group = operator_api.post("/api/v1/groups", {"name": "lab"}, format="json").json()
    reply = operator_api.patch(
        f"/api/v1/groups/{group['id']}", {"name": "field", "description": "d"}, format="json"
    )
    assert reply.status_code == 200
    event = Event.objects.filter(kind=EventKind.GROUP_CHANGED).latest("id")
    assert event.changes == {"name": ["lab", "field"], "description": ["", "d"]}

    rollout = operator_api.post(
        "/api/v1/rollouts",
        {
            "name": "r1",
            "firmware": str(published.id),
            "stages": [{"percentage": 10}, {"percentage": 100}],
        },
        format="json",
    )
    assert rollout.status_code == 201, rollout.content
    created = Event.objects.get(kind=EventKind.ROLLOUT_CREATED)
    assert created.changes["name"] == [None, "r1"]
    reply = operator_api.patch(
        f"/api/v1/rollouts/{rollout.json()['id']}", {"name": "r2"}, format="json"
    )
    assert reply.status_code == 200, reply.content
    updated = Event.objects.get(kind=EventKind.ROLLOUT_UPDATED)
    assert updated.changes == {"name": ["r1", "r2"]}


def test_devices_and_the_system_are_told_apart(device_a: DeviceActor) -> None:
    registered = Event.objects.get(kind=EventKind.DEVICE_REGISTERED, device_id=device_a.id)
    assert registered.actor_kind == ActorKind.DEVICE
    token_event = Event.objects.get(kind=EventKind.ENROLLMENT_TOKEN_CREATED)
    assert token_event.actor_kind == ActorKind.SYSTEM
    assert token_event.ip is None and token_event.request_id == ""  # no request: a service call


def test_role_changes_are_audited(db: Any) -> None:
    out = StringIO()
    call_command("users", "create", "carol", "--role", "viewer", stdout=out)
    call_command("users", "set-role", "carol", "operator", stdout=out)
    call_command("users", "set-role", "carol", "operator", stdout=out)  # no change, no row
    changes = [e.changes["role"] for e in Event.objects.filter(kind=EventKind.USER_ROLE_CHANGED)]
    assert changes == [[None, "viewer"], ["viewer", "operator"]]
    listing = StringIO()
    call_command("users", "list", stdout=listing)
    assert "carol" in listing.getvalue() and "operator" in listing.getvalue()


# --- Append-only -------------------------------------------------------------------------------


def test_the_orm_refuses_to_change_events(device_a: DeviceActor) -> None:
    event = Event.objects.first()
    assert event is not None
    with pytest.raises(TypeError):
        Event.objects.filter(pk=event.pk).update(actor="someone else")
    with pytest.raises(TypeError):
        Event.objects.all().delete()
    with pytest.raises(TypeError):
        event.save()
    with pytest.raises(TypeError):
        event.delete()


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL (the audit trigger)"
)
def test_postgresql_refuses_update_and_delete(device_a: DeviceActor) -> None:
    event = Event.objects.first()
    assert event is not None
    for sql in (
        "UPDATE ota_site_event SET actor = 'x' WHERE id = %s",
        "DELETE FROM ota_site_event WHERE id = %s",
    ):
        refused = pytest.raises((InternalError, ProgrammingError, IntegrityError, DataError))
        with refused, transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, [event.pk])
    assert Event.objects.filter(pk=event.pk, actor=event.actor).exists()
    # The prune's escape (ota_site.archive.prune_events): rows older than the time its
    # transaction names may be deleted (never updated). tests/test_archival.py has the rest.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('ota.prune_events_before', %s, true)",
            [(event.created_at + timedelta(seconds=1)).isoformat()],
        )
        cursor.execute("DELETE FROM ota_site_event WHERE id = %s", [event.pk])
    assert not Event.objects.filter(pk=event.pk).exists()


# --- The API --------------------------------------------------------------------------------------


def test_the_audit_api_filters(admin_api: APIClient, device_a: DeviceActor, operator: Any) -> None:
    device_services.update_device(device_a.device, actor=operator, target_version="2.0.0")
    device_services.create_group(name="lab", actor=operator)
    everything = admin_api.get("/api/v1/audit").json()
    ids = [row["id"] for row in everything["results"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == Event.objects.count()

    def results(query: str) -> list[dict[str, Any]]:
        reply = admin_api.get(f"/api/v1/audit?{query}")
        assert reply.status_code == 200, reply.content
        rows: list[dict[str, Any]] = reply.json()["results"]
        return rows

    by_actor = results(f"actor=user:{operator.username}")
    assert {row["kind"] for row in by_actor} == {"device.updated", "group.changed"}
    assert results("actor_kind=user") == by_actor
    [updated] = results(f"device_id={device_a.id}&kind=device.updated")
    assert updated["changes"] == {"target_version": [None, "2.0.0"]}
    assert len(results("kind=device.updated&kind=group.changed")) == 2
    assert results(f"firmware_id={uuid.uuid4()}") == []
    assert results("since=2999-01-01T00:00:00Z") == []
    assert len(results("until=2999-01-01T00:00:00Z")) == len(ids)
    page = admin_api.get("/api/v1/audit?page_size=1").json()
    assert len(page["results"]) == 1 and page["next"]
    second = admin_api.get(page["next"]).json()
    assert second["results"][0]["id"] < page["results"][0]["id"]


@pytest.mark.parametrize(
    "query",
    [
        "kind=nonsense",
        "device_id=not-a-uuid",
        "since=yesterday",
        "until=2026-13-45",
        "actor_kind=robot",
        "session_id=abc",
        "page_size=-1",
        "page_size=x",
        "colour=blue",
    ],
)
def test_bad_audit_filters_are_400(admin_api: APIClient, query: str) -> None:
    reply = admin_api.get(f"/api/v1/audit?{query}")
    assert reply.status_code == 400, reply.content
    assert reply.json()["code"] == "invalid" and reply.json()["errors"]


def test_a_bad_cursor_is_404_json(admin_api: APIClient) -> None:
    reply = admin_api.get("/api/v1/audit?cursor=garbage")
    assert reply.status_code == 404 and reply.json()["code"] == "not_found"


def test_only_admins_read_the_audit_log(operator_api: APIClient, api: APIClient) -> None:
    assert operator_api.get("/api/v1/audit").status_code == 403
    assert api.get("/api/v1/audit").status_code == 401


# --- Admin ----------------------------------------------------------------------------------------


def test_the_admin_filters_and_searches_the_log(
    admin_user: Any, operator: Any, device_a: DeviceActor
) -> None:
    device_services.update_device(device_a.device, actor=operator, target_version="2.0.0")
    client = Client()
    client.force_login(admin_user)
    changelist = reverse("admin:ota_site_event_changelist")
    reply = client.get(changelist, {"actor_kind__exact": "user"})
    assert reply.status_code == 200
    assert list(reply.context["cl"].result_list.values_list("actor", flat=True)) == [
        f"user:{operator.username}"
    ]
    reply = client.get(changelist, {"q": str(device_a.id)})
    assert reply.status_code == 200 and len(reply.context["cl"].result_list) >= 2
    event = Event.objects.filter(kind=EventKind.DEVICE_UPDATED).latest("id")
    page = client.get(reverse("admin:ota_site_event_change", args=[event.pk]))
    assert page.status_code == 200 and b"target_version" in page.content
