"""Operator endpoints for devices and groups, and a device's view of its own record."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from devices.models import Device, DeviceGroup
from ota_site.models import Event
from tests.conftest import DeviceActor
from tests.factories import DeviceFactory, DeviceGroupFactory


def test_list_filters_sorts_and_paginates(operator_api: APIClient, db) -> None:
    lab = DeviceGroupFactory.create(name="lab")
    now = timezone.now()
    DeviceFactory.create(hardware_id="a-1", current_version="1.9.0", group=lab)
    DeviceFactory.create(
        hardware_id="a-2", current_version="1.10.0", last_seen=now - timedelta(days=2)
    )
    DeviceFactory.create(hardware_id="b-1", device_type="board-b", status="failed")

    def ids(query: str) -> list[str]:
        reply = operator_api.get(f"/api/v1/devices?{query}")
        assert reply.status_code == 200, reply.content
        return [d["hardware_id"] for d in reply.json()["results"]]

    assert ids("device_type=board-a") == ["a-1", "a-2"]
    assert ids("status=failed") == ["b-1"]
    assert ids(f"group={lab.id}") == ["a-1"]
    assert ids("version=1.10.0") == ["a-2"]
    assert ids("search=a-") == ["a-1", "a-2"]
    assert ids("online=false") == ["a-2"]
    assert ids(f"last_seen_before={(now - timedelta(days=1)).isoformat().replace('+', '%2B')}") == [
        "a-2"
    ]
    assert ids("device_type=board-a&ordering=-version") == ["a-2", "a-1"]  # 1.10 > 1.9
    page = operator_api.get("/api/v1/devices?page_size=2&page=2").json()
    assert page["count"] == 3 and len(page["results"]) == 1


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "group=not-a-uuid",
        "last_seen_after=yesterday",
        "page=0",
        "page_size=abc&page=9",
    ],
)
def test_bad_filters_are_4xx(operator_api: APIClient, db, query: str) -> None:
    DeviceFactory.create()
    reply = operator_api.get(f"/api/v1/devices?{query}")
    assert reply.status_code in (400, 404), reply.content
    assert "code" in reply.json()


def test_put_changes_group_target_and_metadata_through_the_service(
    operator_api: APIClient, device_a: DeviceActor
) -> None:
    group = DeviceGroupFactory.create()
    reply = operator_api.put(
        f"/api/v1/devices/{device_a.id}",
        {"group": str(group.id), "target_version": "2.0.0", "metadata": {"site": "berlin"}},
        format="json",
    )
    assert reply.status_code == 200, reply.content
    device = device_a.refresh()
    assert device.group == group and device.target_version == "2.0.0"
    assert device.metadata == {"site": "berlin"} and device.target_set_at is not None
    assert Event.objects.filter(kind="device.updated", device_id=device.id).exists()


@pytest.mark.parametrize(
    "body",
    [
        {"target_version": "banana"},
        {"group": "00000000-0000-0000-0000-000000000000"},
        {"metadata": "text"},
        {"group": None},  # PUT needs every field
    ],
)
def test_bad_device_changes_are_400_and_change_nothing(
    operator_api: APIClient, device_a: DeviceActor, body
) -> None:
    before = Device.objects.values().get(pk=device_a.id)
    reply = operator_api.put(f"/api/v1/devices/{device_a.id}", body, format="json")
    assert reply.status_code == 400
    assert Device.objects.values().get(pk=device_a.id) == before


def test_device_reads_only_itself(device_a: DeviceActor, device_b: DeviceActor) -> None:
    mine = device_a.client.get(f"/api/v1/devices/{device_a.id}")
    assert mine.status_code == 200 and mine.json()["hardware_id"] == "device-a"
    assert device_a.client.get(f"/api/v1/devices/{device_b.id}").status_code == 403
    assert device_a.client.get("/api/v1/devices").status_code in (401, 403)
    reply = device_a.client.patch(
        f"/api/v1/devices/{device_a.id}", {"target_version": "9.9.9"}, format="json"
    )
    assert reply.status_code in (401, 403)
    assert device_a.client.delete(f"/api/v1/devices/{device_a.id}").status_code in (401, 403)
    reply = device_a.client.post(
        f"/api/v1/devices/{device_b.id}/heartbeat", {"current_version": "6.6.6"}, format="json"
    )
    assert reply.status_code == 403
    assert device_b.refresh().current_version == "1.0.0"


def test_delete_keeps_the_history(
    operator_api: APIClient, admin_api: APIClient, device_a: DeviceActor
) -> None:
    # Deleting is for admins.
    assert operator_api.delete(f"/api/v1/devices/{device_a.id}").status_code == 403
    assert admin_api.delete(f"/api/v1/devices/{device_a.id}").status_code == 204
    assert not Device.objects.filter(pk=device_a.id).exists()
    assert Event.objects.filter(device_id=device_a.id, kind="device.deleted").exists()
    # Its token now leads nowhere.
    assert device_a.client.get("/api/v1/updates/check").status_code == 404


def test_heartbeat_validates_and_coalesces(device_a: DeviceActor, settings) -> None:
    url = f"/api/v1/devices/{device_a.id}/heartbeat"
    assert device_a.client.post(url, {"current_version": "x.y"}, format="json").status_code == 400
    assert device_a.client.post(url, {"metadata": [1]}, format="json").status_code == 400
    assert device_a.client.post(url, {"current_version": "1.0.1"}, format="json").status_code == 200
    assert device_a.refresh().current_version == "1.0.1"
    updated = device_a.refresh().updated_at
    device_a.client.post(url, {"current_version": "1.0.1"}, format="json")
    assert device_a.refresh().updated_at == updated  # nothing changed, nothing written


def test_groups_crud(operator_api: APIClient, device_a: DeviceActor) -> None:
    reply = operator_api.post(
        "/api/v1/groups", {"name": "eu", "target_version": "1.2.0"}, format="json"
    )
    assert reply.status_code == 201, reply.content
    group_id = reply.json()["id"]
    assert operator_api.post("/api/v1/groups", {"name": "eu"}, format="json").status_code in (
        400,
        409,
    )
    assert (
        operator_api.post(
            "/api/v1/groups", {"name": "x", "target_version": "?"}, format="json"
        ).status_code
        == 400
    )
    reply = operator_api.patch(
        f"/api/v1/groups/{group_id}", {"target_version": None}, format="json"
    )
    assert reply.status_code == 200 and reply.json()["target_version"] is None
    operator_api.patch(f"/api/v1/devices/{device_a.id}", {"group": group_id}, format="json")
    assert operator_api.get(f"/api/v1/groups/{group_id}").json()["device_count"] == 1
    assert operator_api.delete(f"/api/v1/groups/{group_id}").status_code == 204
    assert device_a.refresh().group is None and not DeviceGroup.objects.exists()


def test_a_group_with_enrollment_tokens_cannot_be_deleted(operator_api: APIClient, db) -> None:
    from devices import services

    group = DeviceGroupFactory.create(name="field")
    services.create_enrollment_token(name="field devices", group=group)
    reply = operator_api.delete(f"/api/v1/groups/{group.id}")
    assert reply.status_code == 409 and reply.json()["code"] == "group_in_use"
    assert DeviceGroup.objects.filter(pk=group.pk).exists()
